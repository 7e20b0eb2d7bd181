"""Finite-time Lyapunov spectra: jaxflow against the numpy code a researcher writes.

Workload 1, Lorenz-63 (10, 28, 8/3): the full spectrum over T = 100 (dt = 0.01,
10^4 steps, 10 time units of transient) from many initial conditions.
- jaxflow: `jax.vmap` of `jf.lyapunov_spectrum` (fixed-step Tsit5, frame pushed by
  JVPs, QR every step), one jit.
- numpy, per initial condition: the textbook loop, RK4 on the state and the
  variational equation `dQ/dt = J(x) Q` together, `np.linalg.qr` every step
  (timed on a few initial conditions and extrapolated).
- numpy, batched: the same RK4/QR loop over time, vectorised over the initial
  conditions (stacked `np.linalg.qr`).

Workload 2, paper 003's two-moons score model: the full spectrum of 400
Euler-Maruyama paths of 1000 steps through the exact score of 800 quadrature
nodes (`examples/moons_lyapunov.py`).
- jaxflow: `jax.vmap` of `jf.lyapunov_spectrum_of_map` with frozen noise.
- numpy, batched over paths: the EM step in numpy, its 2x2 Jacobian by central
  differences (4 extra steps), stacked QR.

    python benchmarks/lyapunov.py [--ics 64] [--paths 400]
"""

import argparse
import json
import os
import platform
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxflow as jf  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from _moons import moons, moons_field  # noqa: E402

SIGMA, RHO, BETA = 10.0, 28.0, 8.0 / 3.0
REFERENCE = (0.9056, 0.0, -14.5723)  # Sprott 2003


def lorenz(x, t):
    return jnp.array([SIGMA * (x[1] - x[0]), x[0] * (RHO - x[2]) - x[1], x[0] * x[1] - BETA * x[2]])


def np_lorenz(x):
    """Batched field and Jacobian, x of shape (m, 3)."""
    f = np.stack(
        [
            SIGMA * (x[:, 1] - x[:, 0]),
            x[:, 0] * (RHO - x[:, 2]) - x[:, 1],
            x[:, 0] * x[:, 1] - BETA * x[:, 2],
        ],
        -1,
    )
    j = np.zeros((len(x), 3, 3))
    j[:, 0, 0], j[:, 0, 1] = -SIGMA, SIGMA
    j[:, 1, 0], j[:, 1, 1], j[:, 1, 2] = RHO - x[:, 2], -1.0, -x[:, 0]
    j[:, 2, 0], j[:, 2, 1], j[:, 2, 2] = x[:, 1], x[:, 0], -BETA
    return f, j


def numpy_lorenz_spectrum(x0, steps, transient, dt):
    """RK4 on (x, Q) with QR every step, vectorised over the rows of x0."""
    x = np.array(x0, float)
    q = np.broadcast_to(np.eye(3), (len(x), 3, 3)).copy()
    total = np.zeros((len(x), 3))

    def rhs(x, q):
        f, j = np_lorenz(x)
        return f, j @ q

    for i in range(steps):
        k1x, k1q = rhs(x, q)
        k2x, k2q = rhs(x + 0.5 * dt * k1x, q + 0.5 * dt * k1q)
        k3x, k3q = rhs(x + 0.5 * dt * k2x, q + 0.5 * dt * k2q)
        k4x, k4q = rhs(x + dt * k3x, q + dt * k3q)
        x = x + dt / 6 * (k1x + 2 * k2x + 2 * k3x + k4x)
        q = q + dt / 6 * (k1q + 2 * k2q + 2 * k3q + k4q)
        q, r = np.linalg.qr(q)
        d = np.diagonal(r, axis1=1, axis2=2)
        q = q * np.sign(d)[:, None, :]
        if i >= transient:
            total += np.log(np.abs(d))
    return np.sort(total / ((steps - transient) * dt), axis=1)[:, ::-1]


def numpy_moons_spectrum(field_np, z, noise, t_start, h):
    """EM paths batched over rows, Jacobian by central differences, QR each step."""
    x = np.array(z)
    m = len(x)
    q = np.broadcast_to(np.eye(2), (m, 2, 2)).copy()
    total = np.zeros((m, 2))
    eps = 1e-6
    for i in range(noise.shape[1]):
        t = t_start - i * h

        def step(y, t=t, i=i):
            drift, g = field_np(y, t)
            return y - h * drift + g * np.sqrt(h) * noise[:, i]

        cols = [(step(x + eps * e) - step(x - eps * e)) / (2 * eps) for e in np.eye(2)]
        jac = np.stack(cols, -1)
        x = step(x)
        q, r = np.linalg.qr(jac @ q)
        d = np.diagonal(r, axis1=1, axis2=2)
        q = q * np.sign(d)[:, None, :]
        total += np.log(np.abs(d))
    return np.sort(total / noise.shape[1], axis=1)[:, ::-1]


def numpy_reverse_drift(nodes, path):
    """The cosine path's reverse drift `f x - g^2 s` for an Empirical law, numpy."""
    alpha = lambda t: float(path.alpha(t))  # noqa: E731
    sigma = lambda t: float(path.sigma(t))  # noqa: E731
    f = lambda t: float(path.drift_coefficient(t))  # noqa: E731
    g2 = lambda t: float(path.diffusion_squared(t))  # noqa: E731

    def drift(x, t):
        a, s = alpha(t), sigma(t)
        resid = x[:, None, :] - a * nodes[None]
        logits = -0.5 * (resid**2).sum(-1) / s**2
        w = np.exp(logits - logits.max(1, keepdims=True))
        w /= w.sum(1, keepdims=True)
        score = -(w[:, :, None] * resid).sum(1) / s**2
        return f(t) * x - g2(t) * score, np.sqrt(g2(t))

    return drift


def timed(fn, *args):
    t = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ics", type=int, default=64)
    p.add_argument("--loop-ics", type=int, default=4, help="ICs timed in the per-IC loop")
    p.add_argument("--paths", type=int, default=400)
    p.add_argument("--out", default="out")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    report = dict(
        environment=dict(
            jax=jax.__version__,
            backend=jax.default_backend(),
            device=str(jax.devices()[0]),
            cpu_count=os.cpu_count(),
            machine=platform.machine(),
        )
    )

    # --- Lorenz-63
    steps, dt, transient = 10_000, 0.01, 1000
    x0 = np.array([1.0, 1.0, 20.0]) + np.random.default_rng(0).standard_normal((args.ics, 3))
    run = jax.jit(
        jax.vmap(
            lambda x: (
                jf.lyapunov_spectrum(
                    lorenz,
                    x,
                    0.0,
                    steps * dt,
                    steps=steps,
                    transient_time=transient * dt,
                    save_stretch=False,
                ).exponents
            )
        )
    )
    _, first = timed(run, jnp.asarray(x0))
    jx, t_jax = timed(run, jnp.asarray(x0))
    _, t_loop = timed(
        lambda: [
            numpy_lorenz_spectrum(x0[i : i + 1], steps, transient, dt) for i in range(args.loop_ics)
        ]
    )
    t_loop *= args.ics / args.loop_ics
    nb, t_batch = timed(numpy_lorenz_spectrum, x0, steps, transient, dt)
    report["lorenz"] = dict(
        ics=args.ics,
        steps=steps,
        jaxflow_compile_and_first_run_s=first,
        jaxflow_run_s=t_jax,
        numpy_loop_s_extrapolated=t_loop,
        numpy_batched_s=t_batch,
        speedup_vs_loop=t_loop / t_jax,
        speedup_vs_batched=t_batch / t_jax,
        jaxflow_mean_exponents=np.asarray(jx).mean(0),
        numpy_mean_exponents=nb.mean(0),
        reference=REFERENCE,
    )
    print(
        f"Lorenz, {args.ics} ICs x {steps} steps: jaxflow {t_jax:.2f} s "
        f"(first call {first:.1f} s), "
        f"numpy loop {t_loop:.1f} s ({t_loop / t_jax:.0f}x), numpy batched {t_batch:.2f} s "
        f"({t_batch / t_jax:.1f}x); mean exponents jaxflow {np.round(np.asarray(jx).mean(0), 3)}, "
        f"numpy {np.round(nb.mean(0), 3)}, reference {REFERENCE}",
        flush=True,
    )

    # --- two moons
    nodes, _ = moons(400)
    field = moons_field(nodes)
    path = field.path
    m_steps, t_start, t_end = 1000, 0.999, 1e-3
    h = (t_start - t_end) / m_steps
    kz, kn = jax.random.split(jax.random.PRNGKey(0))
    z = float(path.sigma(t_start)) * jax.random.normal(kz, (args.paths, 2), jnp.float64)
    noise = jax.random.normal(kn, (args.paths, m_steps, 2), jnp.float64)

    def one(z, noise):
        def step(x, i):
            return jf.reverse_sde_step(field, x, t_start - i * h, h, noise[i])

        return jf.lyapunov_spectrum_of_map(step, z, m_steps, save_stretch=False).exponents

    run = jax.jit(jax.vmap(one))
    _, first = timed(run, z, noise)
    jm, t_jax = timed(run, z, noise)
    nm, t_np = timed(
        numpy_moons_spectrum,
        numpy_reverse_drift(nodes, path),
        np.asarray(z),
        np.asarray(noise),
        t_start,
        h,
    )
    gap = float(np.max(np.abs(np.asarray(jm) - nm)))
    report["moons"] = dict(
        paths=args.paths,
        steps=m_steps,
        jaxflow_compile_and_first_run_s=first,
        jaxflow_run_s=t_jax,
        numpy_batched_fd_s=t_np,
        speedup=t_np / t_jax,
        max_abs_exponent_gap=gap,
    )
    print(
        f"two moons, {args.paths} paths x {m_steps} EM steps: jaxflow {t_jax:.2f} s (first call "
        f"{first:.1f} s), numpy batched + central differences {t_np:.1f} s ({t_np / t_jax:.1f}x); "
        f"exponents agree to {gap:.1e}",
        flush=True,
    )
    out = os.path.join(args.out, "lyapunov_benchmark.json")
    with open(out, "w") as f:
        json.dump(report, f, indent=1, default=lambda o: np.asarray(o).tolist())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
