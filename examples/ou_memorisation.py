"""Paper 002 sections 3-4 on the OU path: the exact DDPM step (Prop. 4.3), the
Dirac target (Theorem 2) and memorisation (Corollary 3.3, Fig. 10).

(a) Prop. 4.3: the DDPM step with a frozen denoiser, eq. 4.22-4.24, against the
    integrating-factor form eq. 4.21, over a grid of (t, h).
(b) Theorem 2: for a Dirac target `x0`, started at a fixed `X_0`, the reverse
    dynamics have `X_s ~ N(m(s), v(s) I)` with eq. 4.12's `m` and `v`. Samples
    from DDPM (exact at any step count here) and from Euler-Maruyama on the
    reverse SDE are tested against it at several `s` (z-tests on the mean and the
    variance).
(c) Corollary 3.3, Fig. 10: for an empirical target of N points the exact reverse
    dynamics end on the training points. Reverse SDE (Euler-Maruyama), DDPM and
    the probability-flow ODE (Euler) run from N(0, I) at T = 5 down to
    `t_min = 1e-5` on a geometric time grid; the distance from each sample to its
    nearest training point is measured against the step count and N, beside
    the exact law's median `sigma(t_min) sqrt(2 ln 2)`.

    python examples/ou_memorisation.py [--samples 500]

Writes out/ou_memorisation.png and out/ou_memorisation.json.
"""

import math

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from _common import Record, parser, progress  # noqa: E402

import jaxflow as jf  # noqa: E402

DIRAC = dict(T=3.0, x0=[1.0, -0.5], start=[2.0, 1.0])
T_MIN = 1e-5
S_VALUES = (0.5, 1.5, 2.5, 2.9)


def two_sided_p(z):
    return math.erfc(abs(z) / math.sqrt(2))


def theorem_2(T, s, start, x0):
    """Paper 002 eq. 4.12: mean and variance (per coordinate) of X_s given X_0."""
    sh = np.sinh
    mean = sh(T - s) / sh(T) * np.asarray(start) + sh(s) / sh(T) * np.asarray(x0)
    return mean, 2 * sh(T - s) * sh(s) / sh(T)


def prop_4_3_check():
    """Largest relative gap between eq. 4.23-4.24 (via `ddpm_coefficients`) and
    eq. 4.21 over a grid of t and h."""
    path = jf.OrnsteinUhlenbeck(10.0)
    worst = 0.0
    for t in np.geomspace(1e-3, 10.0, 25):
        for frac in (1e-3, 0.01, 0.1, 0.5, 0.9, 1.0):
            h = frac * t
            tn = t - h
            got = np.array([float(c) for c in jf.ddpm_coefficients(path, t, tn)])
            ref = np.array(
                [
                    np.sinh(tn) / np.sinh(t),
                    np.sinh(h) / np.sinh(t),
                    2 * np.sinh(tn) * np.sinh(h) / np.sinh(t),
                ]
            )
            gap = np.abs(got - ref) / np.maximum(np.abs(ref), 1e-300)
            worst = max(worst, float(gap[ref != 0].max()))
    return worst


def z_tests(xs, mean, var):
    """z-tests of a Gaussian sample's mean and variance (per coordinate) against
    `N(mean, var I)`, with a Bonferroni p-value over them."""
    m = len(xs)
    z_mean = (xs.mean(0) - mean) / np.sqrt(var / m)
    # Var(S^2) = 2 v^2 / (m - 1) for a Gaussian sample
    z_var = (xs.var(0, ddof=1) - var) / (var * np.sqrt(2 / (m - 1)))
    zs = np.concatenate([z_mean, z_var])
    return dict(
        mean=xs.mean(0),
        var=xs.var(0, ddof=1),
        z_mean=z_mean,
        z_var=z_var,
        p_value=min(1.0, len(zs) * min(two_sided_p(z) for z in zs)),
    )


def euler_maruyama_law(T, s, steps, start, x0):
    """Exact mean and variance of the Euler-Maruyama scheme (eq. 4.19, with noise
    sqrt(2 h)) for a Dirac target: the scheme is linear,
    `x <- (1 + h - 2 h / beta_t) x + 2 h e^{-t} x0 / beta_t + sqrt(2 h) xi`."""
    h = s / steps
    mean, var = np.asarray(start, float), 0.0
    for k in range(steps):
        t = T - k * h
        beta = -np.expm1(-2 * t)
        a = 1 + h - 2 * h / beta
        mean = a * mean + 2 * h * np.exp(-t) * np.asarray(x0) / beta
        var = a * a * var + 2 * h
    return mean, var


def dirac_part(key, samples, em_steps, ddpm_steps, quiet=False):
    T, x0, start = DIRAC["T"], jnp.asarray(DIRAC["x0"]), jnp.asarray(DIRAC["start"])
    field = jf.AnalyticField(jf.Empirical(x0[None]), jf.OrnsteinUhlenbeck(T))
    k_em, k_dd = jax.random.split(key)
    keys_em, keys_dd = jax.random.split(k_em, samples), jax.random.split(k_dd, samples)
    # the end time is traced, so each sampler compiles once for every s
    em_run = jax.jit(
        jax.vmap(
            lambda k, t_end: jf.sample_sde(
                field, start, k, steps=em_steps, t_noise=T, t_data=t_end
            ),
            in_axes=(0, None),
        )
    )
    dd_run = jax.jit(
        jax.vmap(
            lambda k, t_end: jf.sample_ddpm(
                field, start, k, steps=ddpm_steps, t_noise=T, t_data=t_end
            ),
            in_axes=(0, None),
        )
    )
    rows = []
    for i, s in progress(
        enumerate(S_VALUES), total=len(S_VALUES), desc="Theorem 2: times s", quiet=quiet
    ):
        # fresh paths at each s, so that the tests at different s are independent
        fresh = jax.vmap(lambda k, i=i: jax.random.fold_in(k, i))
        em, dd = em_run(fresh(keys_em), T - s), dd_run(fresh(keys_dd), T - s)
        mean_ref, var_ref = theorem_2(T, s, start, x0)
        mean_em, var_em = euler_maruyama_law(T, s, em_steps, start, x0)
        row = dict(
            s=s,
            mean_eq_4_12=mean_ref,
            var_eq_4_12=var_ref,
            euler_maruyama_scheme_var=var_em,
            euler_maruyama_scheme_var_bias=var_em / var_ref - 1,
        )
        # DDPM is tested against eq. 4.12 itself; Euler-Maruyama against the exact
        # law of its own scheme, which differs from eq. 4.12 by the O(h) bias above
        for name, xs, mean, var in (
            ("ddpm", dd, mean_ref, var_ref),
            ("euler_maruyama", em, mean_em, var_em),
        ):
            row[name] = z_tests(np.asarray(xs), mean, var)
        rows.append(row)
        print(
            f"Theorem 2, s = {s}: var eq. 4.12 {var_ref:.4f}; DDPM {row['ddpm']['var'].round(4)} "
            f"(p {row['ddpm']['p_value']:.2f}); EM {row['euler_maruyama']['var'].round(4)} "
            f"(p {row['euler_maruyama']['p_value']:.2g} against its scheme's law, whose "
            f"variance is off eq. 4.12 by {100 * row['euler_maruyama_scheme_var_bias']:+.1f}%)",
            flush=True,
        )
    return rows


def padded_grid(t_noise, steps, length):
    """A geometric grid from t_noise to T_MIN in `steps` steps, padded with T_MIN
    to `length` steps: a step from T_MIN to T_MIN is the identity for all three
    samplers (h = 0, and the DDPM step's variance is 0)."""
    grid = np.geomspace(t_noise, T_MIN, steps + 1)
    return jnp.asarray(np.concatenate([grid, np.full(length - steps, T_MIN)]))


def nearest_distance(x, points):
    return np.sqrt(((np.asarray(x)[:, None] - points[None]) ** 2).sum(-1)).min(1)


def reverse_paths(field, z, key, grid, sampler):
    """Reverse dynamics of one sample on the time grid `grid` (decreasing)."""
    path = field.path

    def body(x, i):
        t, tn = grid[i], grid[i + 1]
        h = t - tn
        xi = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        if sampler == "sde":
            x = jf.reverse_sde_step(field, x, t, h, xi)
        elif sampler == "ddpm":
            x = jf.ddpm_step(path, x, t, tn, field.denoise(x, t), xi)
        else:
            x = x - h * field.velocity(x, t)
        return x, x

    x, xs = jax.lax.scan(body, z, jnp.arange(len(grid) - 1))
    return x, xs


def memorisation_part(key, samples, sizes, step_counts, record_paths_n, quiet=False):
    kp, kz, kn = jax.random.split(key, 3)
    path = jf.OrnsteinUhlenbeck()
    sigma_min = float(path.sigma(T_MIN))
    exact_median = sigma_min * math.sqrt(2 * math.log(2))
    out = dict(
        t_min=T_MIN,
        sigma_t_min=sigma_min,
        exact_law_median_distance=exact_median,
        per_N={},
    )
    traj = None
    for n_points in sizes:
        points = jax.random.uniform(
            jax.random.fold_in(kp, n_points), (n_points, 2), minval=-1, maxval=1
        )
        field = jf.AnalyticField(jf.Empirical(points), path)
        z = jax.random.normal(jax.random.fold_in(kz, n_points), (samples, 2), jnp.float64)
        keys = jax.random.split(jax.random.fold_in(kn, n_points), samples)
        pts = np.asarray(points)
        denoise = jax.jit(jax.vmap(lambda y, field=field: field.denoise(y, T_MIN)))
        spacing = np.sqrt(
            ((pts[:, None] - pts[None]) ** 2).sum(-1) + np.diag(np.full(n_points, np.inf))
        )
        per = dict(median_training_spacing=float(np.median(spacing.min(1))), runs={})
        for sampler in ("sde", "ddpm", "ode"):
            # one compilation per sampler and N: the grids are traced, padded to one length
            run = jax.jit(
                jax.vmap(
                    lambda z, key, grid, s=sampler, f=field: reverse_paths(f, z, key, grid, s),
                    in_axes=(0, 0, None),
                )
            )
            rows = []
            for k in progress(
                step_counts, desc=f"N = {n_points} {sampler}: step counts", quiet=quiet, leave=False
            ):
                x, xs = run(z, keys, padded_grid(path.t_noise, k, max(step_counts)))
                xs = xs[:, :k]
                x = np.asarray(x)
                d = nearest_distance(x, pts)
                rows.append(
                    dict(
                        steps=k,
                        median_distance=float(np.median(d)),
                        fraction_within_5_sigma=float(np.mean(d < 5 * sigma_min)),
                        # a last DDPM step to t = 0 returns the denoiser's value
                        median_distance_after_final_denoise=float(
                            np.median(nearest_distance(denoise(x), pts))
                        ),
                    )
                )
                if n_points == record_paths_n and k == step_counts[-1] and sampler == "sde":
                    # the last stretch, t <= 1: before it the paths are mostly noise
                    times = np.geomspace(path.t_noise, T_MIN, k + 1)[1:]
                    traj = dict(points=pts, paths=np.asarray(xs[:8, times <= 1.0]))
            per["runs"][sampler] = rows
            print(
                f"N = {n_points:4d} {sampler:4s}: median distance to the nearest training point "
                + ", ".join(f"{r['median_distance']:.2g} ({r['steps']} steps)" for r in rows)
                + f"; exact law {exact_median:.2g}",
                flush=True,
            )
        out["per_N"][str(n_points)] = per
    return out, traj


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--samples", type=int, default=None, help="samples per run (500)")
    args = p.parse_args(argv)
    samples = args.samples or (200 if args.quick else 500)
    dirac_samples = 1000 if args.quick else 4000
    sizes = [5, 50] if args.quick else [5, 50, 500]
    step_counts = [10, 100] if args.quick else [10, 30, 100, 300, 1000]
    rec = Record(
        "ou_memorisation",
        args.out,
        dict(
            path="OrnsteinUhlenbeck(T): alpha = exp(-t), sigma^2 = 1 - exp(-2t) (002 eq. 2.11)",
            dirac=dict(DIRAC, s=S_VALUES, samples=dirac_samples, em_steps=300, ddpm_steps=7),
            memorisation=dict(
                T=5.0,
                t_min=T_MIN,
                grid="geometric in t from T to t_min",
                training_points="uniform on [-1, 1]^2",
                sizes=sizes,
                step_counts=step_counts,
                samples=samples,
                samplers=dict(
                    sde="Euler-Maruyama on the reverse SDE (eq. 4.19 with noise sqrt(2 h))",
                    ddpm="DDPM step eq. 4.22-4.24 with x0_bar = the exact denoiser",
                    ode="Euler on the probability-flow ODE",
                ),
            ),
            seed=args.seed,
            quick=args.quick,
        ),
    )
    k1, k2 = jax.random.split(jax.random.PRNGKey(args.seed))
    results = dict(prop_4_3_max_relative_gap=prop_4_3_check())
    print(f"Prop. 4.3: eq. 4.23-4.24 equal eq. 4.21 to {results['prop_4_3_max_relative_gap']:.1e}")
    results["theorem_2"] = dirac_part(k1, dirac_samples, 300, 7, quiet=args.quiet)
    results["memorisation"], traj = memorisation_part(
        k2, samples, sizes, step_counts, sizes[0], quiet=args.quiet
    )
    plot(rec, results, traj)
    out = rec.write(results)
    print(f"wrote {rec.png_path()} and {out} in {rec.data['wall_time_s']:.1f} s")
    return results


def plot(rec, results, traj):
    fig, axes = plt.subplots(1, 4, figsize=(24, 5.8))
    ax = axes[0]
    rows = results["theorem_2"]
    s = np.array([r["s"] for r in rows])
    T = DIRAC["T"]
    fine = np.linspace(0, T, 200)
    ax.plot(
        fine, 2 * np.sinh(T - fine) * np.sinh(fine) / np.sinh(T), "k-", label="eq. 4.12 variance"
    )
    for name, marker in (("ddpm", "o"), ("euler_maruyama", "x")):
        ax.plot(
            s,
            [np.mean(r[name]["var"]) for r in rows],
            marker,
            ms=8,
            label=f"{name} sample variance",
        )
    mean_line = np.array([theorem_2(T, f, DIRAC["start"], DIRAC["x0"])[0][0] for f in fine])
    ax.plot(fine, mean_line, "k--", label="eq. 4.12 mean (first coordinate)")
    ax.plot(
        s, [r["ddpm"]["mean"][0] for r in rows], "o", mfc="none", ms=8, label="ddpm sample mean"
    )
    ax.set(xlabel="s = T - t", title="(a) Theorem 2: Dirac target, T = 3")
    ax.legend(fontsize=8)

    mem = results["memorisation"]
    for ax, sampler in zip(axes[1:3], ("sde", "ode"), strict=True):
        for n, per in mem["per_N"].items():
            runs = per["runs"][sampler]
            ax.loglog(
                [r["steps"] for r in runs],
                [r["median_distance"] for r in runs],
                "o-",
                label=f"N = {n}",
            )
            if sampler == "sde":
                ddpm = per["runs"]["ddpm"]
                ax.loglog(
                    [r["steps"] for r in ddpm],
                    [r["median_distance"] for r in ddpm],
                    "s:",
                    mfc="none",
                    label=f"N = {n}, DDPM",
                )
        ax.axhline(mem["exact_law_median_distance"], color="k", ls="--", label="exact law at t_min")
        ax.set(
            xlabel="steps (geometric grid, T = 5 to 1e-5)",
            ylabel="median distance to nearest training point",
            title=f"({'bc'[sampler == 'ode']}) {'reverse SDE' if sampler == 'sde' else 'PF-ODE'}: "
            "samples end on training points",
        )
        ax.legend(fontsize=8)

    ax = axes[3]
    pts = traj["points"]
    axis = np.linspace(-2.5, 2.5, 301)
    g = np.stack(np.meshgrid(axis, axis), -1).reshape(-1, 2)
    cell = np.argmin(((g[:, None] - pts[None]) ** 2).sum(-1), axis=1).reshape(301, 301)
    ax.imshow(cell, extent=(-2.5, 2.5, -2.5, 2.5), origin="lower", cmap="Pastel1", alpha=0.8)
    for full in traj["paths"]:
        ax.plot(full[0, 0], full[0, 1], "o", color="tab:blue", ms=4)
        ax.plot(full[:, 0], full[:, 1], lw=0.6, color="tab:blue", alpha=0.7)
    ax.scatter(pts[:, 0], pts[:, 1], c="k", s=40, marker="*", zorder=3, label="training points")
    ax.set(
        xlim=(-2.5, 2.5),
        ylim=(-2.5, 2.5),
        aspect="equal",
        title="(d) Fig. 10: SDE paths from t = 1 (dots) end on training points",
    )
    ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("Paper 002: the OU path's reverse dynamics, the DDPM step and memorisation")
    fig.tight_layout()
    fig.savefig(rec.png_path(), dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
