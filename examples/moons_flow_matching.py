"""Paper 003 appendix G.5, Fig. 7-8: trained generative models of two moons, their
robustness to vector-field errors, and the alignment of their leading Lyapunov
vector with the support.

Four models are trained here by `jf.train` on 20,000 points of the moons (the
curves themselves, no noise), each an `MLP`:

- `cfm`: conditional flow matching on the straight line `(1 - t) X + t X0`,
  independent coupling;
- `ot_cfm`: the same with the minibatch optimal-transport coupling (Tong et al. 2024);
- `si`: the variance-preserving stochastic interpolant `cos(pi t / 2) X +
  sin(pi t / 2) X0` (Albergo et al. 2023; `jf.Cosine(0.0)`);
- `sgm`: a score-based model, denoising score matching (noise parameterisation) on
  the cosine path, read as a `LearnedField`.

The three flow models learn from the source `--source` (paper 003 G.5 uses eight
Gaussians, the default, and reports the same with a standard normal); with eight
Gaussians they are `InterpolantField`s, with a velocity and no score. The
score-based model starts from the standard normal, as it must.

Each generates 1000 samples with its probability-flow ODE (Euler) from its source,
with the velocity perturbed by `eps * chi` (the smooth `chi` of
`moons_score_error.py`, sup norm 1: an L-infinity error of size `eps`, as in
Fig. 7) for `eps = 0, 0.5, 1`. At `eps = 0`, the finite-time Lyapunov spectrum of
each path gives its leading vector `q_1` at the sample (Fig. 8), compared with the
curve's tangent and with the exact score of the moons under the model's path.
A table ranks the models by the mass the errors push off the moons (the fraction
beyond 0.1 at `eps = 1` less that at `eps = 0`) and by the alignment.

    python examples/moons_flow_matching.py [--steps 4000] [--samples 1000]

Writes out/moons_flow_matching.png and out/moons_flow_matching.json. Trained
weights are cached under `--cache` (default out/cache) and reused.
"""

import os

import jax

jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _common import Record, final_loss, parser, progress  # noqa: E402
from _moons import (  # noqa: E402
    distance_to_nodes,
    draw_moons,
    draw_vectors,
    moons,
    moons_axes,
    smooth_chi,
)

import jaxflow as jf  # noqa: E402

MODELS = dict(
    cfm=dict(path="rectified_flow", parameterisation="velocity", coupling="independent"),
    ot_cfm=dict(path="rectified_flow", parameterisation="velocity", coupling="ot"),
    si=dict(path="vp_interpolant", parameterisation="velocity", coupling="independent"),
    sgm=dict(path="cosine", parameterisation="noise", coupling="independent"),
)
# the cosine path's velocity, read from a noise prediction, grows like 1/(1 - t)
# at the noise end; start it where Euler steps stay stable
T_START = dict(rectified_flow=1.0, vp_interpolant=1.0, cosine=0.98)
SOURCES = ("eight_gaussians", "normal")
EPS = (0.0, 0.5, 1.0)


def make_path(name):
    return dict(
        rectified_flow=jf.RectifiedFlow(), vp_interpolant=jf.Cosine(0.0), cosine=jf.Cosine()
    )[name]


def eight_gaussians(key, b):
    return jf.data.eight_gaussians(key, b, dtype=jnp.float64)


def source_of(spec, args):
    """The model's source sampler, or None for the standard normal."""
    if spec["parameterisation"] == "velocity" and args.source == "eight_gaussians":
        return eight_gaussians
    return None


def train_model(name, spec, data, args, width, depth, batch):
    path = make_path(spec["path"])
    source = source_of(spec, args)
    model = jf.nn.MLP(2, width, depth, key=jax.random.PRNGKey(args.seed + 1))
    tag = "8g" if source is not None else "normal"
    cache = os.path.join(
        args.cache, f"moons_{name}_{tag}_{args.train_steps}_{width}x{depth}_seed{args.seed}"
    )

    def loss(m, x, k):
        return jf.flow_matching_loss(
            m,
            path,
            x,
            k,
            parameterisation=spec["parameterisation"],
            coupling=spec["coupling"],
            source=source,
        )

    result = jf.train(
        model,
        loss,
        data,
        steps=args.train_steps,
        key=jax.random.PRNGKey(args.seed + 2),
        optimiser=optax.adam(optax.cosine_decay_schedule(2e-3, args.train_steps)),
        batch_size=batch,
        chunk=250,
        checkpoint_dir=cache,
        checkpoint_every=args.train_steps,
        config=dict(model=name, source=tag, **spec),
        progress=not args.quiet,
    )
    if source is not None:
        return jf.InterpolantField(result.ema, path), result
    return jf.LearnedField(result.ema, path, spec["parameterisation"]), result


def generate(field, t_start, z, eps, chi, steps):
    """Euler on the perturbed PF-ODE, with the full Lyapunov spectrum of the path."""

    def f(x, t):
        return field.velocity(x, t) + eps * chi(x)

    spec = jf.lyapunov_spectrum(
        f, z, t_start, 1e-3, steps=steps, solver="euler", save_stretch=False
    )
    return spec.final_state, spec.vectors[:, 0], spec.exponents


@eqx.filter_jit
def generate_all(field, t_start, z, eps, chi, steps):
    """`generate` at every sample and every `eps` (an array) in one program: the field
    and `eps` are arguments, not closures, so models of the same kind share it."""
    per_sample = jax.vmap(generate, in_axes=(None, None, 0, None, None, None))
    return jax.vmap(per_sample, in_axes=(None, None, None, 0, None, None))(
        field, t_start, z, eps, chi, steps
    )


@eqx.filter_jit
def exact_score(field, x):
    """The score at `t = 1e-3` of each row: one program per path, not op by op."""
    return jax.vmap(lambda y: field.score(y, 1e-3))(x)


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--train-steps", type=int, default=None, help="training steps (4000)")
    p.add_argument("--samples", type=int, default=None, help="generated samples (1000)")
    p.add_argument("--ode-steps", type=int, default=None, help="Euler steps (200)")
    p.add_argument("--cache", default=None, help="trained weights (default <out>/cache)")
    p.add_argument(
        "--source", choices=SOURCES, default="eight_gaussians", help="flow models' source"
    )
    args = p.parse_args(argv)
    args.train_steps = args.train_steps or (200 if args.quick else 4000)
    args.cache = args.cache or os.path.join(args.out, "cache")
    samples = args.samples or (100 if args.quick else 1000)
    args.ode_steps = args.ode_steps or (50 if args.quick else 200)
    width, depth = (64, 2) if args.quick else (128, 3)
    # --quick: half the batch, a quarter of the OT coupling's Sinkhorn work (b^2 a
    # step, most of the quick run's training time)
    batch = 128 if args.quick else 256
    rec = Record(
        "moons_flow_matching",
        args.out,
        dict(
            models=MODELS,
            network=dict(kind="MLP", width=width, depth=depth, time_embedding=32),
            training=dict(
                steps=args.train_steps,
                batch=batch,
                optimiser="adam, cosine decay from 2e-3",
                data="20,000 points on the two moons (no noise)",
                ema_decay=0.999,
            ),
            generation=dict(
                solver="Euler on the PF-ODE",
                steps=args.ode_steps,
                t_start=T_START,
                t_end=1e-3,
                samples=samples,
            ),
            source=dict(flow_models=args.source, sgm="normal"),
            error="eps * chi added to the velocity, chi smooth with sup norm 1",
            eps=EPS,
            seed=args.seed,
            quick=args.quick,
        ),
    )
    data = jf.data.two_moons(jax.random.PRNGKey(args.seed), 20_000, noise=0.0, dtype=jnp.float64)
    nodes, tangents = moons(400)
    chi = smooth_chi()
    z_key = jax.random.PRNGKey(args.seed + 3)
    results = dict(per_model={})
    generated = {}
    for name, spec in progress(MODELS.items(), desc="models", quiet=args.quiet):
        field, trained = train_model(name, spec, data, args, width, depth, batch)
        path = field.path
        t_start = T_START[spec["path"]]
        if source_of(spec, args) is not None:
            z = eight_gaussians(z_key, samples)
        else:
            z = float(path.sigma(t_start)) * jax.random.normal(z_key, (samples, 2), jnp.float64)
        every_eps = generate_all(field, t_start, z, jnp.asarray(EPS), chi, args.ode_steps)
        exact = jf.AnalyticField(jf.Empirical(jnp.asarray(nodes)), path)
        rows = {}
        for j, eps in enumerate(EPS):
            x, q1, exponents = (np.asarray(a[j]) for a in every_eps)
            generated[(name, eps)] = (x, q1)
            dist, idx = distance_to_nodes(x, nodes)
            row = dict(
                fraction_beyond_0_1=float(np.mean(dist > 0.1)),
                median_distance=float(np.median(dist)),
            )
            if eps == 0.0:
                score = np.asarray(exact_score(exact, jnp.asarray(x)))
                align_score = np.abs(np.sum(score * q1, 1)) / np.linalg.norm(score, axis=1)
                align_tangent = np.abs(np.sum(tangents[idx] * q1, 1))
                row.update(
                    median_alignment_score_q1=float(np.median(align_score)),
                    median_tangent_alignment_q1=float(np.median(align_tangent)),
                    fraction_alignment_below_0_1=float(np.mean(align_score < 0.1)),
                    median_exponents=np.median(exponents, 0),
                    alignment_score_q1=align_score,
                )
                base_position = idx / 400
            row["position_w1_to_unperturbed"] = float(
                np.mean(np.abs(np.sort(idx / 400) - np.sort(base_position)))
            )
            rows[str(eps)] = row
        results["per_model"][name] = dict(
            final_loss=final_loss(trained),  # None for cached weights
            eps=rows,
        )
        print(
            f"{name:6s}: final loss {results['per_model'][name]['final_loss']}; median "
            f"distance {rows['0.0']['median_distance']:.3f}; beyond 0.1 at eps 0/0.5/1: "
            + "/".join(f"{rows[str(e)]['fraction_beyond_0_1']:.3f}" for e in EPS)
            + f"; median |<s/|s|, q1>| {rows['0.0']['median_alignment_score_q1']:.3f}, "
            f"|<T, q1>| {rows['0.0']['median_tangent_alignment_q1']:.3f}",
            flush=True,
        )

    def pushed_off(m):
        # the mass the error moves off the moons: the models start from different
        # accuracies, so the robustness of the support is the change, not the level
        rows = results["per_model"][m]["eps"]
        return rows["1.0"]["fraction_beyond_0_1"] - rows["0.0"]["fraction_beyond_0_1"]

    for m in MODELS:
        results["per_model"][m]["mass_pushed_off_by_eps_1"] = pushed_off(m)
    ranking = sorted(MODELS, key=pushed_off)
    results["ranking_by_robustness"] = ranking
    results["ranking_by_mass_off_at_eps_1"] = sorted(
        MODELS, key=lambda m: results["per_model"][m]["eps"]["1.0"]["fraction_beyond_0_1"]
    )
    results["ranking_by_alignment"] = sorted(
        MODELS, key=lambda m: results["per_model"][m]["eps"]["0.0"]["median_alignment_score_q1"]
    )
    print(
        "mass pushed off by eps = 1: "
        + ", ".join(
            f"{m} {results['per_model'][m]['mass_pushed_off_by_eps_1']:.3f}" for m in MODELS
        )
        + f"; most robust first: {ranking}; best aligned first: "
        f"{results['ranking_by_alignment']}"
    )
    plot(rec, nodes, generated, results)
    out = rec.write(results)
    print(f"wrote {rec.png_path()} and {out} in {rec.data['wall_time_s']:.1f} s")
    return results


def plot(rec, nodes, generated, results):
    fig, axes = plt.subplots(len(MODELS), 5, figsize=(24, 4.8 * len(MODELS)))
    for row, name in enumerate(MODELS):
        for col, eps in enumerate(EPS):
            ax = axes[row, col]
            x, _ = generated[(name, eps)]
            draw_moons(ax, nodes)
            ax.scatter(x[:, 0], x[:, 1], s=2, c="k", alpha=0.5)
            frac = results["per_model"][name]["eps"][str(eps)]["fraction_beyond_0_1"]
            moons_axes(ax, f"{name}: velocity error {eps:g} (L-inf); {100 * frac:.0f}% off")
        ax = axes[row, 3]
        x, q1 = generated[(name, 0.0)]
        draw_moons(ax, nodes)
        draw_vectors(ax, x, q1)
        moons_axes(ax, f"{name}: leading Lyapunov vector $q_1$")
        ax = axes[row, 4]
        align = results["per_model"][name]["eps"]["0.0"]["alignment_score_q1"]
        ax.hist(align, np.linspace(0, 1, 26))
        ax.set(
            xlabel="$|\\langle s/|s|, q_1\\rangle|$",
            ylabel="samples",
            title=f"{name}: alignment (median {np.median(align):.2f})",
        )
    fig.suptitle(
        "Paper 003 G.5, Fig. 7-8: trained flow-matching and score-based models of two moons"
    )
    fig.tight_layout()
    fig.savefig(rec.png_path(), dpi=70)
    plt.close(fig)


if __name__ == "__main__":
    main()
