"""Paper 000 Theorems 4.1 and 4.3: the probability of instability against dimension.

`p_gen` is a mixture of Gaussian neighbours meeting Assumption 4.4: m = 3 cubes of
side 0.05 at random places in [0.1, 0.9]^n, at least a side apart, widths w_n chosen
so each component keeps half its mass in its own cube at every n (Assumption 4.4.4,
so w_n shrinks like 1/n), `pi_real` uniform on [0, 1]^n, rectified flow. For each n:

- P_M = pi_real(Ebar_G(G^{-1}(x)) > M) for several M, with Ebar from the exact
  change of variables log Ebar = (log N(z) - log p_gen(x)) / n (Lemma D.1), against
  Theorem 4.1's bound 1 - eps - delta, eps and delta from the same samples;
- M_0 of Theorem 4.3 and the median |G^{-1}(x)|^2 against delta's threshold.

Past n = 1024 (`--large-dims`, default 2048 to 8192, fewer samples) the sweep goes on
with the densities, exact and O(n). The matrix-free Ebar, the route any field has (a
learned one included), is checked against them at `--matrix-free-dims`:
`jf.log_det_estimate(..., inverse=True)`, Hutch++ divergence estimates integrated along
the inversion, with its standard error, at a tight tolerance and at the sweep's. The
divergence here is concentrated in narrow windows of time (the posterior switching
between cubes of width w_n), which a loose adaptive solve steps over: any divergence
route (the exact one of `jf.invert_with_log_det` too) then misses most of log|det|,
while the densities need only z. The dense Jacobian's cost (n JVPs through the solve,
n^2 floats) is measured at `--dense-cost-n` and scaled to say where it stops.

Two checks: the change-of-variables log|det J_G| against the dense Jacobian at
small n, and log Ebar at the sweep's tolerance against a tight solve. A control
law (k^n cubes tiling the cube, small n) shows the bound where delta is small.

    python examples/instability_vs_dimension.py [--dims 2,4,...,1024] [--samples 64]
        [--large-dims 2048,4096,8192] [--large-samples 16] [--matrix-free-dims 16,32]

Writes out/instability_vs_dimension.png and out/instability_vs_dimension.json.
"""

import functools
import time

import jax

jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from _common import Record, parser, progress  # noqa: E402

import jaxflow as jf  # noqa: E402
from jaxflow.data import sparse_neighbours, tiling_neighbours  # noqa: E402

TIGHT = dict(rtol=1e-10, atol=1e-10, max_steps=100_000)


def _jit_tolerance_dynamic(fn):
    """`eqx.filter_jit(fn)` of `fn(..., rtol, max_steps)`, with `rtol` passed as a
    float64 array: `filter_jit` keys its programs on Python floats, so solves that
    differ only in tolerance would each compile their own."""
    jitted = eqx.filter_jit(fn)

    @functools.wraps(fn)
    def call(*args):
        *head, rtol, max_steps = args
        return jitted(*head, jnp.asarray(rtol, jnp.float64), max_steps)

    return call


@_jit_tolerance_dynamic
def _probability(field, x, M, rtol, max_steps):
    return jf.instability_probability(field, x, M, rtol=rtol, atol=rtol, max_steps=max_steps)


@eqx.filter_jit
def _route_check(field, x):
    """`log|det J_G(z)|`, z = G^{-1}(x), by three routes: the divergence integral
    along the inversion (`jf.invert_with_log_det`), the densities at x with a tight
    solve, and the dense Jacobian of the inversion.

    Not along the generation from z: G expands so much there that even at rtol
    1e-10 the regenerated G(z) lands far from x (recorded), so it would follow
    another trajectory. The dense Jacobian of the inversion loses singular values
    below ~1e-16 of the largest to round-off (recorded, not trusted there)."""

    def one(xi):
        z, log_det_inverse = jf.invert_with_log_det(field, xi, **TIGHT)
        dense = -jf.log_abs_det_jacobian(lambda y: jf.invert(field, y, **TIGHT), xi)
        path = field.path
        log_noise = field.law.marginal_log_prob(z, path.alpha(1.0), path.sigma(1.0))
        density = log_noise - field.law.log_prob(xi)
        regenerated = jf.generate(field, z, **TIGHT)
        return -log_det_inverse, density, dense, jnp.linalg.norm(regenerated - xi)

    return jax.vmap(one)(x)


@eqx.filter_jit
def _law_summary(law):
    """A sweep row's numbers of the law in one program (op by op, each n compiled some
    twenty small ones): w_n, the own-box mass, d_min and log M_0."""
    return law.widths[0], law.own_box_mass()[0], law.min_box_distance(), law.theorem_4_3_log_m0()


SKETCH = 4  # Hutch++ sketch columns: the responsibilities' part has rank m - 1 = 2
FREE_SAMPLES = 4  # points per n of the matrix-free check (--quick: 1)


def _problem(args, key, n, count):
    """The Gaussian-neighbour law at `n`, its rectified-flow field and `count`
    uniform samples of `[0, 1]^n` (one key per `n`, so every use draws alike)."""
    law = sparse_neighbours(n, args.m, args.side, args.alpha, seed=args.seed + n)
    x = jax.random.uniform(jax.random.fold_in(key, n), (count, n), jnp.float64)
    return law, jf.AnalyticField(law, jf.RectifiedFlow()), x


@_jit_tolerance_dynamic
def _matrix_free(field, x, key, probes, rtol, max_steps):
    """`log|det J_{G^{-1}}(x)|` for each sample, matrix-free: Hutch++ estimates of the
    divergence integrated along the inversion. `dv/dx` is diagonal within a cube's
    component plus a rank-(m - 1) part from the responsibilities, which dominates
    where they switch: the sketch takes that part exactly (plain Hutchinson's error
    was as large as the value)."""
    keys = jax.random.split(key, x.shape[0])
    return jax.vmap(
        lambda xi, k: jf.log_det_estimate(
            field,
            xi,
            key=k,
            probes=probes,
            sketch=SKETCH,
            method="hutch++",
            inverse=True,
            rtol=rtol,
            atol=rtol,
            max_steps=max_steps,
        )
    )(x, keys)


@_jit_tolerance_dynamic
def _dense_log_det(field, x, rtol, max_steps):
    """The dense route, for its cost: `n` JVPs of the inversion and `slogdet`."""
    return jf.log_abs_det_jacobian(
        lambda y: jf.invert(field, y, rtol=rtol, atol=rtol, max_steps=max_steps), x
    )


def _timed(fn, *a):
    """Seconds of one call after a compiling call."""
    jax.block_until_ready(fn(*a))
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*a))
    return out, time.perf_counter() - start


def rtol_for(n, scale):
    """The inversion's rtol (= atol): the cost of a tight solve grows fast with n
    while log Ebar grows like 1/w_n^2, so the needed relative accuracy falls."""
    return scale * (1e-6 if n <= 8 else 1e-5 if n <= 64 else 1e-4)


def matrix_free_row(args, key, n, samples, Ms):
    """log Ebar matrix-free at a tight tolerance and at the sweep's, against the
    densities, on the same samples."""
    _, field, x = _problem(args, key, n, samples)
    rtol = rtol_for(n, args.rtol_scale)
    # the densities with the same tight solve: at the sweep's rtol, log N(z) is off by
    # about |z| |dz|, hundreds of nats here (|z|^2 is 1e7 times the Gaussian shell's)
    density = np.asarray(
        _probability(field, x, jnp.asarray(Ms), TIGHT["rtol"], TIGHT["max_steps"]).log_ebar
    )
    start = time.perf_counter()
    # log Ebar_G(G^{-1}(x)) = log|det J_G(z)| / n = -log|det J_{G^{-1}}(x)| / n
    k = jax.random.fold_in(key, 7 * n)
    tight = _matrix_free(field, x, k, args.probes, TIGHT["rtol"], TIGHT["max_steps"])
    seconds = time.perf_counter() - start
    loose = _matrix_free(field, x, k, args.probes, rtol, args.max_steps)
    log_ebar, stderr = -np.asarray(tight.value) / n, np.asarray(tight.stderr) / n
    log_ebar_loose = -np.asarray(loose.value) / n
    log_m = np.log(Ms)
    row = dict(
        n=n,
        P_M=np.mean(log_ebar[:, None] > log_m, axis=0),
        P_M_density=np.mean(density[:, None] > log_m, axis=0),
        log_ebar=log_ebar,
        log_ebar_stderr=stderr,
        log_ebar_density=density,
        log_ebar_at_sweep_rtol=log_ebar_loose,
        sweep_rtol=rtol,
        # in nats of log|det J_G|, and in standard errors
        max_abs_diff_vs_density=float(n * np.max(np.abs(log_ebar - density))),
        max_diff_in_stderr=float(np.max(np.abs(log_ebar - density) / stderr)),
        max_stderr=float(n * np.max(stderr)),
        max_abs_diff_at_sweep_rtol=float(n * np.max(np.abs(log_ebar_loose - density))),
        max_abs_log_det=float(n * np.max(np.abs(density))),
        same_side_of_every_M=bool(
            np.all((log_ebar[:, None] > log_m) == (density[:, None] > log_m))
        ),
        seconds_with_compile=seconds,
    )
    print(
        f"matrix-free check at n={n}, {samples} point(s) x (Hutch++, {args.probes} probes + "
        f"{SKETCH} sketch): log|det J_G(G^-1(x))| matrix-free vs by the densities, both at rtol "
        f"{TIGHT['rtol']:g}: max |diff| {row['max_abs_diff_vs_density']:.3g} nats = "
        f"{row['max_diff_in_stderr']:.1f} stderr (stderr <= {row['max_stderr']:.3g} nats, "
        f"|log|det J_G|| up to {row['max_abs_log_det']:.3g}); P_M at M = {_ms(Ms)}: "
        f"matrix-free {np.round(row['P_M'], 3)}, densities {np.round(row['P_M_density'], 3)}; "
        f"matrix-free at the sweep's rtol {rtol:g} vs the densities at {TIGHT['rtol']:g}: max "
        f"|diff| {row['max_abs_diff_at_sweep_rtol']:.3g} nats ({seconds:.1f} s)",
        flush=True,
    )
    return row


def dense_cost_row(args, key, n, large_dims, free_rows):
    """One point at `n`: the dense route (n JVPs through the inversion, `slogdet`)
    against the matrix-free estimate, each timed after compiling, and what the dense
    route would need at the large n."""
    _, field, x = _problem(args, key, n, 1)
    tight = TIGHT["rtol"], TIGHT["max_steps"]
    est, t_free = _timed(_matrix_free, field, x, key, args.probes, *tight)
    dense, t_dense = _timed(_dense_log_det, field, x[0], *tight)
    # the densities' value: the matrix-free check's where it ran at this n (its first
    # sample is this x, the draws being prefix-consistent), else a tight solve here
    known = [r["log_ebar_density"][0] for r in free_rows if r["n"] == n]
    if not known:
        known = _probability(field, x, jnp.ones(1), *tight).log_ebar
    density = n * float(known[0])
    row = dict(
        n=n,
        seconds_matrix_free=t_free,
        seconds_dense=t_dense,
        dense_over_matrix_free=t_dense / t_free,
        log_det_G_density=density,
        log_det_G_matrix_free=-float(est.value[0]),
        log_det_G_matrix_free_stderr=float(est.stderr[0]),
        log_det_G_dense=-float(dense),
        # n lanes of an O(n) solve: n^2 at least (more steps with n, and slogdet's n^3
        # are left out), so a lower bound
        dense_seconds_lower_bound={m: t_dense * (m / n) ** 2 for m in large_dims},
        dense_jacobian_gib={m: 8 * m * m / 2**30 for m in large_dims},
    )
    # the dense route is timed for its cost; its value is lost to round-off once the
    # smallest singular values of J_{G^-1} fall below what the tight solve resolves
    lost = abs(row["log_det_G_dense"] - density) > max(1.0, 3 * row["log_det_G_matrix_free_stderr"])
    print(
        f"dense route at n={n}, one point x, rtol {TIGHT['rtol']:g}: {t_dense:.2f} s (n JVPs "
        f"of the inversion, slogdet) against {t_free:.3f} s matrix-free "
        f"(dense / matrix-free {row['dense_over_matrix_free']:.2g}x). log|det J_G(G^-1(x))| at "
        f"this x: densities "
        f"{density:.4g}, matrix-free {row['log_det_G_matrix_free']:.4g} +- "
        f"{row['log_det_G_matrix_free_stderr']:.2g} (1 stderr), dense "
        f"{row['log_det_G_dense']:.4g}"
        + (
            " (lost to round-off: J_G^-1's smallest singular values lie below what the "
            "solve resolves; timed for its cost only)"
            if lost
            else ""
        )
        + ". The dense route at larger n, lower bounds: "
        + ", ".join(
            f"n={m}: >= {row['dense_seconds_lower_bound'][m]:.3g} s and "
            f"{row['dense_jacobian_gib'][m]:.3g} GiB a point"
            for m in large_dims
        ),
        flush=True,
    )
    return row


def _ms(Ms):
    """The thresholds M as printed: "1, 10, 100"."""
    return ", ".join(f"{m:g}" for m in Ms)


def binomial_se(p, n):
    return np.sqrt(np.maximum(p * (1 - p), 1e-12) / n)


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--dims", default=None, help="comma-separated n (default 2,4,...,1024)")
    p.add_argument("--samples", type=int, default=None, help="x ~ pi_real per n (64)")
    p.add_argument("--M", default="1,10,100", help="comma-separated thresholds")
    p.add_argument("--m", type=int, default=3, help="number of cubes (fixed in n)")
    p.add_argument("--side", type=float, default=0.05)
    p.add_argument("--alpha", type=float, default=0.5, help="mass kept in own cube")
    p.add_argument(
        "--rtol-scale",
        type=float,
        default=1.0,
        help="multiplies the inversion's rtol = atol (1e-6 to n=8, 1e-5 to 64, then 1e-4)",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help=f"the sweep's max_steps (20000; --quick: {TIGHT['max_steps']}, the tight solves', "
        "so that a sweep solve and a tight one at the same n and shapes share a program)",
    )
    p.add_argument(
        "--large-dims",
        default=None,
        help="comma-separated n past the sweep, with fewer samples (2048,4096,8192)",
    )
    p.add_argument("--large-samples", type=int, default=None, help="x per large n (16)")
    p.add_argument(
        "--matrix-free-dims", default=None, help="n where matrix-free Ebar is checked (16,32)"
    )
    p.add_argument("--probes", type=int, default=8, help=f"Hutch++ probes (sketch: {SKETCH})")
    p.add_argument(
        "--dense-cost-n", type=int, default=None, help="n at which the dense route is timed (32)"
    )
    args = p.parse_args(argv)
    dims = (
        [int(d) for d in args.dims.split(",")]
        if args.dims
        else ([2, 8, 16] if args.quick else [2**k for k in range(1, 11)])
    )
    samples = args.samples or (24 if args.quick else 64)
    large_dims = (
        [int(d) for d in args.large_dims.split(",") if d]
        if args.large_dims is not None
        else ([32] if args.quick else [2048, 4096, 8192])
    )
    large_samples = args.large_samples or (4 if args.quick else 16)
    # --quick: the sweep's max_steps is the tight solves' and the matrix-free check has
    # one point, the dense route's count: its tight and loose estimates and the dense
    # route's timing then share one compiled program
    if args.max_steps is None:
        args.max_steps = TIGHT["max_steps"] if args.quick else 20_000
    free_samples = 1 if args.quick else FREE_SAMPLES
    dense_cost_n = args.dense_cost_n or (8 if args.quick else 32)
    free_dims = (
        [int(d) for d in args.matrix_free_dims.split(",") if d]
        if args.matrix_free_dims is not None
        else ([8] if args.quick else [16, 32])
    )
    Ms = [float(m) for m in args.M.split(",")]
    dense_dims = [n for n in dims if n <= (2 if args.quick else 8)]
    # the loose values are the sweep's own; --quick: at the smallest n, with the
    # sweep's points and step cap, so that the tight solve reuses the sweep's
    # compiled program (the tolerance is an argument)
    tol_dims = [dims[0]] if args.quick else [max(dims)]
    tol_samples = samples if args.quick else 4
    tiling = [(2, 8)] if args.quick else [(2, 8), (3, 5), (4, 4)]
    tiling_samples = 64 if args.quick else 256
    rec = Record(
        "instability_vs_dimension",
        args.out,
        dict(
            law=dict(
                kind="GaussianNeighbours (jaxflow.data.sparse_neighbours)",
                m=args.m,
                side=args.side,
                own_box_mass=args.alpha,
                placement="lower corners uniform on [0.1, 0.9 - side]^n, >= side apart",
                seed=args.seed,
            ),
            pi_real="uniform on [0,1]^n",
            path="RectifiedFlow",
            solver="dopri5",
            rtol_atol={n: rtol_for(n, args.rtol_scale) for n in dims},
            max_steps=args.max_steps,
            dims=dims,
            samples=samples,
            large=dict(
                dims=large_dims,
                samples=large_samples,
                dense_cost_n=dense_cost_n,
            ),
            matrix_free=dict(
                dims=free_dims,
                samples=free_samples,
                log_ebar="jf.log_det_estimate(inverse=True), Hutch++, along the inversion",
                probes=args.probes,
                sketch=SKETCH,
                rtol_atol=TIGHT["rtol"],
            ),
            M=Ms,
            dense_check=dict(dims=dense_dims, samples=4, **TIGHT),
            tolerance_check=dict(dims=tol_dims, samples=tol_samples, tighter_by=10),
            control=dict(kind="tiling_neighbours", n_k=tiling, samples=tiling_samples),
            quick=args.quick,
        ),
    )
    M = jnp.asarray(Ms)
    key = jax.random.PRNGKey(args.seed)
    rows, sweep_log_ebar = [], {}
    print(
        f"sweep: at each n, points x ~ U[0,1]^n solved at the sweep's rtol; P_M = fraction "
        f"of x with Ebar_G(G^-1(x)) > M, for M = {_ms(Ms)}; eps, delta and bound = "
        "1 - eps - delta of Theorem 4.1, M0 of Theorem 4.3; log Ebar = log|det J_G(G^-1(x))| "
        "/ n from the densities",
        flush=True,
    )
    for n in progress(dims + large_dims, desc="dimensions", quiet=args.quiet):
        large = n in large_dims
        count = large_samples if large else samples
        law, field, x = _problem(args, key, n, count)
        start = time.perf_counter()
        r = _probability(field, x, M, rtol_for(n, args.rtol_scale), args.max_steps)
        log_ebar = np.asarray(r.log_ebar)
        elapsed = time.perf_counter() - start
        sweep_log_ebar[n] = log_ebar
        radius2 = 2 * n + 3 * np.sqrt(2 * n)
        width, own_box_mass, d_min, log_m0 = (float(v) for v in _law_summary(law))
        row = dict(
            n=n,
            width=width,
            own_box_mass=own_box_mass,
            d_min_over_sqrt_n=d_min / np.sqrt(n),
            log_M0=log_m0,
            P_M=np.asarray(r.p_m),
            samples=count,
            P_M_standard_error=binomial_se(np.asarray(r.p_m), count),
            eps=np.asarray(r.eps),
            delta=float(r.delta),
            bound=np.asarray(r.bound),
            bound_respected=bool(np.all(np.asarray(r.p_m) >= np.asarray(r.bound) - 1e-12)),
            log_ebar_quantiles=dict(
                zip(
                    ("min", "q25", "median", "q75", "max"),
                    np.quantile(log_ebar, [0, 0.25, 0.5, 0.75, 1]),
                    strict=True,
                )
            ),
            noise_norm2_over_threshold_median=float(np.median(np.asarray(r.noise_norm2)) / radius2),
            seconds_with_compile=elapsed,
        )
        rows.append(row)
        print(
            f"n={n:5d} ({count} x, rtol {rtol_for(n, args.rtol_scale):g}): "
            f"w_n={row['width']:.2e} log M0={row['log_M0']:.4g}  "
            f"P_M={np.round(row['P_M'], 3)}  "
            f"eps={np.round(row['eps'], 3)} delta={row['delta']:.3f}  "
            f"bound={np.round(row['bound'], 3)}  median log Ebar (log|det J_G| / n)="
            f"{row['log_ebar_quantiles']['median']:.4g}  ({elapsed:.1f} s)",
            flush=True,
        )

    free_rows = [matrix_free_row(args, key, n, free_samples, Ms) for n in free_dims]
    dense_cost = dense_cost_row(args, key, dense_cost_n, large_dims, free_rows)

    # The change of variables against two other routes at small n.
    dense_rows = []
    for n in progress(dense_dims, desc="route check", quiet=args.quiet):
        _, field, x = _problem(args, key, n, samples)
        x = x[:4]
        divergence, density, dense, regen = (np.asarray(a) for a in _route_check(field, x))
        # the sweep's own values at these points (its first four samples at this n)
        sweep = n * sweep_log_ebar[n][:4]
        dense_rows.append(
            dict(
                n=n,
                log_det_divergence=divergence,
                log_det_density_tight=density,
                log_det_sweep=sweep,
                log_det_dense_inverse=dense,
                regenerated_distance_tight=regen,
                max_abs_diff_divergence_vs_density=float(np.max(np.abs(divergence - density))),
                max_abs_diff_divergence_vs_sweep=float(np.max(np.abs(divergence - sweep))),
                max_abs_diff_divergence_vs_dense=float(np.max(np.abs(divergence - dense))),
            )
        )
        print(
            f"route check n={n}, the sweep's first {len(x)} points x: log|det J_G(G^-1(x))| "
            f"by the divergence integral (rtol {TIGHT['rtol']:g}) {np.round(divergence, 3)}; "
            f"by the densities at rtol {TIGHT['rtol']:g} {np.round(density, 3)} and at the "
            f"sweep's rtol {rtol_for(n, args.rtol_scale):g} {np.round(sweep, 3)}; by the dense "
            f"Jacobian of the inversion (rtol {TIGHT['rtol']:g}; round-off-limited where "
            f"|det| is large) {np.round(dense, 3)}; |G(G^-1(x)) - x| (rtol {TIGHT['rtol']:g}): "
            f"{np.array2string(regen, precision=2)}",
            flush=True,
        )

    # The sweep's tolerance against a ten times tighter solve.
    tol_rows = []
    for n in tol_dims:
        _, field, x = _problem(args, key, n, samples)
        x = x[:tol_samples]
        rtol = rtol_for(n, args.rtol_scale)
        cap = args.max_steps if args.quick else 10 * args.max_steps
        # the sweep's own values at these points (its first samples at this n)
        loose = sweep_log_ebar[n][:tol_samples]
        tight = np.asarray(_probability(field, x, M, rtol / 10, cap).log_ebar)
        tol_rows.append(
            dict(
                n=n,
                rtol=rtol,
                log_ebar=loose,
                log_ebar_tighter=tight,
                max_rel_diff=float(np.max(np.abs(loose - tight) / np.abs(tight))),
                same_side_of_every_M=bool(
                    np.all((loose[:, None] > np.log(Ms)) == (tight[:, None] > np.log(Ms)))
                ),
            )
        )
        print(
            f"tolerance check n={n}, the sweep's first {len(x)} points x: log Ebar at the "
            f"sweep's rtol {rtol:g} vs at {rtol / 10:g}: max relative difference "
            f"{tol_rows[-1]['max_rel_diff']:.2e}; same side of every M ({_ms(Ms)}): "
            f"{tol_rows[-1]['same_side_of_every_M']}",
            flush=True,
        )

    # Control: cubes tiling [0,1]^n, where delta is small and the bound bites.
    control = []
    for n, k in progress(tiling, desc="control", quiet=args.quiet):
        field = jf.AnalyticField(tiling_neighbours(n, k), jf.RectifiedFlow())
        x = jax.random.uniform(jax.random.fold_in(key, 1000 + n), (tiling_samples, n), jnp.float64)
        r = _probability(field, x, M, 1e-6, args.max_steps)
        control.append(
            dict(
                n=n,
                k=k,
                m=k**n,
                P_M=np.asarray(r.p_m),
                eps=np.asarray(r.eps),
                delta=float(r.delta),
                bound=np.asarray(r.bound),
                bound_respected=bool(np.all(np.asarray(r.p_m) >= np.asarray(r.bound) - 1e-12)),
            )
        )
        print(
            f"control, k^n = {k**n} cubes tiling [0,1]^n at n={n}, {tiling_samples} points x, "
            f"rtol 1e-06: P_M (M = {_ms(Ms)})={np.round(control[-1]['P_M'], 3)} >= bound "
            f"1 - eps - delta {np.round(control[-1]['bound'], 3)} "
            f"(delta={control[-1]['delta']:.3f})"
        )

    P = np.array([r["P_M"] for r in rows])
    results = dict(
        sweep=rows,
        dense_check=dense_rows,
        matrix_free=free_rows,
        dense_cost=dense_cost,
        tolerance_check=tol_rows,
        control=control,
        P_M_non_decreasing_in_n=[bool(np.all(np.diff(P[:, j]) >= 0)) for j in range(len(Ms))],
        bound_respected_everywhere=bool(all(r["bound_respected"] for r in rows + control)),
    )
    plot(rec, args, Ms, rows, dense_rows, control, samples, large_samples, free_rows, large_dims)
    path = rec.write(results)
    print(f"wrote {rec.png_path()} and {path} in {rec.data['wall_time_s']:.1f} s")
    return results


def plot(rec, args, Ms, rows, dense_rows, control, samples, large_samples, free, large_dims):
    fig, axes = plt.subplots(2, 3, figsize=(18, 10))
    ns = np.array([r["n"] for r in rows])
    colours = plt.cm.viridis(np.linspace(0, 0.85, len(Ms)))
    ax = axes[0, 0]
    for j, (m, c) in enumerate(zip(Ms, colours, strict=True)):
        pm = np.array([r["P_M"][j] for r in rows])
        se = np.array([r["P_M_standard_error"][j] for r in rows])
        ax.errorbar(ns, pm, yerr=se, color=c, marker="o", capsize=3, label=f"$P_M$, M = {m:g}")
        ax.plot(ns, [r["bound"][j] for r in rows], color=c, ls="--", marker="x")
        ax.plot(
            [r["n"] for r in free],
            [r["P_M"][j] for r in free],
            ls="none",
            marker="D",
            ms=10,
            mfc="none",
            color=c,
        )
    ax.plot([], [], "k--x", label="bound $1-\\epsilon-\\delta$ (Thm 4.1)")
    if free:
        ax.plot(
            [],
            [],
            "kD",
            mfc="none",
            ms=10,
            label=f"$P_M$, matrix-free Ebar (Hutch++, {len(free[0]['log_ebar'])} points)",
        )
    ax.axhline(0, color="grey", lw=0.6)
    ax.set(
        xscale="log",
        xlabel="dimension n",
        ylabel="probability",
        ylim=(-0.08, 1.05),
        title=f"(a) $P_M$ rises to 1 with n ({samples} samples a point"
        + (f", {large_samples} from n = {large_dims[0]}" if large_dims else "")
        + ", ±1 s.e.)",
    )
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=8, loc="center right")

    ax = axes[0, 1]
    for j, (m, c) in enumerate(zip(Ms, colours, strict=True)):
        ax.plot(
            ns, [r["eps"][j] for r in rows], color=c, marker="o", label=f"$\\epsilon$, M = {m:g}"
        )
    ax.plot(ns, [r["delta"] for r in rows], color="tab:red", marker="s", label="$\\delta$")
    ax.set_xscale("log", base=2)
    ax.set(
        xlabel="dimension n",
        ylabel="fraction of samples",
        ylim=(-0.05, 1.05),
        title="(b) $\\epsilon \\to 0$ as Thm 4.3 says; $\\delta \\to 1$, not 0",
    )
    ax.legend(fontsize=8)

    ax = axes[0, 2]
    med = np.array([r["log_ebar_quantiles"]["median"] for r in rows])
    q25 = np.array([r["log_ebar_quantiles"]["q25"] for r in rows])
    q75 = np.array([r["log_ebar_quantiles"]["q75"] for r in rows])
    ax.fill_between(ns, q25, q75, color="tab:blue", alpha=0.25, label="interquartile range")
    ax.plot(
        ns, med, "o-", color="tab:blue", label="median $\\log \\bar{\\mathcal{E}}_G(G^{-1}(x))$"
    )
    ax.plot(
        ns, [r["log_M0"] for r in rows], "s--", color="tab:green", label="$\\log M_0$ (Thm 4.3)"
    )
    if free:
        ax.plot(
            [r["n"] for r in free],
            [np.median(r["log_ebar"]) for r in free],
            "D",
            mfc="none",
            ms=10,
            color="k",
            label="median, matrix-free",
        )
    for m, c in zip(Ms, colours, strict=True):
        ax.axhline(np.log(m), color=c, lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_ylim(bottom=min(-3.0, 2 * q25.min()))
    ax.set(
        xlabel="dimension n",
        ylabel="log scale (symlog)",
        title="(c) $\\log \\bar{\\mathcal{E}}$ and $\\log M_0$ grow with n; dotted: $\\log M$",
    )
    ax.legend(fontsize=8)

    ax = axes[1, 0]
    ax.plot(
        ns,
        [r["noise_norm2_over_threshold_median"] for r in rows],
        "o-",
        color="tab:red",
        label="median $|G^{-1}(x)|^2 / (2n + 3\\sqrt{2n})$",
    )
    ax.axhline(1, color="grey", ls="--", label="$|z|^2 = 2n + 3\\sqrt{2n}$ (δ's threshold)")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="dimension n",
        ylabel="median $|G^{-1}(x)|^2 / (2n + 3\\sqrt{2n})$",
        title="(d) why δ → 1: uniform x invert far outside the Gaussian shell",
    )
    ax.set_xscale("log", base=2)
    ax.plot(
        ns,
        [r["width"] for r in rows],
        "^:",
        color="tab:purple",
        label="width $w_n$ (Assumption 4.4.4)",
    )
    ax.legend(fontsize=8)

    ax = axes[1, 1]
    x = np.arange(len(control))
    width = 0.8 / len(Ms)
    for j, (m, c) in enumerate(zip(Ms, colours, strict=True)):
        ax.bar(
            x + j * width, [r["P_M"][j] for r in control], width, color=c, label=f"$P_M$, M = {m:g}"
        )
        ax.hlines(
            [r["bound"][j] for r in control],
            x + j * width - 0.45 * width,
            x + j * width + 0.45 * width,
            color="k",
            lw=3,
            zorder=3,
            label="bound $1-\\epsilon-\\delta$" if j == 0 else None,
        )
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_xticks(
        x + width * (len(Ms) - 1) / 2,
        [f"n={r['n']}, m={r['m']}\nδ={r['delta']:.2f}" for r in control],
    )
    ax.set(
        ylabel="probability",
        ylim=(min(-0.2, min(min(r["bound"]) for r in control) - 0.05), 1.05),
        title="(e) control: $k^n$ cubes tiling $[0,1]^n$, the bound bites",
    )
    ax.legend(fontsize=8)

    ax = axes[1, 2]
    for r, mk in zip(dense_rows, "osD^v", strict=False):
        ax.scatter(
            r["log_det_divergence"],
            r["log_det_sweep"],
            marker=mk,
            s=50,
            label=f"n={r['n']}: densities (sweep)",
        )
        ax.scatter(
            r["log_det_divergence"],
            r["log_det_dense_inverse"],
            marker=mk,
            facecolors="none",
            edgecolors="k",
            s=110,
            label=f"n={r['n']}: dense Jacobian of $G^{{-1}}$",
        )
    vals = np.concatenate([r["log_det_divergence"] for r in dense_rows])
    lim = [vals.min() - 1, vals.max() + 1]
    ax.plot(lim, lim, color="grey", lw=0.8)
    worst = max(r["max_abs_diff_divergence_vs_sweep"] for r in dense_rows)
    ax.set(
        xlabel="$-\\int \\nabla\\cdot v\\,dt$ along the inversion (jf.invert_with_log_det)",
        ylabel="$\\log|\\det J_G(G^{-1}(x))|$ by another route",
        title=f"(f) routes agree to {worst:.1g} nats; dense loses the tiny directions",
    )
    ax.legend(fontsize=7)
    fig.suptitle(
        f"Paper 000 Thms 4.1/4.3: m = {args.m} Gaussian-neighbour cubes (side {args.side}, "
        f"own-cube mass {args.alpha}), $\\pi_{{real}}$ uniform on $[0,1]^n$, rectified flow"
    )
    fig.tight_layout()
    fig.savefig(rec.png_path(), dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
