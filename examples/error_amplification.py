"""Paper 000 Prop. 3.1 (eq. 5): numerical error in the inverted noise, amplified by
the instability of G.

For points x uniform on [-1, 1]^2 under the Fig. 3 mixture (rectified flow), and
Euler inversions with step h:

- z = G^{-1}(x) from an accurate solve, zhat from Euler: the inverted-noise error
  |zhat - z|, against the Euler global error bound (h M_2 / 2L)(e^L - 1) of eq. A16,
  with M_2 = max |x''| and L = max ||dv/dx|| along the exact trajectory;
- the amplification C = E_G(z, zhat - z) from the exact Jacobian (one JVP), and
  Gronwall's C <= e^L (eq. A18);
- the reconstruction error with precise generation, |x - G(zhat)| (the setting of
  Prop. 3.1), against C |zhat - z|;
- U = (h M_2 / 2L)(e^L - 1) C and eq. 5's lower bound h M_2 (C - 1)/(2 log C) C.

    python examples/error_amplification.py [--points 400] [--steps 10,20,40,80,160,320]

Writes out/error_amplification.png and out/error_amplification.json.
"""

import diffrax
import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from _common import Record, parser, progress  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

import jaxflow as jf  # noqa: E402
from jaxflow.data import FIG3_MEANS, FIG3_VARIANCE, FIG3_WEIGHTS  # noqa: E402

ACCURATE = dict(rtol=1e-10, atol=1e-10, max_steps=100_000)


def trajectory_constants(field, x, times):
    """M_2 = max_t |x''(t)| and L = max_t ||dv/dx(x_t, t)||_2 along the exact
    trajectory through x, sampled at `times` (paper 000 eq. A11, A15)."""
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: field.velocity(y, t)),
        diffrax.Dopri5(),
        0.0,
        1.0,
        None,
        x,
        stepsize_controller=diffrax.PIDController(rtol=1e-10, atol=1e-10),
        saveat=diffrax.SaveAt(ts=times),
        max_steps=100_000,
    )

    def at(y, t):
        v, acc = jax.jvp(field.velocity, (y, t), (field.velocity(y, t), jnp.ones_like(t)))
        lip = jnp.linalg.norm(jax.jacfwd(field.velocity)(y, t), ord=2)
        return jnp.linalg.norm(acc), lip

    acc, lip = jax.vmap(at)(sol.ys, times)
    return jnp.max(acc), jnp.max(lip)


def log_euler_bound(h, m2, lip):
    # log of (h M_2 / 2L)(e^L - 1), safe for large L.
    return np.log(h * m2 / (2 * lip)) + lip + np.log(-np.expm1(-lip))


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--points", type=int, default=None, help="data points (400)")
    p.add_argument("--steps", default=None, help="comma-separated Euler step counts")
    args = p.parse_args(argv)
    points = args.points or (32 if args.quick else 400)
    steps = (
        [int(s) for s in args.steps.split(",")]
        if args.steps
        else ([10, 80] if args.quick else [10, 20, 40, 80, 160, 320])
    )
    times = jnp.linspace(0.0, 1.0, 201)
    rec = Record(
        "error_amplification",
        args.out,
        dict(
            law=dict(weights=FIG3_WEIGHTS, means=FIG3_MEANS, variance=FIG3_VARIANCE),
            path="RectifiedFlow",
            data="uniform on [-1,1]^2",
            points=points,
            inversion="euler",
            steps=steps,
            accurate_solve=dict(solver="dopri5", **ACCURATE),
            trajectory_samples_for_M2_and_L=int(times.size),
            seed=args.seed,
            quick=args.quick,
        ),
    )
    field = jf.AnalyticField(jf.data.fig3_mixture(jnp.float64), jf.RectifiedFlow())
    x = jax.random.uniform(jax.random.PRNGKey(args.seed), (points, 2), jnp.float64, -1.0, 1.0)

    def gen(z):
        return jf.generate(field, z, **ACCURATE)

    @jax.jit
    def per_point(x):
        z = jf.invert(field, x, **ACCURATE)
        m2, lip = trajectory_constants(field, x, times)
        return z, m2, lip

    def euler_both_ways(x, n_steps_h):  # a program per step count (the steps are static)
        zhat = jf.invert(field, x, solver="euler", steps=n_steps_h)
        return zhat, jnp.linalg.norm(x - jf.generate(field, zhat, solver="euler", steps=n_steps_h))

    @jax.jit
    @jax.vmap
    def amplification(x, z, zhat):  # the accurate solves: one program for every step count
        dz = zhat - z
        c = jf.intrinsic_instability(gen, z, dz)
        precise = jnp.linalg.norm(x - gen(zhat))
        return jnp.linalg.norm(dz), c, precise

    z, m2, lip = (np.asarray(a) for a in jf.batch_map(per_point, x))
    by_h = []
    for s in progress(steps, desc="Euler step counts", quiet=args.quiet):
        h = 1.0 / s
        zhat, euler_both = jax.jit(jax.vmap(lambda x, s=s: euler_both_ways(x, s)))(x)
        e_inv, c, precise = (np.asarray(a) for a in amplification(x, z, zhat))
        euler_both = np.asarray(euler_both)
        log_b = log_euler_bound(h, m2, lip)
        log_u = log_b + np.log(c)
        eq5 = np.asarray(jf.amplified_error_bound(h, m2, c))
        row = dict(
            steps=s,
            h=h,
            inverted_noise_error=e_inv,
            amplification_C=c,
            error_precise_generation=precise,
            error_euler_both_ways=euler_both,
            log_euler_global_bound=log_b,
            log_U=log_u,
            eq5_lower_bound_on_U=eq5,
            checks=dict(
                inverted_error_within_euler_bound=bool(np.all(np.log(e_inv) <= log_b)),
                gronwall_log_C_le_L=bool(np.all(np.log(c) <= lip)),
                U_ge_eq5=bool(np.all(log_u >= np.log(eq5) - 1e-9)),
                precise_error_le_U=bool(np.all(np.log(precise) <= log_u + 1e-9)),
            ),
            median_ratio_error_over_C_times_inverted_error=float(np.median(precise / (c * e_inv))),
            median_inverted_noise_error=float(np.median(e_inv)),
            median_precise_error=float(np.median(precise)),
            max_C=float(c.max()),
            fraction_C_gt_1=float(np.mean(c > 1)),
        )
        by_h.append(row)
        print(
            f"h=1/{s}: median |zhat-z| {row['median_inverted_noise_error']:.3g}, median "
            f"|x-G(zhat)| {row['median_precise_error']:.3g}, C > 1 at "
            f"{100 * row['fraction_C_gt_1']:.0f}% (max {row['max_C']:.3g}), median error/"
            f"(C|zhat-z|) {row['median_ratio_error_over_C_times_inverted_error']:.3f}, "
            f"checks {row['checks']}",
            flush=True,
        )

    hs = np.array([r["h"] for r in by_h])
    med_e = np.array([r["median_inverted_noise_error"] for r in by_h])
    slope_inverted = float(np.polyfit(np.log(hs), np.log(med_e), 1)[0])
    slope_precise = float(
        np.polyfit(np.log(hs), np.log([r["median_precise_error"] for r in by_h]), 1)[0]
    )
    # Per point: error = C * |zhat - z| * (1 + o(1)); log-log fit over all (point, h).
    all_pred = np.concatenate([r["amplification_C"] * r["inverted_noise_error"] for r in by_h])
    all_err = np.concatenate([r["error_precise_generation"] for r in by_h])
    decomposition_r = float(np.corrcoef(np.log(all_pred), np.log(all_err))[0, 1])
    results = dict(
        x=x,
        z=z,
        M2=m2,
        L=lip,
        by_step=by_h,
        fitted_order_inverted_noise_error=slope_inverted,
        fitted_order_precise_reconstruction_error=slope_precise,
        log_log_correlation_error_vs_C_times_inverted_error=decomposition_r,
        all_checks_pass=bool(all(all(r["checks"].values()) for r in by_h)),
    )
    print(
        f"fitted order of |zhat - z| in h: {slope_inverted:.3f}; of |x - G(zhat)|: "
        f"{slope_precise:.3f}; log-log correlation of |x - G(zhat)| with C |zhat - z|: "
        f"{decomposition_r:.4f}; all Prop. 3.1 checks hold: {results['all_checks_pass']}"
    )
    plot(rec, x, by_h, m2, lip, slope_inverted)
    path = rec.write(results)
    print(f"wrote {rec.png_path()} and {path} in {rec.data['wall_time_s']:.1f} s")
    return results


def plot(rec, x, by_h, m2, lip, slope):
    fig, axes = plt.subplots(2, 2, figsize=(13, 11))
    hs = np.array([r["h"] for r in by_h])
    ax = axes[0, 0]
    e = np.array([r["inverted_noise_error"] for r in by_h])
    ax.fill_between(hs, *np.quantile(e, [0.1, 0.9], axis=1), alpha=0.25, label="10-90% of points")
    ax.plot(hs, np.median(e, 1), "o-", label=f"median $|\\hat z - z|$ (fitted order {slope:.2f})")
    b = np.exp(np.array([r["log_euler_global_bound"] for r in by_h]))
    ax.plot(hs, np.median(b, 1), "s--", color="tab:red", label="median bound $(hM_2/2L)(e^L-1)$")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="Euler step h",
        ylabel="inverted-noise error",
        title="(a) numerical error in the inverted noise (eq. 5, first factor)",
    )
    ax.legend(fontsize=8)

    ax = axes[0, 1]
    cmap = plt.cm.viridis(np.linspace(0, 0.9, len(by_h)))
    for r, col in zip(by_h, cmap, strict=True):
        ax.scatter(
            r["amplification_C"] * r["inverted_noise_error"],
            r["error_precise_generation"],
            s=6,
            color=col,
            label=f"h = 1/{r['steps']}",
        )
    lo = min(r["error_precise_generation"].min() for r in by_h)
    hi = max(r["error_precise_generation"].max() for r in by_h)
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, label="equality")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="$C\\,|\\hat z - z|$,  $C = \\mathcal{E}_G(z, \\hat z - z)$ (exact JVP)",
        ylabel="$|x - G(\\hat z)|$ (precise regeneration)",
        title="(b) error = inverted-noise error x amplification C\n"
        "(until it saturates at the spacing of the modes)",
    )
    ax.legend(fontsize=8, markerscale=3)

    ax = axes[1, 0]
    mid = by_h[len(by_h) // 2]
    sc = ax.scatter(x[:, 0], x[:, 1], c=mid["amplification_C"], s=14, cmap="magma", norm=LogNorm())
    fig.colorbar(sc, ax=ax, label=f"C at h = 1/{mid['steps']}")
    ax.scatter(*np.array(FIG3_MEANS).T, marker="+", s=200, color="cyan", label="mixture means")
    ax.set(
        xlabel="$x_1$",
        ylabel="$x_2$",
        aspect="equal",
        title="(c) where the amplification is: low density between modes",
    )
    ax.legend(fontsize=8)

    ax = axes[1, 1]
    c = mid["amplification_C"]
    h = mid["h"]
    ax.scatter(c, mid["error_precise_generation"] / h, s=6, label="observed $|x - G(\\hat z)|/h$")
    ax.scatter(c, mid["eq5_lower_bound_on_U"] / h, s=6, label="eq. 5: $M_2 (C-1)C / (2\\log C)$")
    ax.scatter(c, np.exp(mid["log_U"]) / h, s=6, label="$U/h = (M_2/2L)(e^L-1)C$")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="amplification C",
        ylabel="error / h",
        title=f"(d) Prop. 3.1 at h = 1/{mid['steps']}: U >= eq. 5 at every point",
    )
    ax.legend(fontsize=8, markerscale=3)
    fig.suptitle(
        "Paper 000 Prop. 3.1: Euler inversion error x instability amplification "
        "(Fig. 3 mixture, rectified flow, x uniform on $[-1,1]^2$)"
    )
    fig.tight_layout()
    fig.savefig(rec.png_path(), dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
