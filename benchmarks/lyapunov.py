"""Finite-time Lyapunov spectra: jaxflow against the numpy and PyTorch code a
researcher writes.

Workload 1, Lorenz-63 (10, 28, 8/3): the full spectrum over T = 100 (dt = 0.01,
10^4 steps, 10 time units of transient) from many initial conditions.
- jaxflow: `jax.vmap` of `jf.lyapunov_spectrum` (fixed-step Tsit5, frame pushed by
  JVPs, QR every step), one jit.
- numpy, per initial condition: the textbook loop, RK4 on the state and the
  variational equation `dQ/dt = J(x) Q` together, `np.linalg.qr` every step
  (timed on a few initial conditions and extrapolated).
- numpy, batched: the same RK4/QR loop over time, vectorised over the initial
  conditions (stacked `np.linalg.qr`).
- PyTorch, batched (`_torch_lyapunov.py`): fixed-step Tsit5 with diffrax's tableau
  (jaxflow's discrete map) on `(x, Q)` with the analytic `J`, `torch.linalg.qr`
  every step, the step `torch.compile`d and eager.

Workload 2, paper 003's two-moons score model: the full spectrum of 400
Euler-Maruyama paths of 1000 steps through the exact score of 800 quadrature
nodes (`examples/moons_lyapunov.py`).
- jaxflow: `jax.vmap` of `jf.lyapunov_spectrum_of_map` with frozen noise.
- numpy, batched over paths: the EM step in numpy, its 2x2 Jacobian by central
  differences (4 extra steps), stacked QR.
- PyTorch, batched: the EM step with its 2x2 Jacobian by `torch.func.jacfwd` +
  `vmap`, `torch.linalg.qr`, the step eager and `torch.compile`d; where
  `vmap(jacfwd)` does not compile (torch 2.13: pytorch/pytorch#151196), the
  compiled route is reported as failed and `vmap(jacrev)` is compiled instead
  (`torch_compiled_jacrev`).

"best PyTorch" in the output is the fastest torch route that ran. PyTorch uses all
cores (`--torch-threads` to change); on a machine shared with other work its
parallel regions wait for descheduled threads (milliseconds per op), so time it on
a quiet machine.

For every route: wall time, cores busy (process CPU time, user + sys, over the wall
time of the timed call), accuracy (Lorenz: the mean spectrum against the published
reference and each IC's spectrum against jaxflow's; moons: each path's exponents
against jaxflow's) and the time as a multiple of a rough flop limit: XLA's flop
count of one step of one IC / path (the JVP-pushed step, plus LAPACK's count for
the QR, which XLA sees as an opaque custom call) x steps x ICs over the machine's
float64 peak (best 2048 x 2048 `jnp.dot`).

    python benchmarks/lyapunov.py [--ics 64] [--paths 400] [--json out/lyapunov_benchmark.json]
    python benchmarks/lyapunov.py --ics 4 --loop-ics 1 --paths 8 --steps-scale 0.05 \
        --no-compile --peak-size 512     # smoke size (tests/test_lyapunov_benchmark.py)
"""

import argparse
import json
import os
import platform
import sys
import time
from functools import partial

import diffrax
import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxflow as jf  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _common import cpu_devices_flag, cpu_seconds, peak_gflops, xla_cost  # noqa: E402

# before anything runs: the "every device" routes spread over one CPU device a core
CPU_DEVICES = jf.use_cpu_devices(cpu_devices_flag())

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
    """`(out, wall seconds, cores busy)` of one call; cores busy is the process's
    CPU time (user + sys, all threads) over the call's wall time."""
    cpu0, t = cpu_seconds(), time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    wall = time.perf_counter() - t
    return out, wall, (cpu_seconds() - cpu0) / max(wall, 1e-12)


# --- the flop limit


def xla_flops(fn, *args) -> float:
    return float(xla_cost(fn, *args).get("flops", 0.0))


def times_limit(routes, limit):
    """Each timed route's run time as a multiple of the flop limit's."""
    for r in routes.values():
        if "run_s" in r:
            r["x_flop_limit"] = r["run_s"] / limit["limit_s"]


def lapack_qr_flops(n: int) -> float:
    """LAPACK's flop count of an n x n QR with the explicit Q: dgeqrf (4/3 n^3)
    and dorgqr (4/3 n^3). XLA's cost analysis counts these custom calls as 0."""
    return 8.0 * n**3 / 3.0


def pushed_step(step):
    """One step of the jaxflow loop for one IC / path: the step's JVPs along the
    frame's columns, QR, signs, `log |diag R|` (as `jaxflow._lyapunov._qr_step`
    and its scan body)."""

    def one(x, q, *args):
        push = jax.vmap(lambda c: jax.jvp(lambda y: step(y, *args), (x,), (c,)), in_axes=1)
        xs, aq = push(q)
        q_new, r = jnp.linalg.qr(aq.T)
        d = jnp.diagonal(r)
        sign = jnp.where(d < 0, -1.0, 1.0)
        return xs[0], q_new * sign, jnp.log(jnp.abs(d))

    return one


def tsit5_step(f, dt):
    """diffrax's Tsit5 step for an autonomous `f`, stages unrolled in Python: the
    same map as jaxflow's (diffrax runs the stages in a `lax.scan`, whose body XLA's
    cost analysis counts once, not once per stage)."""
    tab = diffrax.Tsit5.tableau

    def step(y):
        ks = [f(y)]
        for row in tab.a_lower[:5]:  # stages 2..6; the 7th only feeds the error estimate
            ks.append(f(y + dt * sum(float(a) * k for a, k in zip(row, ks, strict=True))))
        return y + dt * sum(float(b) * k for b, k in zip(tab.b_sol, ks, strict=False))

    return step


def flop_limit(flops_per_step, steps, batch, peak):
    total = flops_per_step * steps * batch
    return dict(
        flops_per_step=flops_per_step,
        total_flops=total,
        peak_gflops=peak,
        limit_s=total / (peak * 1e9),
    )


# --- PyTorch, loaded lazily


def load_torch(args):
    """The `_torch_lyapunov` module and its info, or `(None, info)` without torch."""
    if args.no_torch:
        return None, dict(available=False, reason="--no-torch")
    try:
        import torch  # noqa: F401
    except ImportError as e:
        print(f"PyTorch routes skipped: {e} (pip install torch)", flush=True)
        return None, dict(available=False, reason=str(e))
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    import _torch_lyapunov as tl

    info = tl.setup(args.torch_threads)
    info.update(available=True, torch_compile=not args.no_compile)
    return tl, info


def torch_routes(args, variants, run, warm):
    """Time the torch routes `variants`, `(name, compile, build, fallback)`:
    `build() -> step`, `warm(step)` a two-step run (the compile, for a compiled
    step), `run(step)` the whole spectrum. Compiled variants are left out under
    `--no-compile`. A route that fails is reported as such, and its `fallback`
    variant (or `None`) is run in its place."""
    import torch

    routes = {}
    todo = [v for v in variants if not (v[1] and args.no_compile)]
    while todo:
        name, compile, build, fallback = todo.pop(0)
        try:
            with torch.no_grad():
                step = build()
                t = time.perf_counter()
                warm(step)
                first = time.perf_counter() - t
                out, wall, busy = timed(run, step)
        except Exception as e:  # noqa: BLE001 - a failed compile is a result to report
            short = " ".join(str(e).split())[:240]
            print(f"  {name} failed: {type(e).__name__}: {short}", flush=True)
            routes[name] = dict(
                failed=f"{type(e).__name__}: {str(e)[:2000]}", torch_compile=compile
            )
            if fallback is not None:
                todo.insert(0, fallback)
            continue
        routes[name] = dict(
            run_s=wall, cores_busy=busy, warm_up_s=first, torch_compile=compile, exponents=out
        )
    return routes


def best_torch(routes):
    ok = {k: v for k, v in routes.items() if k.startswith("torch") and "run_s" in v}
    return min(ok, key=lambda k: ok[k]["run_s"]) if ok else None


def print_routes(title, routes, limit_s):
    print(title, flush=True)
    for name, r in routes.items():
        if "run_s" not in r:
            print(f"  {name:15s} failed (see above and the JSON)", flush=True)
            continue
        acc = ", ".join(
            f"{k} {v:.1e}" if isinstance(v, float) else f"{k} {np.round(v, 4).tolist()}"
            for k, v in r.items()
            if k.startswith(("mean_", "vs_"))
        )
        extra = f" (first call {r['first_call_s']:.1f} s)" if "first_call_s" in r else ""
        extra += f" (warm-up {r['warm_up_s']:.1f} s)" if "warm_up_s" in r else ""
        extra += " [extrapolated]" if r.get("extrapolated") else ""
        print(
            f"  {name:15s} {r['run_s']:8.3f} s{extra}, cores busy {r['cores_busy']:.2f}, "
            f"{r['run_s'] / limit_s:,.0f}x the flop limit; {acc}",
            flush=True,
        )


# --- the workloads


def lorenz_workload(args, peak, tl):
    steps = max(int(round(10_000 * args.steps_scale)), 2)
    transient = int(round(1000 * args.steps_scale))
    dt = 0.01
    x0 = np.array([1.0, 1.0, 20.0]) + np.random.default_rng(0).standard_normal((args.ics, 3))

    def one_ic(x):
        return jf.lyapunov_spectrum(
            lorenz,
            x,
            0.0,
            steps * dt,
            steps=steps,
            transient_time=transient * dt,
            save_stretch=False,
        ).exponents

    run = jax.jit(jax.vmap(one_ic))
    _, first, _ = timed(run, jnp.asarray(x0))
    jx, t_jax, busy = timed(run, jnp.asarray(x0))
    jx = np.asarray(jx)
    routes = dict(
        jaxflow=dict(run_s=t_jax, cores_busy=busy, first_call_s=first, exponents=jx),
    )
    # the same, spread over every CPU device (a share of the ICs each)
    every = jax.jit(lambda x0: jf.batch_map(one_ic, x0))
    _, first, _ = timed(every, jnp.asarray(x0))
    ex, t_every, busy = timed(every, jnp.asarray(x0))
    routes["jaxflow_every_device"] = dict(
        run_s=t_every, cores_busy=busy, first_call_s=first, exponents=np.asarray(ex)
    )
    loop_ics = min(args.loop_ics, args.ics)
    loop, t_loop, busy = timed(
        lambda: np.concatenate(
            [numpy_lorenz_spectrum(x0[i : i + 1], steps, transient, dt) for i in range(loop_ics)]
        )
    )
    routes["numpy_loop"] = dict(
        run_s=t_loop * args.ics / loop_ics,
        cores_busy=busy,
        extrapolated=True,
        timed_ics=loop_ics,
        exponents=loop,
    )
    nb, t_batch, busy = timed(numpy_lorenz_spectrum, x0, steps, transient, dt)
    routes["numpy_batched"] = dict(run_s=t_batch, cores_busy=busy, exponents=nb)
    if tl is not None:
        tableau = diffrax.Tsit5.tableau.a_lower, diffrax.Tsit5.tableau.b_sol
        routes.update(
            torch_routes(
                args,
                [
                    (name, c, partial(tl.lorenz_step_fn, SIGMA, RHO, BETA, *tableau, c), None)
                    for name, c in (("torch_compiled", True), ("torch_eager", False))
                ],
                run=lambda step: tl.lorenz_spectrum(step, x0, steps, transient, dt),
                warm=lambda step: tl.lorenz_spectrum(step, x0, 2, 1, dt),
            )
        )
        for name in ("torch_compiled", "torch_eager"):
            if name in routes:
                routes[name]["jacobian"] = "analytic"

    # accuracy: the mean spectrum against the reference, each IC against jaxflow
    for r in routes.values():
        if "exponents" not in r:
            continue
        ex = np.asarray(r["exponents"])
        r["mean_exponents"] = ex.mean(0)
        r["mean_vs_reference_max"] = float(np.max(np.abs(ex.mean(0) - np.array(REFERENCE))))
        gap = np.max(np.abs(ex - jx[: len(ex)]), axis=1)
        r["vs_jaxflow_per_ic_max"] = float(gap.max())
        r["vs_jaxflow_per_ic_median"] = float(np.median(gap))

    # the flop limit: one IC's step of the jaxflow loop
    step = tsit5_step(lambda y: lorenz(y, 0.0), dt)
    one = pushed_step(step)
    xla = xla_flops(one, jnp.asarray(x0[0]), jnp.eye(3))
    sol = diffrax.Tsit5(scan_kind="lax")
    term = diffrax.ODETerm(lambda t, y, a: lorenz(y, t))

    def diffrax_step(y):
        state = sol.init(term, 0.0, dt, y, None)
        return sol.step(term, 0.0, dt, y, None, state, made_jump=False)[0]

    limit = flop_limit(xla + lapack_qr_flops(3), steps, args.ics, peak)
    limit.update(
        xla_flops_step=xla,
        lapack_qr_flops=lapack_qr_flops(3),
        xla_flops_diffrax_step_stage_loop_counted_once=xla_flops(
            pushed_step(diffrax_step), jnp.asarray(x0[0]), jnp.eye(3)
        ),
        counted=(
            "XLA cost analysis of one IC's step: diffrax's Tsit5 step of Lorenz with its 6 "
            "stages unrolled (the same map as jaxflow's), its JVPs along the 3 frame "
            "columns (vmap), jnp.linalg.qr, signs and log|diag R|; plus LAPACK's 8/3 n^3 "
            "for the QR (geqrf + orgqr custom calls, counted 0 by XLA). Times steps x ICs "
            "(transient steps included)."
        ),
    )
    times_limit(routes, limit)
    out = dict(
        ics=args.ics,
        steps=steps,
        transient_steps=transient,
        dt=dt,
        reference=REFERENCE,
        routes=routes,
        best_torch=best_torch(routes),
        flop_limit=limit,
        # the keys of the earlier JSON
        jaxflow_compile_and_first_run_s=first,
        jaxflow_run_s=t_jax,
        numpy_loop_s_extrapolated=routes["numpy_loop"]["run_s"],
        numpy_batched_s=t_batch,
        speedup_vs_loop=routes["numpy_loop"]["run_s"] / t_jax,
        speedup_vs_batched=t_batch / t_jax,
        jaxflow_mean_exponents=jx.mean(0),
        numpy_mean_exponents=nb.mean(0),
    )
    print_routes(
        f"Lorenz, {args.ics} ICs x {steps} steps (dt {dt}, {transient} transient); flop limit "
        f"{limit['limit_s']:.2e} s ({limit['flops_per_step']:.0f} flops/step at "
        f"{peak:.1f} GFLOP/s); reference {REFERENCE}:",
        routes,
        limit["limit_s"],
    )
    if out["best_torch"]:
        print(f"  best PyTorch: {out['best_torch']}", flush=True)
    return out


def path_coefficients(path, ts):
    """`(steps, 4)`: alpha, sigma, f, g^2 of the path at the times `ts`."""
    return np.stack(
        [
            [
                float(path.alpha(t)),
                float(path.sigma(t)),
                float(path.drift_coefficient(t)),
                float(path.diffusion_squared(t)),
            ]
            for t in ts
        ]
    )


def moons_workload(args, peak, tl):
    nodes, _ = moons(400)
    field = moons_field(nodes)
    path = field.path
    m_steps = max(int(round(1000 * args.steps_scale)), 2)
    t_start, t_end = 0.999, 1e-3
    h = (t_start - t_end) / m_steps
    kz, kn = jax.random.split(jax.random.PRNGKey(0))
    z = float(path.sigma(t_start)) * jax.random.normal(kz, (args.paths, 2), jnp.float64)
    noise = jax.random.normal(kn, (args.paths, m_steps, 2), jnp.float64)

    def one(z, noise):
        def step(x, i):
            return jf.reverse_sde_step(field, x, t_start - i * h, h, noise[i])

        return jf.lyapunov_spectrum_of_map(step, z, m_steps, save_stretch=False).exponents

    run = jax.jit(jax.vmap(one))
    _, first, _ = timed(run, z, noise)
    jm, t_jax, busy = timed(run, z, noise)
    jm = np.asarray(jm)
    routes = dict(jaxflow=dict(run_s=t_jax, cores_busy=busy, first_call_s=first, exponents=jm))
    every = jax.jit(lambda z, noise: jf.batch_map(lambda a: one(*a), (z, noise)))
    _, first, _ = timed(every, z, noise)
    em, t_every, busy = timed(every, z, noise)
    routes["jaxflow_every_device"] = dict(
        run_s=t_every, cores_busy=busy, first_call_s=first, exponents=np.asarray(em)
    )
    nm, t_np, busy = timed(
        numpy_moons_spectrum,
        numpy_reverse_drift(nodes, path),
        np.asarray(z),
        np.asarray(noise),
        t_start,
        h,
    )
    routes["numpy_batched_fd"] = dict(run_s=t_np, cores_busy=busy, exponents=nm)
    if tl is not None:
        coefs = path_coefficients(path, t_start - np.arange(m_steps) * h)
        z_np, noise_np = np.asarray(z), np.asarray(noise)
        routes.update(
            torch_routes(
                args,
                [
                    (
                        "torch_compiled",
                        True,
                        partial(tl.moons_step_fn, nodes, True, "jacfwd"),
                        # vmap(jacfwd) does not compile in torch 2.13 (pytorch#151196)
                        (
                            "torch_compiled_jacrev",
                            True,
                            partial(tl.moons_step_fn, nodes, True, "jacrev"),
                            None,
                        ),
                    ),
                    ("torch_eager", False, partial(tl.moons_step_fn, nodes, False, "jacfwd"), None),
                ],
                run=lambda step: tl.moons_spectrum(step, z_np, noise_np, h, coefs),
                warm=lambda step: tl.moons_spectrum(step, z_np, noise_np[:, :2], h, coefs[:2]),
            )
        )
        for name, how in (
            ("torch_compiled", "vmap(jacfwd)"),
            ("torch_compiled_jacrev", "vmap(jacrev)"),
            ("torch_eager", "vmap(jacfwd)"),
        ):
            if name in routes:
                routes[name]["jacobian"] = how
    for r in routes.values():
        if "exponents" in r:
            gap = np.max(np.abs(np.asarray(r["exponents"]) - jm), axis=1)
            r["vs_jaxflow_per_path_max"] = float(gap.max())
            r["vs_jaxflow_per_path_median"] = float(np.median(gap))

    # the flop limit: one path's EM step of the jaxflow loop
    one_step = pushed_step(lambda y, t, xi: jf.reverse_sde_step(field, y, t, h, xi))
    xla = xla_flops(one_step, z[0], jnp.eye(2), jnp.asarray(0.5), noise[0, 0])
    limit = flop_limit(xla + lapack_qr_flops(2), m_steps, args.paths, peak)
    limit.update(
        xla_flops_step=xla,
        lapack_qr_flops=lapack_qr_flops(2),
        counted=(
            "XLA cost analysis of one path's step: jf.reverse_sde_step through the "
            "800-node exact score, its JVPs along the 2 frame columns (vmap), "
            "jnp.linalg.qr, signs and log|diag R| (exp counted as a transcendental, not "
            "a flop); plus LAPACK's 8/3 n^3 for the QR. Times steps x paths."
        ),
    )
    times_limit(routes, limit)
    gap = routes["numpy_batched_fd"]["vs_jaxflow_per_path_max"]
    out = dict(
        paths=args.paths,
        steps=m_steps,
        routes=routes,
        best_torch=best_torch(routes),
        flop_limit=limit,
        # the keys of the earlier JSON
        jaxflow_compile_and_first_run_s=first,
        jaxflow_run_s=t_jax,
        numpy_batched_fd_s=t_np,
        speedup=t_np / t_jax,
        max_abs_exponent_gap=gap,
    )
    print_routes(
        f"two moons, {args.paths} paths x {m_steps} EM steps; flop limit "
        f"{limit['limit_s']:.2e} s ({limit['flops_per_step']:.0f} flops/step at "
        f"{peak:.1f} GFLOP/s):",
        routes,
        limit["limit_s"],
    )
    if out["best_torch"]:
        print(f"  best PyTorch: {out['best_torch']}", flush=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ics", type=int, default=64)
    p.add_argument("--loop-ics", type=int, default=4, help="ICs timed in the per-IC loop")
    p.add_argument("--paths", type=int, default=400)
    p.add_argument(
        "--steps-scale",
        type=float,
        default=1.0,
        help="scale the step counts (Lorenz 10^4 steps of dt 0.01, 10^3 transient; moons "
        "10^3 EM steps over the same time span) for smoke runs",
    )
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch routes")
    p.add_argument("--no-compile", action="store_true", help="PyTorch eager only")
    p.add_argument(
        "--torch-threads", type=int, default=None, help="torch's threads (default all cores)"
    )
    p.add_argument("--peak-size", type=int, default=2048, help="matmul size for the peak")
    p.add_argument("--peak-repeats", type=int, default=3)
    p.add_argument("--out", default="out")
    p.add_argument("--json", default=None, help="default OUT/lyapunov_benchmark.json")
    p.add_argument(
        "--cpu-devices",
        type=int,
        default=os.cpu_count(),
        help="JAX CPU devices, one per core by default (jf.use_cpu_devices); the "
        "'every device' routes spread over them",
    )
    args = p.parse_args()
    out = args.json or os.path.join(args.out, "lyapunov_benchmark.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    report = dict(
        environment=dict(
            jax=jax.__version__,
            backend=jax.default_backend(),
            device=str(jax.devices()[0]),
            cpu_count=os.cpu_count(),
            cpu_devices=CPU_DEVICES,
            machine=platform.machine(),
        ),
        args=vars(args),
    )
    tl, report["torch"] = load_torch(args)
    peak = peak_gflops(jnp.float64, args.peak_size, args.peak_repeats)
    report["peak"] = dict(gflops=peak, size=args.peak_size, repeats=args.peak_repeats)
    print(
        f"float64 peak: {peak:.1f} GFLOP/s ({args.peak_size}^2 jnp.dot, best of "
        f"{args.peak_repeats})",
        flush=True,
    )
    report["lorenz"] = lorenz_workload(args, peak, tl)
    report["moons"] = moons_workload(args, peak, tl)
    with open(out, "w") as f:
        json.dump(report, f, indent=1, default=lambda o: np.asarray(o).tolist())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
