"""Paper 003 section 3, Fig. 1 (column 5) and Fig. 7: robustness of the support.
The two-moons score-based model is run with a score that carries an error
`eps * chi`, for a smooth `chi` and a random one, both of sup norm 1 on the plotted
box and frozen in time, at growing `eps`. The generated law moves *along* the
moons but keeps their support.

The target, path and sampler are those of `moons_lyapunov.py` (an `Empirical` law
on quadrature nodes of the moons, the cosine path, Euler-Maruyama on the reverse
SDE from t = 0.999 to 1e-3); the same runs are made with the probability-flow
ODE (Euler, same grid), whose robustness the paper also reports (appendix G.5).
Each perturbed run uses the same start points and noise as the unperturbed one,
so a sample's displacement `|x_eps - x_0|` is measured path by path.

The number for "how much mass leaves the support" is the fraction of samples
farther than `r` from the moons. As a control, each unperturbed sample is moved by
its own displacement `|x_eps - x_0|` in a uniformly random direction: the mass such
moves would put off the moons if they ignored the geometry.

    python examples/moons_score_error.py [--samples 1000] [--steps 1000]

Writes out/moons_score_error.png and out/moons_score_error.json.
"""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from _common import Record, parser, progress  # noqa: E402
from _moons import (  # noqa: E402
    LIMITS,
    distance_to_nodes,
    draw_moons,
    moons,
    moons_axes,
    moons_field,
    smooth_chi,
)

import jaxflow as jf  # noqa: E402

RADII = (0.05, 0.1)


def _box_grid(m=121):
    g = np.stack(np.meshgrid(np.linspace(*LIMITS[:2], m), np.linspace(*LIMITS[2:], m)), -1).reshape(
        -1, 2
    )
    return jnp.asarray(g)


def random_chi(key, features=32, bandwidth=3.0):
    """A random smooth field (random Fourier features, drawn from `key`),
    scaled to sup norm 1 over the plotted box."""
    kw, kb, ka = jax.random.split(key, 3)
    w = bandwidth * jax.random.normal(kw, (features, 2), jnp.float64)
    b = 2 * jnp.pi * jax.random.uniform(kb, (features,), jnp.float64)
    a = jax.random.normal(ka, (features, 2), jnp.float64)

    def raw(x):
        return jnp.cos(w @ x + b) @ a

    scale = jax.jit(lambda g: jnp.max(jnp.linalg.norm(jax.vmap(raw)(g), axis=1)))(_box_grid())
    return lambda x: raw(x) / scale


def sample(field, z, noise, t_start, t_end, eps, chi, sde):
    """One path from `z` with its noise (EM) or without (PF-ODE, Euler)."""
    steps = noise.shape[0]
    h = (t_start - t_end) / steps
    path = field.path

    def error(x):
        return eps * chi(x)

    def body(x, i):
        t = t_start - i * h
        if sde:
            return jf.reverse_sde_step(field, x, t, h, noise[i], error), None
        # PF-ODE: dx/dt = v - (g^2 / 2) eps chi, integrated from t to t - h
        v = field.velocity(x, t) - 0.5 * path.diffusion_squared(t) * error(x)
        return x - h * v, None

    x, _ = jax.lax.scan(body, z, jnp.arange(steps))
    return x


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--samples", type=int, default=None, help="samples (1000)")
    p.add_argument("--steps", type=int, default=None, help="time steps (1000)")
    p.add_argument("--nodes", type=int, default=400, help="quadrature nodes per moon")
    p.add_argument("--eps", type=float, nargs="+", default=None, help="error sizes")
    p.add_argument("--t-start", type=float, default=0.999)
    p.add_argument("--t-end", type=float, default=1e-3)
    args = p.parse_args(argv)
    samples = args.samples or (200 if args.quick else 1000)
    steps = args.steps or (200 if args.quick else 1000)
    eps_list = args.eps or ([0.0, 1.0, 4.0] if args.quick else [0.0, 0.5, 1.0, 2.0, 4.0, 8.0])
    if eps_list[0] != 0.0:
        eps_list = [0.0, *eps_list]
    rec = Record(
        "moons_score_error",
        args.out,
        dict(
            law=dict(kind="Empirical on two-moons quadrature nodes", nodes_per_moon=args.nodes),
            path="Cosine(offset=0.008)",
            samplers=dict(
                sde="Euler-Maruyama on the reverse SDE, equal steps",
                ode="Euler on the probability-flow ODE, equal steps",
            ),
            score_error="s + eps * chi, chi frozen in time with sup |chi| = 1 on the box",
            chi=dict(
                smooth="(cos(1.3 x2 + 0.4), sin(1.7 x1 - 0.2)) / sqrt(2)",
                random="32 random Fourier features, bandwidth 3, from the seed",
            ),
            eps=eps_list,
            radii=RADII,
            steps=steps,
            t_start=args.t_start,
            t_end=args.t_end,
            samples=samples,
            seed=args.seed,
            quick=args.quick,
        ),
    )
    nodes, _ = moons(args.nodes)
    field = moons_field(nodes)
    kz, kn, kc, kd = jax.random.split(jax.random.PRNGKey(args.seed), 4)
    z = float(field.path.sigma(args.t_start)) * jax.random.normal(kz, (samples, 2), jnp.float64)
    noise = jax.random.normal(kn, (samples, steps, 2), jnp.float64)
    directions = np.array(jax.random.normal(kd, (samples, 2), jnp.float64))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    chis = dict(smooth=smooth_chi(), random=random_chi(kc))
    base = {}
    results = dict(per_chi={}, eps=eps_list, radii=list(RADII))
    generated = {}
    for sampler in ("sde", "ode"):
        for name, chi in chis.items():
            run = jax.jit(
                jax.vmap(
                    lambda z, noise, eps, chi=chi, sde=(sampler == "sde"): sample(
                        field, z, noise, args.t_start, args.t_end, eps, chi, sde
                    ),
                    in_axes=(0, 0, None),
                )
            )
            rows = []
            for eps in progress(
                eps_list, desc=f"{sampler} {name}: error sizes", quiet=args.quiet, leave=False
            ):
                x = np.asarray(run(z, noise, eps))
                if eps == 0.0:
                    base[sampler] = x
                generated[(sampler, name, eps)] = x
                dist, idx = distance_to_nodes(x, nodes)
                position = idx / (len(nodes) // 2)  # along the moons, in [0, 2)
                if eps == 0.0:
                    base_position = position
                shift = np.linalg.norm(x - base[sampler], axis=1)
                control, _ = distance_to_nodes(base[sampler] + shift[:, None] * directions, nodes)
                rows.append(
                    dict(
                        eps=eps,
                        median_distance=float(np.median(dist)),
                        fraction_beyond={str(r): float(np.mean(dist > r)) for r in RADII},
                        median_displacement=float(np.median(shift)),
                        control_fraction_beyond={
                            str(r): float(np.mean(control > r)) for r in RADII
                        },
                        upper_moon_fraction=float(np.mean(idx < len(nodes) // 2)),
                        # W1 between the laws of the position along the moons
                        position_w1_to_unperturbed=float(
                            np.mean(np.abs(np.sort(position) - np.sort(base_position)))
                        ),
                    )
                )
                print(
                    f"{sampler} {name:6s} eps {eps:4.1f}: median distance "
                    f"{rows[-1]['median_distance']:.4f}, beyond 0.1: "
                    f"{rows[-1]['fraction_beyond']['0.1']:.3f} (control "
                    f"{rows[-1]['control_fraction_beyond']['0.1']:.3f}), median shift "
                    f"{rows[-1]['median_displacement']:.3f}, W1 along the moons "
                    f"{rows[-1]['position_w1_to_unperturbed']:.3f}",
                    flush=True,
                )
            results["per_chi"][f"{sampler}_{name}"] = rows
    results["headline"] = _headline(results, eps_list)
    plot(rec, nodes, generated, results, eps_list, chis)
    out = rec.write(results)
    print(f"wrote {rec.png_path()} and {out} in {rec.data['wall_time_s']:.1f} s")
    return results


def _headline(results, eps_list):
    """At the largest eps: mass beyond 0.1 against the control, per run."""
    out = {}
    for key, rows in results["per_chi"].items():
        last = rows[-1]
        out[key] = dict(
            eps=eps_list[-1],
            fraction_beyond_0_1=last["fraction_beyond"]["0.1"],
            control_fraction_beyond_0_1=last["control_fraction_beyond"]["0.1"],
            unperturbed_fraction_beyond_0_1=rows[0]["fraction_beyond"]["0.1"],
            median_displacement=last["median_displacement"],
            position_w1_to_unperturbed=last["position_w1_to_unperturbed"],
        )
    return out


def plot(rec, nodes, generated, results, eps_list, chis):
    panels = [("sde", eps_list[-1]), ("ode", eps_list[-1])]
    fig, axes = plt.subplots(2, 5, figsize=(23, 9.5))
    grid = np.stack(np.meshgrid(np.linspace(*LIMITS[:2], 17), np.linspace(*LIMITS[2:], 13)), -1)
    grid = grid.reshape(-1, 2)
    for row, name in enumerate(("smooth", "random")):
        ax = axes[row, 0]
        c = np.asarray(jax.jit(jax.vmap(chis[name]))(jnp.asarray(grid)))
        ax.quiver(grid[:, 0], grid[:, 1], c[:, 0], c[:, 1], color="k", width=0.003)
        draw_moons(ax, nodes)
        moons_axes(ax, f"({'ab'[row]}) {name} score error $\\chi$ (sup norm 1)")
        for col, (sampler, eps) in enumerate(panels):
            ax = axes[row, col + 1]
            x = generated[(sampler, name, eps)]
            draw_moons(ax, nodes)
            ax.scatter(x[:, 0], x[:, 1], s=2, c="k", alpha=0.5)
            moons_axes(ax, f"{sampler.upper()}, score $s + {eps:g}\\,\\chi$ ({name})")
        # where along the moons the mass sits: the nearest node's index runs along
        # the upper moon, then the lower one
        ax = axes[row, 3]
        half = len(nodes) // 2
        for eps in sorted({0.0, 1.0, eps_list[-1]} & set(eps_list)):
            _, idx = distance_to_nodes(generated[("sde", name, eps)], nodes)
            ax.hist(
                idx / half,
                bins=np.linspace(0, 2, 41),
                histtype="step",
                lw=1.5,
                label=f"eps = {eps:g}",
            )
        ax.axvline(1.0, color="r", lw=0.8)
        ax.set(
            xlabel="position along the moons (0-1 upper, 1-2 lower, by arc length)",
            ylabel="samples",
            title=f"SDE: mass moves along the support ({name})",
        )
        ax.legend(fontsize=8)
        ax = axes[row, -1]
        for sampler, style in (("sde", "-"), ("ode", "--")):
            rows = results["per_chi"][f"{sampler}_{name}"]
            eps = [r["eps"] for r in rows]
            ax.plot(
                eps,
                [r["fraction_beyond"]["0.1"] for r in rows],
                "o" + style,
                color="tab:blue" if sampler == "sde" else "tab:green",
                label=f"{sampler.upper()}: generated",
            )
            ax.plot(
                eps,
                [r["control_fraction_beyond"]["0.1"] for r in rows],
                "s" + style,
                color="tab:red" if sampler == "sde" else "tab:orange",
                label=f"{sampler.upper()}: same shifts, random directions",
            )
        ax.set(
            xlabel="$\\varepsilon$",
            ylabel="fraction farther than 0.1 from the moons",
            title="mass leaving the support",
            ylim=(-0.02, 1.02),
        )
        ax.legend(fontsize=7, loc="center right")
    fig.suptitle(
        "Paper 003 section 3 / Fig. 1, 7: score errors move the generated law along the moons, "
        "not off them"
    )
    fig.tight_layout()
    fig.savefig(rec.png_path(), dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
