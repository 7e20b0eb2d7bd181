"""Paper 000 Theorems 4.1 and 4.3: the probability of instability against dimension.

`p_gen` is a mixture of Gaussian neighbours meeting Assumption 4.4: m = 3 cubes of
side 0.05 at random places in [0.1, 0.9]^n, at least a side apart, widths w_n chosen
so each component keeps half its mass in its own cube at every n (Assumption 4.4.4,
so w_n shrinks like 1/n), `pi_real` uniform on [0, 1]^n, rectified flow. For each n:

- P_M = pi_real(Ebar_G(G^{-1}(x)) > M) for several M, with Ebar from the exact
  change of variables log Ebar = (log N(z) - log p_gen(x)) / n (Lemma D.1), against
  Theorem 4.1's bound 1 - eps - delta, eps and delta from the same samples;
- M_0 of Theorem 4.3 and the median |G^{-1}(x)|^2 against delta's threshold.

Two checks: the change-of-variables log|det J_G| against the dense Jacobian at
small n, and log Ebar at the sweep's tolerance against a tight solve. A control
law (k^n cubes tiling the cube, small n) shows the bound where delta is small.

    python examples/instability_vs_dimension.py [--dims 2,4,...,1024] [--samples 64]

Writes out/instability_vs_dimension.png and out/instability_vs_dimension.json.
"""

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


@eqx.filter_jit
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


def rtol_for(n, scale):
    """The inversion's rtol (= atol): the cost of a tight solve grows fast with n
    while log Ebar grows like 1/w_n^2, so the needed relative accuracy falls."""
    return scale * (1e-6 if n <= 8 else 1e-5 if n <= 64 else 1e-4)


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
    p.add_argument("--max-steps", type=int, default=20_000)
    args = p.parse_args(argv)
    dims = (
        [int(d) for d in args.dims.split(",")]
        if args.dims
        else ([2, 8, 16] if args.quick else [2**k for k in range(1, 11)])
    )
    samples = args.samples or (24 if args.quick else 64)
    Ms = [float(m) for m in args.M.split(",")]
    dense_dims = [n for n in dims if n <= (2 if args.quick else 8)]
    tol_dims = [] if args.quick else [max(dims)]
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
            M=Ms,
            dense_check=dict(dims=dense_dims, samples=4, **TIGHT),
            tolerance_check=dict(dims=tol_dims, samples=4, tighter_by=10),
            control=dict(kind="tiling_neighbours", n_k=tiling, samples=tiling_samples),
            quick=args.quick,
        ),
    )
    M = jnp.asarray(Ms)
    key = jax.random.PRNGKey(args.seed)
    rows = []
    for n in progress(dims, desc="dimensions", quiet=args.quiet):
        law = sparse_neighbours(n, args.m, args.side, args.alpha, seed=args.seed + n)
        field = jf.AnalyticField(law, jf.RectifiedFlow())
        x = jax.random.uniform(jax.random.fold_in(key, n), (samples, n), jnp.float64)
        start = time.perf_counter()
        r = _probability(field, x, M, rtol_for(n, args.rtol_scale), args.max_steps)
        log_ebar = np.asarray(r.log_ebar)
        elapsed = time.perf_counter() - start
        radius2 = 2 * n + 3 * np.sqrt(2 * n)
        row = dict(
            n=n,
            width=float(law.widths[0]),
            own_box_mass=float(law.own_box_mass()[0]),
            d_min_over_sqrt_n=float(law.min_box_distance()) / np.sqrt(n),
            M0=float(law.theorem_4_3_m0()),
            P_M=np.asarray(r.p_m),
            P_M_standard_error=binomial_se(np.asarray(r.p_m), samples),
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
            f"n={n:5d} w={row['width']:.2e} M0={row['M0']:.3g}  P_M={np.round(row['P_M'], 3)}  "
            f"eps={np.round(row['eps'], 3)} delta={row['delta']:.3f}  "
            f"bound={np.round(row['bound'], 3)}  median log Ebar="
            f"{row['log_ebar_quantiles']['median']:.4g}  ({elapsed:.1f} s)",
            flush=True,
        )

    # The change of variables against two other routes at small n.
    dense_rows = []
    for n in progress(dense_dims, desc="route check", quiet=args.quiet):
        law = sparse_neighbours(n, args.m, args.side, args.alpha, seed=args.seed + n)
        field = jf.AnalyticField(law, jf.RectifiedFlow())
        x = jax.random.uniform(jax.random.fold_in(key, n), (samples, n), jnp.float64)[:4]
        divergence, density, dense, regen = (np.asarray(a) for a in _route_check(field, x))
        sweep = n * np.asarray(
            _probability(field, x, M, rtol_for(n, args.rtol_scale), args.max_steps).log_ebar
        )
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
            f"route check n={n}: log|det J_G(G^-1(x))| divergence {np.round(divergence, 3)}, "
            f"densities {np.round(density, 3)} (tight) {np.round(sweep, 3)} (sweep), dense "
            f"{np.round(dense, 3)}; |G(G^-1(x)) - x| at rtol 1e-10: "
            f"{np.array2string(regen, precision=2)}",
            flush=True,
        )

    # The sweep's tolerance against a ten times tighter solve.
    tol_rows = []
    for n in tol_dims:
        law = sparse_neighbours(n, args.m, args.side, args.alpha, seed=args.seed + n)
        field = jf.AnalyticField(law, jf.RectifiedFlow())
        x = jax.random.uniform(jax.random.fold_in(key, n), (samples, n), jnp.float64)[:4]
        rtol = rtol_for(n, args.rtol_scale)
        loose = np.asarray(_probability(field, x, M, rtol, args.max_steps).log_ebar)
        tight = np.asarray(_probability(field, x, M, rtol / 10, 10 * args.max_steps).log_ebar)
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
            f"tolerance check n={n}: log Ebar at rtol {rtol:g} vs {rtol / 10:g}: max relative "
            f"difference {tol_rows[-1]['max_rel_diff']:.2e}; same side of every M: "
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
            f"control k^n cubes n={n} (m={k**n}): P_M={np.round(control[-1]['P_M'], 3)} "
            f">= bound {np.round(control[-1]['bound'], 3)} (delta={control[-1]['delta']:.3f})"
        )

    P = np.array([r["P_M"] for r in rows])
    results = dict(
        sweep=rows,
        dense_check=dense_rows,
        tolerance_check=tol_rows,
        control=control,
        P_M_non_decreasing_in_n=[bool(np.all(np.diff(P[:, j]) >= 0)) for j in range(len(Ms))],
        bound_respected_everywhere=bool(all(r["bound_respected"] for r in rows + control)),
    )
    plot(rec, args, dims, Ms, rows, dense_rows, control, samples)
    path = rec.write(results)
    print(f"wrote {rec.png_path()} and {path} in {rec.data['wall_time_s']:.1f} s")
    return results


def plot(rec, args, dims, Ms, rows, dense_rows, control, samples):
    fig, axes = plt.subplots(2, 3, figsize=(18, 10))
    ns = np.array(dims)
    colours = plt.cm.viridis(np.linspace(0, 0.85, len(Ms)))
    ax = axes[0, 0]
    for j, (m, c) in enumerate(zip(Ms, colours, strict=True)):
        pm = np.array([r["P_M"][j] for r in rows])
        se = np.array([r["P_M_standard_error"][j] for r in rows])
        ax.errorbar(ns, pm, yerr=se, color=c, marker="o", capsize=3, label=f"$P_M$, M = {m:g}")
        ax.plot(ns, [r["bound"][j] for r in rows], color=c, ls="--", marker="x")
    ax.plot([], [], "k--x", label="bound $1-\\epsilon-\\delta$ (Thm 4.1)")
    ax.axhline(0, color="grey", lw=0.6)
    ax.set(
        xscale="log",
        xlabel="dimension n",
        ylabel="probability",
        ylim=(-0.08, 1.05),
        title=f"(a) $P_M$ rises to 1 with n ({samples} samples a point, ±1 s.e.)",
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
        ns, np.log([r["M0"] for r in rows]), "s--", color="tab:green", label="$\\log M_0$ (Thm 4.3)"
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
