"""Paper 000 Fig. 4(a, b) and Fig. A1 on the toy: reconstruction error against the
instability coefficient, for Euler and for Heun.

Data x uniform on [-1, 1]^2 under the Fig. 3 mixture (rectified flow). For each
solver, with a fixed step count (appendix E.1, steps 1-5):

1. zhat = Ghat^{-1}(x), xhat = Ghat(zhat), R(x) = |x - xhat| / sqrt(2) (eq. 4);
2. a small random perturbation n of zhat, E ~ |Ghat(zhat + n) - xhat| / |n|
   (the paper's estimate);
3. the exact E_G(zhat, n / |n|) from one JVP through an accurate solve;
4. Pearson and Spearman correlations of log R with log E (Fisher-z p-values, 95%
   bootstrap intervals), and a binned median curve.

    python examples/reconstruction_vs_instability.py [--points 1000] [--steps 100]

Writes out/reconstruction_vs_instability.png and out/reconstruction_vs_instability.json.
"""

import jax

jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from _common import Record, parser, progress  # noqa: E402
from _stats import binned_median, correlations  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

import jaxflow as jf  # noqa: E402
from jaxflow.data import FIG3_MEANS, FIG3_VARIANCE, FIG3_WEIGHTS  # noqa: E402

ACCURATE = dict(rtol=1e-10, atol=1e-10, max_steps=100_000)
SOLVERS = ("euler", "heun")


@eqx.filter_jit
def exact_instability(field, zhat, n):
    """`E_G(zhat, n)` by a JVP through an accurate solve, at every point: one program
    for both solvers' `zhat` (the solve dominates the compile)."""

    def one(z, dz):
        return jf.intrinsic_instability(lambda y: jf.generate(field, y, **ACCURATE), z, dz)

    return jax.vmap(one)(zhat, n)


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--points", type=int, default=None, help="data points (1000)")
    p.add_argument("--steps", type=int, default=100, help="steps each way, both solvers")
    p.add_argument("--perturbation", type=float, default=1e-4, help="|n| for step 2")
    p.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples (1000)")
    args = p.parse_args(argv)
    points = args.points or (200 if args.quick else 1000)
    resamples = args.bootstrap or (200 if args.quick else 1000)
    rec = Record(
        "reconstruction_vs_instability",
        args.out,
        dict(
            law=dict(weights=FIG3_WEIGHTS, means=FIG3_MEANS, variance=FIG3_VARIANCE),
            path="RectifiedFlow",
            data="uniform on [-1,1]^2",
            points=points,
            solvers=SOLVERS,
            steps=args.steps,
            perturbation_norm=args.perturbation,
            perturbation_direction="uniform on the circle, one per point",
            exact_E=dict(solver="dopri5", **ACCURATE),
            bootstrap_resamples=resamples,
            seed=args.seed,
            quick=args.quick,
        ),
    )
    field = jf.AnalyticField(jf.data.fig3_mixture(jnp.float64), jf.RectifiedFlow())
    kx, kn = jax.random.split(jax.random.PRNGKey(args.seed))
    x = jax.random.uniform(kx, (points, 2), jnp.float64, -1.0, 1.0)
    angle = jax.random.uniform(kn, (points,), jnp.float64, 0, 2 * jnp.pi)
    n = args.perturbation * jnp.stack([jnp.cos(angle), jnp.sin(angle)], -1)
    rng = np.random.default_rng(args.seed)

    per_solver = {}
    for solver in progress(SOLVERS, desc="solvers", quiet=args.quiet):
        kw = dict(solver=solver, steps=args.steps)

        def one(x, n, kw=kw):
            zhat = jf.invert(field, x, **kw)
            xhat = jf.generate(field, zhat, **kw)
            xtilde = jf.generate(field, zhat + n, **kw)
            r = jnp.linalg.norm(x - xhat) / jnp.sqrt(2.0)
            e_est = jnp.linalg.norm(xtilde - xhat) / jnp.linalg.norm(n)
            return r, e_est, zhat

        r, e_est, zhat = jax.jit(jax.vmap(one))(x, n)
        r, e_est, e_exact = (np.asarray(a) for a in (r, e_est, exact_instability(field, zhat, n)))
        stats = {
            "R_vs_E_perturbation": correlations(np.log(e_est), np.log(r), rng, resamples),
            "R_vs_E_exact": correlations(np.log(e_exact), np.log(r), rng, resamples),
        }
        centres, medians, counts = binned_median(np.log(e_est), np.log(r))
        per_solver[solver] = dict(
            R=r,
            E_perturbation=e_est,
            E_exact=e_exact,
            correlations_of_logs=stats,
            binned_median=dict(
                log_E_centre=centres, log_R_median=medians, count=counts, by="E_perturbation"
            ),
            median_R=float(np.median(r)),
            max_R=float(np.max(r)),
            median_R_where_E_gt_1=float(np.median(r[e_est > 1])) if np.any(e_est > 1) else None,
            median_R_where_E_le_1=float(np.median(r[e_est <= 1])),
            fraction_E_gt_1=float(np.mean(e_est > 1)),
            E_perturbation_vs_exact_median_rel_diff=float(
                np.median(np.abs(e_est - e_exact) / e_exact)
            ),
        )
        s = stats["R_vs_E_perturbation"]
        print(
            f"{solver}, {args.steps} steps: median R {np.median(r):.3g} (max {r.max():.3g}); "
            f"log R vs log E: Pearson {s['pearson']['r']:.3f} (p = {s['pearson']['p_value']:.2g}, "
            f"95% CI {np.round(s['pearson']['bootstrap_95'], 3).tolist()}), Spearman "
            f"{s['spearman']['r']:.3f} (p = {s['spearman']['p_value']:.2g}); median R where "
            f"E > 1: {per_solver[solver]['median_R_where_E_gt_1']:.3g}, where E <= 1: "
            f"{per_solver[solver]['median_R_where_E_le_1']:.3g}; perturbation vs exact E: "
            f"median relative difference "
            f"{per_solver[solver]['E_perturbation_vs_exact_median_rel_diff']:.2g}",
            flush=True,
        )
    results = dict(x=x, per_solver=per_solver)
    plot(rec, field, np.asarray(x), per_solver, args)
    path = rec.write(results)
    print(f"wrote {rec.png_path()} and {path} in {rec.data['wall_time_s']:.1f} s")
    return results


def _p(p):
    # erfc underflows to 0 beyond ~1e-308: say so rather than print "p = 0".
    return "p < 1e-300" if p == 0 else f"p = {p:.1g}"


def _scatter(ax, e, r, stats, title, colour):
    ax.scatter(e, r, s=5, alpha=0.5, color=colour, label="points")
    c, m, _ = binned_median(np.log(e), np.log(r))
    ax.plot(np.exp(c), np.exp(m), "k-o", ms=4, label="binned median")
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    pe, sp = stats["pearson"], stats["spearman"]
    ax.set(
        xscale="log",
        yscale="log",
        ylabel="reconstruction error $\\mathcal{R}(x)$",
        title=f"{title}\nPearson {pe['r']:.2f} [{pe['bootstrap_95'][0]:.2f}, "
        f"{pe['bootstrap_95'][1]:.2f}], {_p(pe['p_value'])}; Spearman {sp['r']:.2f}, "
        f"{_p(sp['p_value'])}",
    )
    ax.legend(fontsize=8, loc="upper left")


def plot(rec, field, x, per_solver, args):
    fig, axes = plt.subplots(2, 3, figsize=(19, 11.5))
    ax = axes[0, 0]
    g = np.linspace(-1, 1, 201)
    pts = jnp.stack(jnp.meshgrid(g, g), -1).reshape(-1, 2)
    dens = np.exp(np.asarray(jax.jit(jax.vmap(field.law.log_prob))(pts))).reshape(201, 201)
    ax.imshow(dens, extent=(-1, 1, -1, 1), origin="lower", cmap="Blues")
    sc = ax.scatter(x[:, 0], x[:, 1], c=per_solver["euler"]["R"], s=6, cmap="magma", norm=LogNorm())
    fig.colorbar(sc, ax=ax, label=f"Euler $\\mathcal{{R}}(x)$, {args.steps} steps")
    ax.set(
        xlabel="$x_1$",
        ylabel="$x_2$",
        title="(a) density $p_{gen}$ (blue) and the data, coloured by $\\mathcal{R}$",
    )
    for col, solver, colour in ((1, "euler", "tab:blue"), (2, "heun", "tab:orange")):
        d = per_solver[solver]
        _scatter(
            axes[0, col],
            d["E_perturbation"],
            d["R"],
            d["correlations_of_logs"]["R_vs_E_perturbation"],
            f"({'bc'[col - 1]}) {solver}: $\\mathcal{{R}}$ vs perturbation estimate of "
            "$\\mathcal{E}$",
            colour,
        )
        axes[0, col].set_xlabel(
            f"$|\\hat G(\\hat z + n) - \\hat G(\\hat z)| / |n|$, $|n|$ = {args.perturbation:g}"
        )
        _scatter(
            axes[1, col],
            d["E_exact"],
            d["R"],
            d["correlations_of_logs"]["R_vs_E_exact"],
            f"({'ef'[col - 1]}) {solver}: $\\mathcal{{R}}$ vs exact "
            "$\\mathcal{E}_G(\\hat z, n/|n|)$",
            colour,
        )
        axes[1, col].set_xlabel("exact $\\mathcal{E}_G$ (JVP through an accurate solve)")
    ax = axes[1, 0]
    for solver, colour in (("euler", "tab:blue"), ("heun", "tab:orange")):
        d = per_solver[solver]
        ax.scatter(d["E_exact"], d["E_perturbation"], s=5, alpha=0.5, color=colour, label=solver)
    lim = [
        min(d["E_exact"].min() for d in per_solver.values()),
        max(d["E_exact"].max() for d in per_solver.values()),
    ]
    ax.plot(lim, lim, color="grey", lw=0.8, label="equality")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="exact $\\mathcal{E}_G(\\hat z, n/|n|)$",
        ylabel="perturbation estimate with $\\hat G$",
        title="(d) the paper's estimate against the exact coefficient",
    )
    ax.legend(fontsize=8)
    fig.suptitle(
        f"Paper 000 Fig. 4(b) / A1 on the toy: reconstruction error grows with instability "
        f"({len(x)} points uniform on $[-1,1]^2$, {args.steps} steps each way)"
    )
    fig.tight_layout()
    fig.savefig(rec.png_path(), dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
