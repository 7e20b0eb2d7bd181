"""Learned fields: the parameterisation identities, the networks, and training
on samples of a closed-form law converging to its analytic field."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import PATHS, make_mixture
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxflow as jf
from jaxflow._learned import target as regression_target

QUANTITY = {
    "velocity": lambda f: f.velocity,
    "noise": lambda f: f.noise,
    "data": lambda f: f.denoise,
    "score": lambda f: f.score,
}


@settings(max_examples=20, deadline=None)
@given(
    path=st.sampled_from(sorted(PATHS)),
    parameterisation=st.sampled_from(sorted(QUANTITY)),
    frac=st.floats(0.05, 0.95),
    seed=st.integers(0, 2**31 - 1),
)
def test_each_parameterisation_reproduces_the_analytic_field(path, parameterisation, frac, seed):
    """A 'network' that returns the analytic field's own quantity gives back its
    denoiser, score and velocity through the docs/mathematics.md §2 conversions."""
    rng = np.random.default_rng(seed)
    analytic = jf.AnalyticField(make_mixture(rng, 3, 2, "full"), PATHS[path])
    learned = jf.LearnedField(QUANTITY[parameterisation](analytic), PATHS[path], parameterisation)
    x = jnp.asarray(rng.standard_normal(3))
    t = frac * PATHS[path].t_noise
    for name in ("denoise", "score", "velocity", "noise", "reverse_drift"):
        np.testing.assert_allclose(
            getattr(learned, name)(x, t), getattr(analytic, name)(x, t), rtol=1e-8, atol=1e-8
        )


def test_bad_input_raises():
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="divisible"):
        jf.nn.UNet((1, 6, 6), 8, (1, 2, 2), key=key)
    with pytest.raises(ValueError, match="heads"):
        jf.nn.UNet((1, 8, 8), 6, (1, 1), heads=4, key=key)
    with pytest.raises(ValueError, match="flat images"):
        jf.nn.UNet((1, 8, 8), 8, (1, 2), heads=2, key=key)(jnp.ones((1, 8, 8)), 0.5)
    with pytest.raises(ValueError, match="parameterisation"):
        jf.LearnedField(jf.nn.MLP(2, key=key), jf.RectifiedFlow(), "epsilon")
    with pytest.raises(ValueError, match="coupling"):
        jf.flow_matching_loss(
            jf.nn.MLP(2, key=key), jf.RectifiedFlow(), jnp.ones((4, 2)), key, coupling="x"
        )
    with pytest.raises(ValueError, match="velocity target only"):
        jf.flow_matching_loss(
            jf.nn.MLP(2, key=key),
            jf.RectifiedFlow(),
            jnp.ones((4, 2)),
            key,
            parameterisation="noise",
            coupling="ot",
        )
    with pytest.raises(ValueError, match="batch"):
        jf.flow_matching_loss(jf.nn.MLP(2, key=key), jf.RectifiedFlow(), jnp.ones(4), key)


@pytest.mark.parametrize("parameterisation", sorted(QUANTITY))
def test_analytic_field_is_the_loss_minimiser(parameterisation):
    """The regression target minus its conditional mean is orthogonal to every
    function of (X_t, t): for the analytic field f, the batch means of
    (f - target) and of (f - target) * X_t vanish within their standard errors,
    while a shifted field is biased."""
    rng = np.random.default_rng(1)
    law = make_mixture(rng, 2, 3, "full")
    path = jf.RectifiedFlow()
    field = jf.AnalyticField(law, path)
    x = law.sample(jax.random.PRNGKey(2), (40_000,))
    f = QUANTITY[parameterisation](field)

    def residuals(g):
        kt, kz, _ = jax.random.split(jax.random.PRNGKey(3), 3)
        t = jax.random.uniform(kt, (len(x),), x.dtype, 1e-3, 1 - 1e-3)
        z = jax.random.normal(kz, x.shape, x.dtype)
        xt = path.alpha(t)[:, None] * x + path.sigma(t)[:, None] * z
        target = jax.vmap(regression_target, in_axes=(None, None, 0, 0, 0))(
            path, parameterisation, x, z, t
        )
        err = jax.vmap(g)(xt, t) - target
        return jnp.concatenate([err, err * xt, err * t[:, None]], axis=1)

    def z_scores(g):
        r = np.asarray(residuals(g))
        return r.mean(0) / (r.std(0) / np.sqrt(len(r)))

    assert np.all(np.abs(z_scores(f)) < 5), z_scores(f)
    # a shift of a tenth of the residual's size is detected
    shift = 0.1 * float(jnp.sqrt(jnp.mean(residuals(f)[:, :2] ** 2)))
    assert np.max(np.abs(z_scores(lambda y, t: f(y, t) + shift))) > 10


@eqx.filter_jit
def _train(model, x, key, steps):
    path = jf.RectifiedFlow()
    opt = optax.adam(optax.cosine_decay_schedule(3e-3, steps))
    state = opt.init(eqx.filter(model, eqx.is_array))

    def step(carry, k):
        model, state = carry
        kb, kl = jax.random.split(k)
        batch = x[jax.random.randint(kb, (256,), 0, len(x))]
        loss, grads = eqx.filter_value_and_grad(
            lambda m: jf.flow_matching_loss(m, path, batch, kl)
        )(model)
        updates, state = opt.update(grads, state, eqx.filter(model, eqx.is_array))
        return (eqx.apply_updates(model, updates), state), loss

    params, static = eqx.partition(model, eqx.is_array)

    def scan_step(carry, k):
        p, s = carry
        (m, s), loss = step((eqx.combine(p, static), s), k)
        return (eqx.filter(m, eqx.is_array), s), loss

    (params, _), losses = jax.lax.scan(scan_step, (params, state), jax.random.split(key, steps))
    return eqx.combine(params, static), losses


@eqx.filter_jit
def _eval_points(analytic, kx, t_eval):
    """Evaluation points `X_t` and the analytic velocity there, in one program."""
    path, law = analytic.path, analytic.law
    x_eval = jax.vmap(
        lambda k, t: (
            path.alpha(t) * law.sample(k)
            + path.sigma(t) * jax.random.normal(jax.random.fold_in(k, 1), (2,), t_eval.dtype)
        )
    )(jax.random.split(kx, len(t_eval)), t_eval)
    return x_eval, jax.vmap(analytic.velocity)(x_eval, t_eval)


@eqx.filter_jit
def _rel_error(model, path, x_eval, t_eval, target):
    """One compile for the untrained and both trained models (same structure)."""
    pred = jax.vmap(jf.LearnedField(model, path, "velocity").velocity)(x_eval, t_eval)
    return jnp.linalg.norm(pred - target) / jnp.linalg.norm(target)


def test_flow_matching_on_mixture_samples_converges_to_the_analytic_field():
    """Train an MLP by flow matching on 20,000 samples of a 2-D mixture; its
    velocity error against the AnalyticField falls with training."""
    rng = np.random.default_rng(4)
    law = make_mixture(rng, 2, 3, "iso")
    path = jf.RectifiedFlow()
    analytic = jf.AnalyticField(law, path)
    x = law.sample(jax.random.PRNGKey(5), (20_000,))
    kt, kx = jax.random.split(jax.random.PRNGKey(6))
    t_eval = jax.random.uniform(kt, (2000,), x.dtype, 0.05, 0.95)
    x_eval, target = _eval_points(analytic, kx, t_eval)

    def rel_error(model):
        return float(_rel_error(model, path, x_eval, t_eval, target))

    model = jf.nn.MLP(2, 64, 3, key=jax.random.PRNGKey(7))
    errors = [rel_error(model)]
    for steps in (300, 3000):
        trained, losses = _train(model, x, jax.random.PRNGKey(8), steps)
        errors.append(rel_error(trained))
    assert errors[0] > 0.5 and errors[1] < errors[0] and errors[2] < 0.6 * errors[1], errors
    assert errors[2] < 0.15, errors


@pytest.mark.parametrize("parameterisation", ["velocity", "noise", "data"])
def test_generate_with_a_learned_field_reaches_the_data_end(parameterisation):
    """At t = 0 (sigma = 0) a learned field's score is singular but its velocity is
    not: adaptive generation to the data end must stay finite and agree with a
    fine fixed-step solve (regression: v used to be computed through the score,
    0 * inf at sigma = 0)."""
    field = jf.LearnedField(
        jf.nn.MLP(2, 16, 2, key=jax.random.PRNGKey(0)), jf.RectifiedFlow(), parameterisation
    )
    z = jnp.array([0.3, -0.2])
    if parameterisation != "velocity":
        # noise and data predictions divide by alpha or sigma: stop short of the ends
        kw = dict(t_noise=0.99, t_data=0.01)
    else:
        kw = {}
    x = jf.generate(field, z, **kw)
    ref = jf.generate(field, z, solver="heun", steps=4000, **kw)
    # an untrained noise or data network read at alpha = 0.01 makes a stiff
    # velocity (alpha'/alpha = -100), where Heun is less accurate
    rtol = 1e-5 if parameterisation == "velocity" else 1e-3
    assert np.all(np.isfinite(x))
    np.testing.assert_allclose(x, ref, rtol=rtol, atol=1e-6)
    np.testing.assert_allclose(
        field.velocity(z, 0.5),
        jax.jvp(
            lambda t: (
                field.path.alpha(t) * field.denoise(z, 0.5)
                + field.path.sigma(t) * field.noise(z, 0.5)
            ),
            (0.5,),
            (1.0,),
        )[1],
        rtol=1e-8,
    )
