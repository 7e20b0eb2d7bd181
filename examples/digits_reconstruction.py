"""Paper 000 Fig. 4(b) on a trained image model: the reconstruction error of real
handwritten digits against the instability coefficient, for the digits score model
of `digits_lyapunov.py` (shared through `--cache`).

For each of `--points` real digits x (scikit-learn's 8x8 digits, the training set:
paper 000 reconstructs real images), with the PF-ODE of the learned field solved
by a fixed-step solver on one geometric time grid both ways (the OU velocity of a
noise model is stiff near t = 0, where equal steps fail):

1. zhat = Ghat^{-1}(x), xhat = Ghat(zhat), R(x) = |x - xhat| / sqrt(64) (eq. 4);
2. the instability coefficient of the discrete map at zhat along a random unit
   direction u, E = |J_Ghat(zhat) u|, from one JVP through the solver, and the
   paper's finite-difference estimate |Ghat(zhat + d u) - xhat| / d;
3. Pearson and Spearman correlations of log R with log E, with bootstrap
   intervals, and a binned median.

    python examples/digits_reconstruction.py [--points 1000] [--steps 40] [--solver euler]

Writes out/digits_reconstruction.png and out/digits_reconstruction.json.
"""

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from _common import Record, parser  # noqa: E402
from _digits import T_MIN, T_NOISE, add_model_arguments, digits_field, model_settings  # noqa: E402
from _stats import binned_median, correlations  # noqa: E402

import jaxflow as jf  # noqa: E402


def main(argv=None):
    p = parser(__doc__)
    add_model_arguments(p)
    p.add_argument("--points", type=int, default=None, help="real digits reconstructed (1000)")
    p.add_argument("--steps", type=int, default=None, help="solver steps each way (40)")
    p.add_argument("--solver", default="euler", help="fixed-step solver (euler)")
    p.add_argument("--perturbation", type=float, default=1e-2, help="d of the FD estimate")
    args = p.parse_args(argv)
    points = args.points or (8 if args.quick else 1000)
    steps = args.steps or (6 if args.quick else 40)
    resamples = 200 if args.quick else 1000
    times = np.geomspace(T_MIN, T_NOISE * (1 - 1e-3), steps + 1)
    rec = Record(
        "digits_reconstruction",
        args.out,
        dict(
            model=model_settings(args),
            points=points,
            solver=args.solver,
            steps=steps,
            times=f"geometric from {T_MIN} to {T_NOISE * (1 - 1e-3)}, the same both ways",
            perturbation=args.perturbation,
            bootstrap_resamples=resamples,
            seed=args.seed,
        ),
    )
    field, data, info = digits_field(args)
    kx, ku = jax.random.split(jax.random.PRNGKey(args.seed + 4))
    idx = np.asarray(jax.random.choice(kx, data.shape[0], (points,), replace=False))
    x = jnp.asarray(data[idx])
    u = jax.random.normal(ku, x.shape, x.dtype)
    u = u / jnp.linalg.norm(u, axis=1, keepdims=True)
    kw = dict(solver=args.solver, times=times)

    def one(x, u):
        zhat = jf.invert(field, x, **kw)
        xhat, jvp = jax.jvp(lambda z: jf.generate(field, z, **kw), (zhat,), (u,))
        xtilde = jf.generate(field, zhat + args.perturbation * u, **kw)
        r = jnp.linalg.norm(x - xhat) / jnp.sqrt(x.shape[0])
        return r, jnp.linalg.norm(jvp), jnp.linalg.norm(xtilde - xhat) / args.perturbation, xhat

    r, e, e_fd, xhat = (np.asarray(a, np.float64) for a in jax.jit(jax.vmap(one))(x, u))
    rng = np.random.default_rng(args.seed)
    stats = dict(
        R_vs_E_jvp=correlations(np.log(e), np.log(r), rng, resamples),
        R_vs_E_finite_difference=correlations(np.log(e_fd), np.log(r), rng, resamples),
    )
    centres, medians, counts = binned_median(np.log(e), np.log(r), bins=8)
    results = dict(
        training=info,
        indices=idx,
        R=r,
        E_jvp=e,
        E_finite_difference=e_fd,
        correlations_of_logs=stats,
        binned_median=dict(log_E_centre=centres, log_R_median=medians, count=counts),
        median_R=float(np.median(r)),
        fraction_E_gt_1=float(np.mean(e > 1)),
        median_R_where_E_gt_1=float(np.median(r[e > 1])) if np.any(e > 1) else None,
        median_R_where_E_le_1=float(np.median(r[e <= 1])) if np.any(e <= 1) else None,
        fd_vs_jvp_median_rel_diff=float(np.median(np.abs(e_fd - e) / e)),
    )
    s = stats["R_vs_E_jvp"]
    print(f"training: {info['train_seconds']:.0f} s, final loss {info['final_loss']}")
    print(
        f"{points} digits, {args.solver} {steps} steps each way: median R {np.median(r):.3g} "
        f"(max {r.max():.3g}); E > 1 at {np.mean(e > 1):.0%} of them"
    )
    print(
        f"log R vs log E: Pearson {s['pearson']['r']:.3f} (p = {s['pearson']['p_value']:.2g}, "
        f"95% CI {np.round(s['pearson']['bootstrap_95'], 3).tolist()}), Spearman "
        f"{s['spearman']['r']:.3f}; finite-difference E: Pearson "
        f"{stats['R_vs_E_finite_difference']['pearson']['r']:.3f}, median |E_fd - E| / E "
        f"{results['fd_vs_jvp_median_rel_diff']:.2g}"
    )

    fig = plt.figure(figsize=(11, 4.6))
    grid = fig.add_gridspec(2, 5, width_ratios=[2.4, 2.4, 1, 1, 1])
    ax = fig.add_subplot(grid[:, 0:2])
    ax.scatter(e, r, s=8, alpha=0.6, label="real digits")
    ax.plot(np.exp(centres), np.exp(medians), "k-o", ms=4, label="binned median")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("instability coefficient E (JVP of the discrete generation map)")
    ax.set_ylabel("reconstruction error R")
    ax.set_title(
        f"trained digits model, {args.solver} {steps} steps: Pearson(log) "
        f"{s['pearson']['r']:.2f}, Spearman {s['spearman']['r']:.2f}",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    order = np.argsort(r)
    for col, (label, k) in enumerate(
        (("lowest R", order[0]), ("median R", order[len(r) // 2]), ("highest R", order[-1]))
    ):
        for row, (img, what) in enumerate(((x[k], "x"), (xhat[k], "xhat"))):
            a = fig.add_subplot(grid[row, 2 + col])
            a.imshow(np.asarray(img).reshape(8, 8), cmap="gray", vmin=-1, vmax=1)
            a.set_title(
                f"{what}: {label}" + (f"\nR {r[k]:.2f}, E {e[k]:.2g}" if row else ""), fontsize=7
            )
            a.axis("off")
    fig.tight_layout()
    fig.savefig(rec.png_path(), dpi=120)
    print("wrote", rec.png_path(), rec.write(results))
    return results


if __name__ == "__main__":
    main()
