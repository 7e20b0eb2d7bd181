"""Paper 000 Fig. 3 workload: G and its exact 2x2 Jacobian on a 201 x 201 grid.

jaxflow (one jit-compiled vmap of an adaptive Dopri5 solve of the variational
equation) against what a researcher would otherwise write: a Python loop of
`scipy.integrate.solve_ivp(method="RK45")` with forward finite differences for the
Jacobian (timed on a subset and extrapolated). Same tolerances (rtol 1e-6,
atol 1e-8), float64 throughout, one process.

    python benchmarks/instability_grid.py [--grid 201] [--scipy-points 300]
"""

import argparse
import json
import os
import platform
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from scipy.integrate import solve_ivp  # noqa: E402

import jaxflow as jf  # noqa: E402

RTOL, ATOL = 1e-6, 1e-8


def numpy_velocity(law):
    """The rectified-flow velocity of an isotropic mixture, in plain numpy."""
    w = np.asarray(law.weights)
    mu = np.asarray(law.means)
    var = np.asarray(law.eigvals)[:, 0]

    def v(t, x):
        a, s = 1.0 - t, t
        c = a * a * var + s * s
        resid = x[None, :] - a * mu
        logits = np.log(w) - 0.5 * (mu.shape[1] * np.log(c) + (resid**2).sum(1) / c)
        r = np.exp(logits - logits.max())
        r /= r.sum()
        score = -(resid / c[:, None])
        d = mu + a * var[:, None] * (resid / c[:, None])
        return -(r @ d) - s * (r @ score)

    return v


def scipy_point(v, z, h=1e-6):
    def g(y):
        sol = solve_ivp(v, (1.0, 0.0), y, method="RK45", rtol=RTOL, atol=ATOL)
        return sol.y[:, -1]

    x = g(z)
    jac = np.stack([(g(z + h * e) - x) / h for e in np.eye(len(z))], axis=1)
    return x, jac


def timed(fn, *args, repeats=3):
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return out, best


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--grid", type=int, default=201)
    parser.add_argument("--scipy-points", type=int, default=300)
    parser.add_argument("--json", default=None, help="write the figures to this file")
    parser.add_argument(
        "--dtype",
        default="float64",
        choices=["float64", "float32"],
        help="jaxflow's dtype (scipy always runs in float64)",
    )
    args = parser.parse_args()

    dtype = jnp.dtype(args.dtype)
    field = jf.AnalyticField(jf.data.fig3_mixture(dtype), jf.RectifiedFlow())
    axis = jnp.linspace(-1.0, 1.0, args.grid, dtype=dtype)
    zs = jnp.stack(jnp.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    npts = zs.shape[0]

    routes = {
        "variational (generate_with_jacobian)": lambda z: jf.generate_with_jacobian(
            field, z, rtol=RTOL, atol=ATOL
        ),
        "jacfwd through the solver": lambda z: (
            jf.generate(field, z, rtol=RTOL, atol=ATOL),
            jax.jacfwd(lambda y: jf.generate(field, y, rtol=RTOL, atol=ATOL))(z),
        ),
    }
    results = {}
    variants = {}
    for name, fn in routes.items():
        variants[f"{name}, batch_map(256)"] = lambda zs, fn=fn: jf.batch_map(fn, zs, batch_size=256)
        variants[f"{name}, one vmap"] = jax.vmap(fn)
    for name, fn in variants.items():
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(zs).compile()
        compile_s = time.perf_counter() - t0
        (x, jac), run_s = timed(compiled, zs)
        results[name] = dict(compile_s=compile_s, run_s=run_s, points_per_s=npts / run_s)
        results[name]["_out"] = (np.asarray(x), np.asarray(jac))
        print(
            f"jaxflow {name}: compile {compile_s:.2f} s, run {run_s:.2f} s, "
            f"{npts / run_s:,.0f} points/s"
        )

    rng = np.random.default_rng(0)
    subset = rng.choice(npts, size=min(args.scipy_points, npts), replace=False)
    v = numpy_velocity(jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), field.law))
    t0 = time.perf_counter()
    ref = [scipy_point(v, np.asarray(zs[i], np.float64)) for i in subset]
    scipy_s = time.perf_counter() - t0
    scipy_rate = len(subset) / scipy_s
    print(
        f"scipy solve_ivp RK45 loop + forward differences: {len(subset)} points in "
        f"{scipy_s:.2f} s, {scipy_rate:,.1f} points/s "
        f"(extrapolated {npts / scipy_rate / 60:.1f} min for the grid)"
    )

    t0 = time.perf_counter()
    for i in subset:
        solve_ivp(v, (1.0, 0.0), np.asarray(zs[i], np.float64), method="RK45", rtol=RTOL, atol=ATOL)
    scipy_g_rate = len(subset) / (time.perf_counter() - t0)
    print(f"scipy solve_ivp RK45 loop, G alone: {scipy_g_rate:,.1f} points/s")

    x_ref = np.stack([r[0] for r in ref])
    j_ref = np.stack([r[1] for r in ref])
    best = "variational (generate_with_jacobian), batch_map(256)"
    x_jf, j_jf = results[best]["_out"]
    dx = np.max(np.abs(x_jf[subset] - x_ref))
    rel_j = np.linalg.norm(j_jf[subset] - j_ref, axis=(1, 2)) / np.linalg.norm(j_ref, axis=(1, 2))
    print(
        f"max |G_jaxflow - G_scipy| = {dx:.2e}; Jacobian relative difference "
        f"median {np.median(rel_j):.2e}, max {np.max(rel_j):.2e} (finite differences)"
    )
    for name, r in results.items():
        r.pop("_out")
        r["speedup_vs_scipy"] = r["points_per_s"] / scipy_rate
        r["speedup_vs_scipy_G_alone"] = r["points_per_s"] / scipy_g_rate
        print(
            f"ratio {name} / scipy (G + FD Jacobian): {r['speedup_vs_scipy']:.0f}x "
            f"(vs scipy computing G alone: {r['speedup_vs_scipy_G_alone']:.0f}x)"
        )
    summary = dict(
        grid=args.grid,
        dtype=args.dtype,
        points=npts,
        rtol=RTOL,
        atol=ATOL,
        scipy=dict(
            points=len(subset),
            seconds=scipy_s,
            points_per_s=scipy_rate,
            points_per_s_G_alone=scipy_g_rate,
        ),
        jaxflow=results,
        max_abs_diff_G=float(dx),
        jacobian_rel_diff_median=float(np.median(rel_j)),
        jacobian_rel_diff_max=float(np.max(rel_j)),
        jax_version=jax.__version__,
        backend=jax.default_backend(),
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
