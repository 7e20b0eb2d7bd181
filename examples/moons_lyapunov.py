"""Paper 003 Fig. 1, 3, 4: a score-based model of two moons, its leading finite-time
Lyapunov vectors at the generated samples, and their alignment with the support.

The target is the arc-length measure on the two moons (upper: (cos u, sin u),
lower: (1 - cos u, 1/2 - sin u), u in [0, pi]), represented by an `Empirical` law
on equally spaced quadrature nodes (paper 003 appendix G.2; docs/mathematics.md §3), under the
cosine path. Samples come from Euler-Maruyama on the reverse SDE (appendix G.1,
in jaxflow's convention, see below). Along each sample path, with its noise
frozen, the one-step maps are differentiated and a QR-propagated frame gives the
finite-time Lyapunov exponents and vectors (section 4). The figure shows:

(a, b) the score field and density at two times; (c) the generated samples with the
moons; (d) the leading Lyapunov vector at generated samples and one path;
(e) histograms of the alignment |<s/|s|, q_i>| (Def. 4.2) and of |<tangent, q_1>|;
(f) the exponents of each path.

    python examples/moons_lyapunov.py [--samples 400] [--steps 1000]

Writes out/moons_lyapunov.png and out/moons_lyapunov.json.
"""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from _common import Record, parser  # noqa: E402
from _moons import (  # noqa: E402
    LIMITS,
    distance_to_nodes,
    draw_moons,
    draw_vectors,
    moons,
    moons_axes,
    moons_field,
)

import jaxflow as jf  # noqa: E402


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--samples", type=int, default=None, help="sample paths (400)")
    p.add_argument("--steps", type=int, default=None, help="Euler-Maruyama steps (1000)")
    p.add_argument("--nodes", type=int, default=400, help="quadrature nodes per moon")
    p.add_argument("--t-start", type=float, default=0.999)
    p.add_argument("--t-end", type=float, default=1e-3, help="early stopping time Delta")
    args = p.parse_args(argv)
    samples = args.samples or (48 if args.quick else 400)
    steps = args.steps or (200 if args.quick else 1000)
    rec = Record(
        "moons_lyapunov",
        args.out,
        dict(
            law=dict(kind="Empirical on two-moons quadrature nodes", nodes_per_moon=args.nodes),
            path="Cosine(offset=0.008)",
            sampler="Euler-Maruyama on the reverse SDE, equal steps",
            steps=steps,
            t_start=args.t_start,
            t_end=args.t_end,
            samples=samples,
            lyapunov="QR on the one-step maps with the noise frozen, full spectrum (k = 2)",
            seed=args.seed,
            quick=args.quick,
        ),
    )
    nodes, tangents = moons(args.nodes)
    field = moons_field(nodes)
    path = field.path
    h = (args.t_start - args.t_end) / steps

    def path_step(x, i, noise):
        # i indexes the frozen noise of this path
        return jf.reverse_sde_step(field, x, args.t_start - i * h, h, noise[i])

    kz, kn = jax.random.split(jax.random.PRNGKey(args.seed))
    sigma0 = float(path.sigma(args.t_start))
    z = sigma0 * jax.random.normal(kz, (samples, 2), jnp.float64)
    noise = jax.random.normal(kn, (samples, steps, 2), jnp.float64)

    @jax.jit
    def one(z, noise):
        spec = jf.lyapunov_spectrum_of_map(
            lambda x, i: path_step(x, i, noise), z, steps, save_stretch=False
        )
        x = spec.final_state
        score = field.score(x, args.t_end)
        return x, spec.exponents, spec.vectors, jf.alignment(score, spec.vectors)

    x, exponents, vectors, align = (np.asarray(a) for a in jax.vmap(one)(z, noise))
    distance, nearest = distance_to_nodes(x, nodes)
    tangent_align = np.abs(np.einsum("mn,mn->m", tangents[nearest], vectors[:, :, 0]))
    results = dict(
        samples=x,
        exponents=exponents,
        leading_vectors=vectors[:, :, 0],
        alignment_score_q1=align[:, 0],
        alignment_score_q2=align[:, 1],
        tangent_alignment_q1=tangent_align,
        distance_to_support=distance,
        median_alignment_score_q1=float(np.median(align[:, 0])),
        median_alignment_score_q2=float(np.median(align[:, 1])),
        fraction_alignment_q1_below_0_1=float(np.mean(align[:, 0] < 0.1)),
        median_tangent_alignment_q1=float(np.median(tangent_align)),
        median_distance_to_support=float(np.median(distance)),
        median_exponents=np.median(exponents, 0),
        fraction_lambda1_positive=float(np.mean(exponents[:, 0] > 0)),
    )
    print(
        f"{samples} paths, {steps} EM steps: median distance to the moons "
        f"{results['median_distance_to_support']:.3g}; median |<s/|s|, q1>| "
        f"{results['median_alignment_score_q1']:.3g} (< 0.1 for "
        f"{100 * results['fraction_alignment_q1_below_0_1']:.0f}%), |<s/|s|, q2>| "
        f"{results['median_alignment_score_q2']:.3g}; median |<tangent, q1>| "
        f"{results['median_tangent_alignment_q1']:.4f}; median exponents "
        f"{np.round(results['median_exponents'], 3).tolist()} per step",
        flush=True,
    )
    plot(rec, field, nodes, x, vectors, align, tangent_align, exponents, z, noise, path_step, args)
    out = rec.write(results)
    print(f"wrote {rec.png_path()} and {out} in {rec.data['wall_time_s']:.1f} s")
    return results


def plot(rec, field, nodes, x, vectors, align, tangent_align, exponents, z, noise, path_step, args):
    fig, axes = plt.subplots(2, 3, figsize=(18, 11))
    lim = LIMITS
    g = np.linspace(lim[0], lim[1], 161), np.linspace(lim[2], lim[3], 121)
    grid = jnp.stack(jnp.meshgrid(*g), -1).reshape(-1, 2)
    q = np.stack(np.meshgrid(np.linspace(lim[0], lim[1], 21), np.linspace(lim[2], lim[3], 16)), -1)
    q = q.reshape(-1, 2)
    # one program for both times (t is traced), not the law op by op
    density_and_score = jax.jit(
        lambda grid, q, t: (
            jax.vmap(lambda y: field.log_prob(y, t))(grid),
            jax.vmap(lambda y: field.score(y, t))(q),
        )
    )
    for ax, t, label in ((axes[0, 0], 0.9, "a"), (axes[0, 1], 0.1, "b")):
        logp, s = (np.asarray(a) for a in density_and_score(grid, jnp.asarray(q), t))
        logp = logp.reshape(121, 161)
        ax.contourf(g[0], g[1], np.exp(logp), levels=20, cmap="Blues")
        s = s / np.linalg.norm(s, axis=1, keepdims=True)
        ax.quiver(q[:, 0], q[:, 1], s[:, 0], s[:, 1], color="k", width=0.002, scale=35)
        draw_moons(ax, nodes)
        moons_axes(ax, f"({label}) density $p_t$ and score direction at t = {t}")
    ax = axes[0, 2]
    draw_moons(ax, nodes, label="support (two moons)")
    ax.scatter(x[:, 0], x[:, 1], s=4, c="k", label="generated samples")
    moons_axes(ax, f"(c) generated samples (EM, t: {args.t_start} to {args.t_end})")
    ax.legend(fontsize=8)

    ax = axes[1, 0]
    draw_moons(ax, nodes)
    draw_vectors(ax, x, vectors[:, :, 0])
    # one sample path, re-run with its frozen noise
    path = [np.asarray(z[0])]
    y = z[0]
    step = jax.jit(lambda y, i: path_step(y, i, noise[0]))
    for i in range(noise.shape[1]):
        y = step(y, i)
        path.append(np.asarray(y))
    path = np.array(path)
    ax.plot(path[:, 0], path[:, 1], color="tab:blue", lw=0.5, alpha=0.6, label="one reverse path")
    moons_axes(ax, "(d) leading Lyapunov vector $q_1$ at the samples")
    ax.legend(fontsize=8)

    ax = axes[1, 1]
    bins = np.linspace(0, 1, 26)
    ax.hist(align[:, 0], bins, alpha=0.7, label="$|\\langle s/|s|, q_1\\rangle|$")
    ax.hist(align[:, 1], bins, alpha=0.7, label="$|\\langle s/|s|, q_2\\rangle|$")
    ax.hist(
        tangent_align,
        bins,
        histtype="step",
        color="k",
        lw=1.5,
        label="$|\\langle T, q_1\\rangle|$, T the moon's tangent",
    )
    ax.set(
        xlabel="alignment",
        ylabel="samples",
        title="(e) $q_1$ is orthogonal to the score, tangent to the moons",
    )
    ax.legend(fontsize=8)

    ax = axes[1, 2]
    ax.scatter(exponents[:, 0], exponents[:, 1], s=6)
    ax.set(
        xlabel="$\\lambda_1$ (per step)",
        ylabel="$\\lambda_2$ (per step)",
        title="(f) finite-time exponents of each path",
    )
    fig.suptitle(
        "Paper 003 Fig. 1/3/4: score-based model of two moons (exact score on quadrature nodes, "
        "cosine path, Euler-Maruyama); Lyapunov vectors by QR"
    )
    fig.tight_layout()
    fig.savefig(rec.png_path(), dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
