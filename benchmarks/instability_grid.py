"""Paper 000 Fig. 3 workload: G and its exact 2x2 Jacobian on a 201 x 201 grid.

The field: `jf.AnalyticField(jf.data.fig3_mixture(dtype), jf.RectifiedFlow())`;
generation integrates the probability-flow ODE from t = 1 to t = 0 with adaptive
Dopri5 (rtol 1e-6, atol 1e-8), float64 unless `--dtype float32`. In one process,
for every route, on the whole `(N, 2)` grid:

- jaxflow (`jaxflow_routes`): `generate_with_jacobian` (the variational equation)
  in `jf.batch_map(256)` and in one `vmap`, `jacfwd(generate)` in `batch_map(256)`,
  and `generate` alone in `batch_map(256)`; each route jit-compiled over the whole
  batch (compile time reported apart), then timed (best of `--repeats`).
- PyTorch (`benchmarks/_torch_fig3.py`, skipped with a message when torch or
  torchdiffeq is missing): torchdiffeq dopri5 of the variational equation and of G
  alone (compiled or eager right-hand side, batch-joint or per-point error norm)
  and a hand-written whole-batch Dopri5 with a step size per point, its whole step
  `torch.compile`d. `--no-compile` runs them eagerly (for the smoke test). On a
  machine with a GPU both libraries run there (`--torch-device`; jaxflow on JAX's
  default device): `benchmarks/gpu_run.sh` with `PARTS=grid`.
- scipy: a Python loop of `solve_ivp(method="RK45")` with forward finite
  differences for the Jacobian, timed on `--scipy-points` points and extrapolated.

Reported per route: points/s, compile time apart (torch: first call minus the
best timed call), cores busy (process CPU time / wall time over the timed calls,
`resource.getrusage`), accuracy against a tight reference on `--ref-points` random
grid points (jaxflow `generate_with_jacobian` at rtol = atol = 1e-12, float64,
vmapped; itself checked against scipy DOP853 at 1e-13 for G), and the distance
from a rough flop limit: peak float64 GFLOP/s of a 2048^2 `jnp.dot` (`--peak-size`;
a smaller one for the smoke test) / (XLA's flop count of one right-hand-side
evaluation x the mean evaluations a point needs, measured by diffrax Dopri5 +
PIDController at the benchmark's tolerances).

    python benchmarks/instability_grid.py [--grid 201] [--routes SUBSTR,...] [--json out.json]
"""

import argparse
import json
import os
import platform
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import diffrax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from scipy.integrate import solve_ivp  # noqa: E402

import jaxflow as jf  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _common import cpu_devices_flag, cpu_seconds, peak_gflops, xla_cost  # noqa: E402

CPU_DEVICES = jf.use_cpu_devices(cpu_devices_flag())

RTOL, ATOL = 1e-6, 1e-8
REF_TOL = 1e-12


def jaxflow_routes(field, rtol, atol):
    """jaxflow's routes: `({name: fn(zs) -> (x, jac)}, {name: fn(zs) -> x})`, G with
    its Jacobian and G alone; each `fn` maps the whole `(N, n)` batch and is
    jit-able. "one device" routes stay on the default device (`mesh=None`), "every
    device" ones spread over every CPU device that `--cpu-devices` made."""
    kw = dict(rtol=rtol, atol=atol)

    def gj(z):
        return jf.generate_with_jacobian(field, z, **kw)

    def g(z):
        return jf.generate(field, z, **kw)

    def jacfwd_g(z):
        return g(z), jax.jacfwd(g)(z)

    def batch(schedule, jacobian, mesh):
        return lambda zs: jf.batch_generate(
            field, zs, jacobian=jacobian, schedule=schedule, mesh=mesh, **kw
        )

    with_jacobian = {
        "jaxflow generate_with_jacobian, batch_map(256), one device": lambda zs: jf.batch_map(
            gj, zs, batch_size=256, mesh=None
        ),
        "jaxflow generate_with_jacobian, one vmap": jax.vmap(gj),
        "jaxflow jacfwd(generate), batch_map(256), one device": lambda zs: jf.batch_map(
            jacfwd_g, zs, batch_size=256, mesh=None
        ),
    }
    alone = {
        "jaxflow generate, batch_map(256), one device": lambda zs: jf.batch_map(
            g, zs, batch_size=256, mesh=None
        ),
    }
    for where, mesh in (("one device", None), ("every device", "auto")):
        for schedule in (jf.LaneRefill(), jf.JointSteps()):
            label = type(schedule).__name__
            with_jacobian[f"jaxflow batch_generate(jacobian=True), {label}, {where}"] = batch(
                schedule, True, mesh
            )
            alone[f"jaxflow batch_generate, {label}, {where}"] = batch(schedule, False, mesh)
    with_jacobian["jaxflow generate_with_jacobian, batch_map, every device"] = lambda zs: (
        jf.batch_map(gj, zs)
    )
    return with_jacobian, alone


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


def scipy_point(v, z, rtol, atol, h=1e-6):
    def g(y):
        sol = solve_ivp(v, (1.0, 0.0), y, method="RK45", rtol=rtol, atol=atol)
        return sol.y[:, -1]

    x = g(z)
    jac = np.stack([(g(z + h * e) - x) / h for e in np.eye(len(z))], axis=1)
    return x, jac


def timed(fn, *args, repeats=3):
    """Best wall time of `repeats` calls, the cores busy over them (process CPU
    time / wall time) and the last output."""
    best, wall, cpu0 = np.inf, 0.0, cpu_seconds()
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        dt = time.perf_counter() - t0
        best, wall = min(best, dt), wall + dt
    return out, best, (cpu_seconds() - cpu0) / wall


def accuracy(x, jac, x_ref, j_ref):
    """Median / max |G - G_ref| (max-norm over coordinates) and median / max of
    ||J - J_ref||_F / ||J_ref||_F over the reference points."""
    dx = np.max(np.abs(np.asarray(x, np.float64) - x_ref), axis=1)
    out = dict(G_err_median=float(np.median(dx)), G_err_max=float(np.max(dx)))
    if jac is not None:
        rel = np.linalg.norm(np.asarray(jac, np.float64) - j_ref, axis=(1, 2))
        rel /= np.linalg.norm(j_ref, axis=(1, 2))
        out.update(J_rel_err_median=float(np.median(rel)), J_rel_err_max=float(np.max(rel)))
    return out


def _flops(fn, *args):
    cost = xla_cost(fn, *args)
    return float(cost["flops"]), float(cost.get("transcendentals", 0.0))


def flop_limit(field, zs, rtol, atol, peak_size=2048):
    """Flops of one right-hand-side evaluation (XLA cost analysis, one point) for
    the PF-ODE and its variational equation, the diffrax Dopri5 + PIDController
    steps a point takes on the grid (`sol.stats['num_steps']`, rejected steps
    included) and the points/s a machine at peak matmul GFLOP/s would reach."""
    dtype = zs.dtype
    n = zs.shape[1]
    t = jnp.asarray(0.5, dtype)

    def velocity(t, x):
        return field.velocity_unchecked(x, t)

    def variational(t, y):  # as jf.generate_with_jacobian's right-hand side
        x, jac = y
        return jax.vmap(
            lambda col: jax.jvp(lambda p: velocity(t, p), (x,), (col,)),
            in_axes=1,
            out_axes=(None, 1),
        )(jac)

    eye = jnp.eye(n, dtype=dtype)
    flops_v, trans_v = _flops(velocity, t, zs[0])
    flops_var, trans_var = _flops(variational, t, (zs[0], eye))

    def steps(rhs, y0):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, args: rhs(t, y)),
            diffrax.Dopri5(),
            t0=jnp.asarray(1.0, dtype),
            t1=jnp.asarray(0.0, dtype),
            dt0=None,
            y0=y0,
            saveat=diffrax.SaveAt(t1=True),
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
            max_steps=100_000,
        )
        return sol.stats["num_steps"]

    # per-point counts: batch_map is vmap in chunks, each lane counts its own steps
    count = jax.jit(
        lambda zs: (
            jf.batch_map(lambda z: steps(variational, (z, eye)), zs, batch_size=256),
            jf.batch_map(lambda z: steps(velocity, z), zs, batch_size=256),
        )
    )
    steps_var, steps_v = (np.asarray(s) for s in count(zs))
    # evaluations: 6 a step (Dopri5 is first-same-as-last; rejected steps count),
    # + 1 for the first stage; diffeqsolve wraps its term, so its first step is a
    # fixed 0.01 and its initial step-size search (2 more) never runs
    evals_var, evals_v = 6 * steps_var + 1, 6 * steps_v + 1
    peak = peak_gflops(dtype, peak_size)

    def part(flops, transcendentals, steps, evals):
        flops_per_point = flops * float(np.mean(evals))
        return dict(
            flops_per_eval=flops,
            transcendentals_per_eval=transcendentals,
            steps_median=float(np.median(steps)),
            steps_mean=float(np.mean(steps)),
            steps_max=int(np.max(steps)),
            evals_mean=float(np.mean(evals)),
            flops_per_point=flops_per_point,
            limit_points_per_s=peak * 1e9 / flops_per_point,
        )

    out = dict(
        peak_gflops=peak,
        variational=part(flops_var, trans_var, steps_var, evals_var),
        velocity=part(flops_v, trans_v, steps_v, evals_v),
    )
    return out


def reference(zs_ref):
    """G and J at rtol = atol = 1e-12, float64, vmapped."""
    field = jf.AnalyticField(jf.data.fig3_mixture(jnp.float64), jf.RectifiedFlow())
    fn = jax.jit(
        jax.vmap(lambda z: jf.generate_with_jacobian(field, z, rtol=REF_TOL, atol=REF_TOL))
    )
    x, jac = jax.block_until_ready(fn(jnp.asarray(zs_ref, jnp.float64)))
    return np.asarray(x), np.asarray(jac), field


def selected(name, filters):
    return not filters or any(f in name for f in filters)


def run_torch_routes(args, field, zs_np, ref_idx, x_ref, j_ref, filters, results):
    try:
        import torch  # noqa: F401
        import torchdiffeq  # noqa: F401
    except ImportError as e:
        print(f"PyTorch routes skipped: {e} (pip install torch torchdiffeq)")
        return dict(available=False, reason=str(e))
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    import _torch_fig3 as tf

    device = args.torch_device or ("cuda" if torch.cuda.is_available() else "cpu")
    info = tf.setup(device)
    info.update(available=True, torch_compile=not args.no_compile)
    tdtype = dict(float64=torch.float64, float32=torch.float32)[args.dtype]
    law = field.law
    mix = tf.Mixture(law.weights, law.means, np.asarray(law.eigvals)[:, 0], tdtype)
    info["Dv_closed_form_vs_jacrev_max"] = tf.check_jacobian(mix)
    z = torch.tensor(np.array(zs_np), dtype=tdtype)
    with_jac, alone = tf.routes(mix, args.rtol, args.atol, compile=not args.no_compile)
    for kind, registry in (("G+J", with_jac), ("G", alone)):
        for name, (fn, counters) in registry.items():
            if not selected(name, filters):
                continue
            (x, jac), first_s, run_s, busy, calls = tf.timed(fn, z, args.repeats, cpu_seconds)
            r = dict(
                library="torch",
                kind=kind,
                compile_s=max(first_s - run_s, 0.0),
                first_call_s=first_s,
                run_s=run_s,
                points_per_s=len(zs_np) / run_s,
                cores_busy=busy,
                timed_calls=calls,
                torch_compile=not args.no_compile and "eager" not in name,
                **counters(),
            )
            x = x.cpu().numpy()[ref_idx]
            jac = None if jac is None else jac.cpu().numpy()[ref_idx]
            r.update(accuracy(x, jac, x_ref, j_ref))
            results[name] = r
            print_route(name, r)
    return info


def print_route(name, r):
    acc = f"|G-Gref| med {r['G_err_median']:.1e} max {r['G_err_max']:.1e}"
    if "J_rel_err_median" in r:
        acc += f"; J rel med {r['J_rel_err_median']:.1e} max {r['J_rel_err_max']:.1e}"
    comp = "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
    print(
        f"{name}: compile {comp} s, run {r['run_s']:.3f} s, "
        f"{r['points_per_s']:,.0f} points/s, cores busy {r['cores_busy']:.2f}; {acc}",
        flush=True,
    )


def table(results, limit):
    head = (
        "| route | output | compile (s) | run (s) | points/s | cores busy | "
        "median / max G err | median / max J rel err | x from flop limit |"
    )
    lines = [head, "|" + "---|" * 9]
    for name, r in results.items():
        jerr = (
            f"{r['J_rel_err_median']:.1e} / {r['J_rel_err_max']:.1e}"
            if "J_rel_err_median" in r
            else "-"
        )
        comp = "-" if r.get("compile_s") is None else f"{r['compile_s']:.1f}"
        fr = "-" if limit is None else f"{r['x_from_limit']:,.0f}x"
        lines.append(
            f"| {name} | {r['kind']} | {comp} | {r['run_s']:.3g} | {r['points_per_s']:,.1f} "
            f"| {r['cores_busy']:.2f} | {r['G_err_median']:.1e} / {r['G_err_max']:.1e} "
            f"| {jerr} | {fr} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--grid", type=int, default=201)
    parser.add_argument(
        "--cpu-devices",
        type=int,
        default=os.cpu_count(),
        help="JAX CPU devices, one per core by default (jf.use_cpu_devices); the "
        "'every device' routes spread over them",
    )
    parser.add_argument("--routes", default="", help="comma-separated substrings; default all")
    parser.add_argument(
        "--scipy-points", type=int, default=100, help="points timed for scipy; 0 skips it"
    )
    parser.add_argument("--ref-points", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="PyTorch routes run eagerly")
    parser.add_argument(
        "--torch-device",
        default=None,
        help="'cpu' or 'cuda'; default cuda where torch sees a GPU (then jaxflow's "
        "routes run on JAX's default device, the GPU, too)",
    )
    parser.add_argument("--no-limit", action="store_true", help="skip the flop limit")
    parser.add_argument(
        "--peak-size", type=int, default=2048, help="matmul size for the flop limit's peak"
    )
    parser.add_argument("--json", default=None, help="write the figures to this file")
    parser.add_argument(
        "--dtype",
        default="float64",
        choices=["float64", "float32"],
        help="jaxflow's and torch's dtype (scipy and the reference stay float64)",
    )
    args = parser.parse_args()
    args.rtol, args.atol = RTOL, ATOL
    filters = [f for f in args.routes.split(",") if f]

    dtype = jnp.dtype(args.dtype)
    field = jf.AnalyticField(jf.data.fig3_mixture(dtype), jf.RectifiedFlow())
    axis = jnp.linspace(-1.0, 1.0, args.grid, dtype=dtype)
    zs = jnp.stack(jnp.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    npts = zs.shape[0]
    zs_np = np.asarray(zs)
    print(
        f"{args.grid} x {args.grid} grid ({npts:,} points), {args.dtype}, rtol {RTOL:g}, "
        f"atol {ATOL:g}, {os.cpu_count()} cores, {jax.device_count()} JAX devices, "
        f"jax {jax.__version__} ({jax.default_backend()})",
        flush=True,
    )

    # the reference points: a random subset; scipy's points are its first ones
    perm = np.random.default_rng(0).permutation(npts)
    n_ref = min(max(args.ref_points, args.scipy_points), npts)
    ref_idx = perm[:n_ref]
    t0 = time.perf_counter()
    x_ref, j_ref, field64 = reference(zs_np[ref_idx].astype(np.float64))
    ref_s = time.perf_counter() - t0
    acc_idx = perm[: min(args.ref_points, npts)]
    xa, ja = x_ref[: len(acc_idx)], j_ref[: len(acc_idx)]
    v = numpy_velocity(jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), field64.law))
    n_chk = min(20, n_ref)
    dop = np.stack(
        [
            solve_ivp(
                v, (1.0, 0.0), zs_np[i].astype(np.float64), "DOP853", rtol=1e-13, atol=1e-13
            ).y[:, -1]
            for i in ref_idx[:n_chk]
        ]
    )
    ref_check = float(np.max(np.abs(dop - x_ref[:n_chk])))
    print(
        f"reference: jaxflow generate_with_jacobian at rtol = atol = {REF_TOL:g}, float64, "
        f"{n_ref} points ({ref_s:.1f} s, compile included); max |G_ref - G_DOP853(1e-13)| "
        f"on {n_chk} of them = {ref_check:.1e}",
        flush=True,
    )

    results = {}
    gj, g = jaxflow_routes(field, RTOL, ATOL)
    for kind, registry in (("G+J", gj), ("G", g)):
        for name, fn in registry.items():
            if not selected(name, filters):
                continue
            t0 = time.perf_counter()
            compiled = jax.jit(fn).lower(zs).compile()
            compile_s = time.perf_counter() - t0
            out, run_s, busy = timed(compiled, zs, repeats=args.repeats)
            x, jac = out if kind == "G+J" else (out, None)
            r = dict(
                library="jaxflow",
                kind=kind,
                compile_s=compile_s,
                run_s=run_s,
                points_per_s=npts / run_s,
                cores_busy=busy,
            )
            r.update(
                accuracy(
                    np.asarray(x)[acc_idx],
                    None if jac is None else np.asarray(jac)[acc_idx],
                    xa,
                    ja,
                )
            )
            results[name] = r
            print_route(name, r)

    torch_info = run_torch_routes(args, field, zs_np, acc_idx, xa, ja, filters, results)

    scipy_names = (
        "scipy solve_ivp RK45 loop + forward differences",
        "scipy solve_ivp RK45 loop, G alone",
    )
    if args.scipy_points > 0 and any(selected(s, filters) for s in scipy_names):
        idx = perm[: min(args.scipy_points, npts)]
        pts = zs_np[idx].astype(np.float64)
        for name, kind in zip(scipy_names, ("G+J", "G"), strict=True):
            if not selected(name, filters):
                continue
            cpu0, t0 = cpu_seconds(), time.perf_counter()
            if kind == "G+J":
                outs = [scipy_point(v, p, RTOL, ATOL) for p in pts]
                x, jac = np.stack([o[0] for o in outs]), np.stack([o[1] for o in outs])
            else:
                x = np.stack(
                    [
                        solve_ivp(v, (1.0, 0.0), p, method="RK45", rtol=RTOL, atol=ATOL).y[:, -1]
                        for p in pts
                    ]
                )
                jac = None
            wall = time.perf_counter() - t0
            r = dict(
                library="scipy",
                kind=kind,
                compile_s=None,
                points=len(idx),
                seconds=wall,
                run_s=wall * npts / len(idx),  # extrapolated to the grid
                points_per_s=len(idx) / wall,
                cores_busy=(cpu_seconds() - cpu0) / wall,
            )
            r.update(
                accuracy(x, jac, x_ref[: len(idx)], None if jac is None else j_ref[: len(idx)])
            )
            results[name] = r
            print_route(name + f" ({len(idx)} points, run extrapolated to the grid)", r)

    limit = None
    if not args.no_limit:
        t0 = time.perf_counter()
        limit = flop_limit(field, zs, RTOL, ATOL, args.peak_size)
        limit["seconds"] = time.perf_counter() - t0
        for part, label in (("variational", "G+J"), ("velocity", "G alone")):
            d = limit[part]
            print(
                f"flop limit, {label}: {d['flops_per_eval']:.0f} flops "
                f"(+ {d['transcendentals_per_eval']:.0f} transcendentals) an evaluation (XLA), "
                f"diffrax Dopri5 steps a point median {d['steps_median']:.0f}, mean "
                f"{d['steps_mean']:.1f}, max {d['steps_max']} -> {d['evals_mean']:.1f} "
                f"evaluations (6 a step + 1), {d['flops_per_point']:,.0f} flops a point; "
                f"at {limit['peak_gflops']:.1f} GFLOP/s ({args.dtype} {args.peak_size}^2 "
                "matmul peak): "
                f"{d['limit_points_per_s']:,.0f} points/s"
            )
        for r in results.values():
            lim = limit["variational" if r["kind"] == "G+J" else "velocity"]
            r["limit_points_per_s"] = lim["limit_points_per_s"]
            r["fraction_of_limit"] = r["points_per_s"] / lim["limit_points_per_s"]
            r["x_from_limit"] = 1 / r["fraction_of_limit"]

    print()
    print(table(results, limit))

    summary = dict(
        grid=args.grid,
        dtype=args.dtype,
        points=npts,
        rtol=RTOL,
        atol=ATOL,
        repeats=args.repeats,
        reference=dict(
            method=f"jaxflow generate_with_jacobian, rtol = atol = {REF_TOL:g}, float64, vmap",
            points=int(len(acc_idx)),
            seconds=ref_s,
            max_abs_diff_G_vs_DOP853_1e13=ref_check,
            DOP853_points=n_chk,
        ),
        routes=results,
        flop_limit=limit,
        torch=torch_info,
        jax_version=jax.__version__,
        diffrax_version=diffrax.__version__,
        backend=jax.default_backend(),
        cpu_count=os.cpu_count(),
        cpu_devices=CPU_DEVICES,
        machine=platform.machine(),
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
