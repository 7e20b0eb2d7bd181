"""Issue 12, "a core that never lies": every bad input to the analysis, sampling,
batching, objective, data and nn entry points is a `ValueError` that names the
parameter and the fix (an error at run time where the value is only known under
`jit` or `vmap`); no silent NaN, no hang; edge inputs give the right value.

Kept fast: tiny points, maps instead of solves, and the errors raise before
anything is compiled.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

import jaxflow as jf

LIN = lambda x: 2.0 * x  # noqa: E731
SHORT = lambda x: x[:1]  # noqa: E731  (R^2 -> R^1: no square Jacobian)
F = lambda x, t: -x  # noqa: E731
STEP = lambda x, i: 0.5 * x  # noqa: E731
Z2, ONE2 = jnp.zeros(2), jnp.ones(2)
NAN2 = jnp.array([jnp.nan, 0.0])
X3 = jnp.array([[0.1, 0.2], [0.3, -0.1], [0.0, 0.5]])
FIELD = jf.AnalyticField(jf.Gaussian(jnp.zeros(2), jnp.eye(2)), jf.RectifiedFlow())
PATH = FIELD.path
KEY = jax.random.PRNGKey(0)
EULER = dict(solver="euler", steps=2)
L, LM = jf.lyapunov_spectrum, jf.lyapunov_spectrum_of_map
PASS_KEY = r"pass jax\.random\.key\(0\)"


def _abstract(cls, *args, **kwargs):
    """A network with abstract arrays (nothing compiled): its call checks the
    input's shape before any arithmetic."""
    return eqx.filter_eval_shape(lambda key: cls(*args, key=key, **kwargs), KEY)


@functools.cache
def _unet():
    return jf.nn.UNet((1, 4, 4), 4, (1, 2), heads=2, groups=2, time_dim=4, key=KEY)


@functools.cache
def _mlp():
    return _abstract(jf.nn.MLP, 2, 8, 1, time_dim=4)


@pytest.fixture
def plain():
    """The test run's jaxtyping annotation checks (pyproject addopts) refuse some of
    these inputs first, with a `TypeError`; without them, as users run, the
    `ValueError` below is what they see."""
    before = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    yield
    jaxtyping.config.update("jaxtyping_disable", before)


BAD = {
    # _instability: points, directions, maps R^n -> R^m, thresholds, counts
    "jacobian x rank": (lambda: jf.jacobian(LIN, jnp.zeros((2, 2))), "one point"),
    "jacobian x empty": (lambda: jf.jacobian(LIN, jnp.zeros(0)), "n >= 1"),
    "jacobian x nan": (lambda: jf.jacobian(LIN, NAN2), "x has non-finite"),
    "jacobian R2->R1": (
        lambda: jf.jacobian(SHORT, Z2),
        r"jacobian: fn must map a point of shape \(2,\) .*got shape \(1,\)",
    ),
    "singular_values R2->R4": (
        lambda: jf.singular_values(lambda x: jnp.concatenate([x, x]), Z2),
        r"singular_values: fn .*got shape \(4,\)",
    ),
    "log_abs_det scalar fn": (
        lambda: jf.log_abs_det_jacobian(lambda x: x.sum(), Z2),
        r"log_abs_det_jacobian: fn .*got shape \(\)",
    ),
    "ebar R2->R1": (lambda: jf.geometric_mean_singular_value(SHORT, Z2), "fn must map"),
    "E zero u": (lambda: jf.intrinsic_instability(LIN, Z2, Z2), "u must be non-zero"),
    "E nan u": (lambda: jf.intrinsic_instability(LIN, Z2, NAN2), "u has non-finite"),
    "E u rank": (
        lambda: jf.intrinsic_instability(LIN, Z2, jnp.zeros((2, 1))),
        r"direction u has shape \(2, 1\)",
    ),
    "E nan x": (lambda: jf.intrinsic_instability(LIN, NAN2, ONE2), "x has non-finite"),
    "E R2->R1": (lambda: jf.intrinsic_instability(SHORT, Z2, ONE2), "fn must map"),
    "A inf n": (
        lambda: jf.instability_coefficient(LIN, Z2, jnp.array([jnp.inf, 1.0])),
        "perturbation n has non-finite",
    ),
    "A R2->R1": (lambda: jf.instability_coefficient(SHORT, Z2, ONE2), "fn must map"),
    "bound num_points 1": (
        lambda: jf.instability_lower_bound(LIN, Z2, ONE2, num_points=1),
        "num_points must be an int >= 2",
    ),
    "bound num_points float": (
        lambda: jf.instability_lower_bound(LIN, Z2, ONE2, num_points=3.0),
        "num_points",
    ),
    "bound R2->R1": (lambda: jf.instability_lower_bound(SHORT, Z2, ONE2), "fn must map"),
    "U nan h": (lambda: jf.amplified_error_bound(jnp.nan, 1.0, 2.0), "step_size .*NaN"),
    "U h < 0": (lambda: jf.amplified_error_bound(-1.0, 1.0, 2.0), "step_size h must be > 0"),
    "U m2 < 0": (lambda: jf.amplified_error_bound(1.0, -1.0, 2.0), "m2 .*must be >= 0"),
    "U c < 0": (lambda: jf.amplified_error_bound(1.0, 1.0, -2.0), "c .*must be >= 0"),
    "P no samples": (
        lambda: jf.instability_probability(FIELD, jnp.zeros((0, 2)), 1.0),
        r"x must be a batch .*\(no samples\)",
    ),
    "P x rank": (lambda: jf.instability_probability(FIELD, ONE2, 1.0), r"shape \(N, n\)"),
    "P x length": (lambda: jf.instability_probability(FIELD, jnp.ones((3, 3)), 1.0), "n = 2"),
    "P x nan": (
        lambda: jf.instability_probability(FIELD, X3.at[0, 0].set(jnp.nan), 1.0),
        "x has non-finite",
    ),
    "P M nan": (lambda: jf.instability_probability(FIELD, X3, jnp.nan), "M contains NaN"),
    "P M <= 0": (lambda: jf.instability_probability(FIELD, X3, [1.0, 0.0]), "M must be > 0"),
    "P M empty": (lambda: jf.instability_probability(FIELD, X3, []), "M is empty"),
    "P M rank": (lambda: jf.instability_probability(FIELD, X3, jnp.ones((2, 2))), "M must have"),
    # _lyapunov: each message names what was passed
    "L transient rounds to all steps": (
        lambda: L(F, ONE2, 0.0, 1.0, steps=4, transient_time=0.9),
        r"transient_time = 0.9 rounds to all 4 steps.*more steps \(steps=4\)",
    ),
    "L transient by dt": (
        lambda: L(F, ONE2, 0.0, 1.0, dt=0.25, transient_time=0.9),
        r"transient_time = 0.9 .*a smaller dt \(dt=0.25\)",
    ),
    "L covariant too long": (
        lambda: L(F, ONE2, 0.0, 1.0, steps=4, transient_time=0.5, covariant_time=0.5),
        r"covariant_time = 0.5 rounds to 2 steps.*transient_time = 0.5 \(2 steps\)",
    ),
    "L transient nan": (
        lambda: L(F, ONE2, 0.0, 1.0, steps=4, transient_time=np.nan),
        "transient_time must be a finite",
    ),
    "L transient str": (
        lambda: L(F, ONE2, 0.0, 1.0, steps=4, transient_time="0.5"),
        "transient_time must be a finite",
    ),
    "L covariant nan": (
        lambda: L(F, ONE2, 0.0, 1.0, steps=4, covariant_time=np.nan),
        "covariant_time must be a finite",
    ),
    "L dt 0": (lambda: L(F, ONE2, 0.0, 1.0, dt=0.0), "dt must be a finite real number > 0"),
    "L steps float": (lambda: L(F, ONE2, 0.0, 1.0, steps=2.0), "steps must be a positive int"),
    "L t0 nan": (lambda: L(F, ONE2, np.nan, 1.0, steps=2), "t0 must be a finite"),
    "L t1 inf": (lambda: L(F, ONE2, 0.0, np.inf, steps=2), "t1 must be a finite"),
    "L k 0": (lambda: L(F, ONE2, 0.0, 1.0, steps=2, k=0), r"k must be an int in \[1, n = 2\]"),
    "L k > n": (lambda: L(F, ONE2, 0.0, 1.0, steps=2, k=3), r"k must be an int in \[1, n = 2\]"),
    "L f R2->R1": (
        lambda: L(lambda x, t: x[:1], ONE2, 0.0, 1.0, steps=2),
        r"lyapunov_spectrum: f must map .*got shape \(1,\)",
    ),
    "L x0 nan": (lambda: L(F, NAN2, 0.0, 1.0, steps=2), "x0 has non-finite"),
    "L x0 rank": (lambda: L(F, jnp.ones((2, 2)), 0.0, 1.0, steps=2), "x0 as one point"),
    "L frame dependent": (
        lambda: L(F, ONE2, 0.0, 1.0, steps=2, frame=jnp.ones((2, 2))),
        "linearly independent",
    ),
    "L frame nan": (
        lambda: L(F, ONE2, 0.0, 1.0, steps=2, frame=jnp.full((2, 2), jnp.nan)),
        "frame has non-finite",
    ),
    "L frame and key": (
        lambda: L(F, ONE2, 0.0, 1.0, steps=2, frame=jnp.eye(2), key=KEY),
        "key .*or frame, not both",
    ),
    "L key int": (lambda: L(F, ONE2, 0.0, 1.0, steps=2, key=0), PASS_KEY),
    "LM num_steps 0": (lambda: LM(STEP, ONE2, 0), "num_steps must be a positive int"),
    "LM transient -1": (lambda: LM(STEP, ONE2, 3, transient_steps=-1), "transient_steps"),
    "LM covariant = num_steps": (
        lambda: LM(STEP, ONE2, 3, covariant_steps=3),
        r"covariant_steps must be an int in \[0, num_steps = 3\)",
    ),
    "LM step R2->R1": (lambda: LM(lambda x, i: x[:1], ONE2, 3), "step must map"),
    "alignment zero score": (
        lambda: jf.alignment(Z2, jnp.ones((2, 1))),
        "score is zero",
    ),
    "alignment zero column": (
        lambda: jf.alignment(ONE2, jnp.zeros((2, 1))),
        "vectors has a zero column",
    ),
    "alignment nan": (lambda: jf.alignment(NAN2, jnp.ones((2, 1))), "score has non-finite"),
    # _logdet
    "logdet route": (lambda: jf.log_det_generation(FIELD, Z2, route="magic"), "route must"),
    "logdet key with density": (
        lambda: jf.log_det_generation(FIELD, Z2, route="density", key=KEY),
        "route='density' uses neither",
    ),
    "logdet key int": (lambda: jf.log_det_generation(FIELD, Z2, key=0), PASS_KEY),
    "logdet z nan": (lambda: jf.log_det_generation(FIELD, NAN2), "z has non-finite"),
    "logdet z nan dense": (
        lambda: jf.log_det_generation(FIELD, NAN2, route="dense"),
        "z has non-finite",
    ),
    "logdet z rank": (
        lambda: jf.log_det_generation(FIELD, jnp.ones((2, 2)), route="density"),
        "z as one point",
    ),
    "logdet z length": (lambda: jf.log_det_generation(FIELD, jnp.ones(3)), "z has length 3"),
    "logdet t_noise": (lambda: jf.log_det_generation(FIELD, Z2, t_noise=2.0), "t_noise"),
    "logdet not a field": (
        lambda: jf.log_det_generation(LIN, Z2),
        "needs a jaxflow field, got function",
    ),
    "invert_with_log_det x nan": (
        lambda: jf.invert_with_log_det(FIELD, NAN2),
        "invert_with_log_det: x has non-finite",
    ),
    "generate_with_jacobian z rank": (
        lambda: jf.generate_with_jacobian(FIELD, jnp.ones((2, 2))),
        "z as one point",
    ),
    # _sample
    "ddpm steps 0": (lambda: jf.sample_ddpm(FIELD, Z2, KEY, steps=0), "steps must"),
    "ddpm steps float": (lambda: jf.sample_ddpm(FIELD, Z2, KEY, steps=2.0), "steps must"),
    "ddpm key int": (lambda: jf.sample_ddpm(FIELD, Z2, 0, steps=2), PASS_KEY),
    "ddpm key shape": (
        lambda: jf.sample_ddpm(FIELD, Z2, jnp.zeros(3, jnp.uint32), steps=2),
        PASS_KEY,
    ),
    "ddpm keys": (lambda: jf.sample_ddpm(FIELD, Z2, jax.random.split(KEY), steps=2), "vmap"),
    "ddpm z nan": (lambda: jf.sample_ddpm(FIELD, NAN2, KEY, steps=2), "z has non-finite"),
    "ddpm t_noise out": (lambda: jf.sample_ddpm(FIELD, Z2, KEY, t_noise=2.0), "t_noise"),
    "ddpm t_noise nan": (lambda: jf.sample_ddpm(FIELD, Z2, KEY, t_noise=np.nan), "t_noise"),
    "ddpm reversed": (
        lambda: jf.sample_ddpm(FIELD, Z2, KEY, t_noise=0.3, t_data=0.5),
        "t_data < t_noise",
    ),
    "ddpm times out": (
        lambda: jf.sample_ddpm(FIELD, Z2, KEY, times=np.array([0.0, 2.0])),
        "times must lie in the path's range",
    ),
    "ddpm not a field": (
        lambda: jf.sample_ddpm(F, Z2, KEY),
        "sample_ddpm needs a jaxflow field",
    ),
    "sde key int": (lambda: jf.sample_sde(FIELD, Z2, 0, steps=2), PASS_KEY),
    "sde steps": (lambda: jf.sample_sde(FIELD, Z2, KEY, steps=-1), "steps must"),
    "sde reversed": (
        lambda: jf.sample_sde(FIELD, Z2, KEY, t_noise=0.3, t_data=0.5),
        "t_data < t_noise",
    ),
    "ddpm_coefficients order": (lambda: jf.ddpm_coefficients(PATH, 0.3, 0.5), "t_next <= t"),
    "ddpm_coefficients nan": (lambda: jf.ddpm_coefficients(PATH, np.nan, 0.5), "t must be"),
    "ddpm_coefficients path": (lambda: jf.ddpm_coefficients(FIELD, 0.5, 0.3), "AbstractPath"),
    "reverse step h < 0": (
        lambda: jf.reverse_sde_step(FIELD, ONE2, 0.5, -0.1, ONE2),
        "h must be a finite real number >= 0",
    ),
    "reverse step past t_data": (
        lambda: jf.reverse_sde_step(FIELD, ONE2, 0.5, 0.6, ONE2),
        r"t - h >= t_data",
    ),
    "reverse step noise": (
        lambda: jf.reverse_sde_step(FIELD, ONE2, 0.5, 0.1, jnp.ones(3)),
        "noise must have",
    ),
    "reverse step score_error": (
        lambda: jf.reverse_sde_step(FIELD, ONE2, 0.5, 0.1, ONE2, SHORT),
        "score_error",
    ),
    # _batching
    "batch_map batch_size 0": (lambda: jf.batch_map(LIN, X3, batch_size=0), "batch_size"),
    "batch_map batch_size float": (lambda: jf.batch_map(LIN, X3, batch_size=2.0), "batch_size"),
    "batch_map leading axes": (
        lambda: jf.batch_map(lambda a: a[0], (jnp.ones(5), jnp.ones((4, 2))), batch_size=2),
        r"same number of points .*5 in xs\[0\], 4 in xs\[1\]",
    ),
    "batch_map scalar leaf": (
        lambda: jf.batch_map(lambda a: a[0], (jnp.ones(5), 3.0)),
        r"xs\[1\] is a scalar",
    ),
    "batch_map no arrays": (lambda: jf.batch_map(LIN, ()), "no arrays"),
    "batch_map fn": (lambda: jf.batch_map(3, X3), "fn must be a function"),
    # _objectives
    "loss x rank": (lambda: jf.flow_matching_loss(F, PATH, ONE2, KEY), "x must be a batch"),
    "loss no samples": (
        lambda: jf.flow_matching_loss(F, PATH, jnp.zeros((0, 2)), KEY),
        "no samples",
    ),
    "loss x nan": (lambda: jf.flow_matching_loss(F, PATH, X3 * jnp.nan, KEY), "x has non-finite"),
    "loss key int": (lambda: jf.flow_matching_loss(F, PATH, X3, 0), PASS_KEY),
    "loss network shape": (
        lambda: jf.flow_matching_loss(lambda x, t: x[:1], PATH, X3, KEY),
        r"network\(x, t\) must return a point's shape \(2,\), got \(1,\)",
    ),
    "loss path": (lambda: jf.flow_matching_loss(F, FIELD, X3, KEY), "AbstractPath"),
    "loss t_margin": (
        lambda: jf.flow_matching_loss(F, PATH, X3, KEY, t_margin=0.5),
        r"t_margin must be a finite real number >= 0 and < 0.5",
    ),
    "dsm x rank": (lambda: jf.denoising_score_matching_loss(F, PATH, ONE2, KEY), "batch"),
    "ot shapes": (lambda: jf.ot_pairing(X3, X3[:2], KEY), "one shape"),
    "ot iters": (lambda: jf.ot_pairing(X3, X3, KEY, iters=0), "iters"),
    "ot z nan": (lambda: jf.ot_pairing(X3, X3 * jnp.nan, KEY), "z has non-finite"),
    # data
    "moons n 0": (lambda: jf.data.two_moons(KEY, 0), "n must be a positive int"),
    "moons n -1": (lambda: jf.data.two_moons(KEY, -1), "n must be a positive int"),
    "moons n float": (lambda: jf.data.two_moons(KEY, 3.0), "n must be a positive int"),
    "moons noise nan": (lambda: jf.data.two_moons(KEY, 3, noise=np.nan), "noise"),
    "moons key int": (lambda: jf.data.two_moons(0, 3), PASS_KEY),
    "moons dtype": (lambda: jf.data.two_moons(KEY, 3, dtype=jnp.int32), "floating dtype"),
    "gaussians radius": (lambda: jf.data.eight_gaussians(KEY, 3, radius=np.nan), "radius"),
    "gaussians scale": (lambda: jf.data.eight_gaussians(KEY, 3, scale=0.0), "scale"),
    "box mass n": (lambda: jf.data.width_for_box_mass(2.5, 0.1, 0.5), "n must"),
    "box mass side": (lambda: jf.data.width_for_box_mass(2, np.nan, 0.5), "side"),
    "sparse m": (lambda: jf.data.sparse_neighbours(2, m=0), "m must"),
    "sparse side": (lambda: jf.data.sparse_neighbours(2, side=0.9), "side .*< 0.8"),
    "tiling k": (lambda: jf.data.tiling_neighbours(2, 0), "k must"),
    "tiling too many": (lambda: jf.data.tiling_neighbours(30, 10), "10\\*\\*30 cubes"),
    "tiling overlap": (lambda: jf.data.tiling_neighbours(2, 2, side=0.8), "side .*<= 0.5"),
    "fig3 dtype": (lambda: jf.data.fig3_mixture(jnp.int32), "floating dtype"),
    # nn
    "MLP width": (lambda: jf.nn.MLP(2, 0, key=KEY), "width must"),
    "MLP depth": (lambda: jf.nn.MLP(2, 8, -1, key=KEY), "depth must"),
    "MLP time_dim 0": (lambda: jf.nn.MLP(2, 8, 1, time_dim=0, key=KEY), "time_dim must"),
    "MLP time_dim odd": (lambda: jf.nn.MLP(2, 8, 1, time_dim=3, key=KEY), "even"),
    "MLP time_scale": (
        lambda: jf.nn.MLP(2, 8, 1, time_scale=np.nan, key=KEY),
        "time_scale",
    ),
    "MLP key": (lambda: jf.nn.MLP(2, 8, 1, key=0), PASS_KEY),
    "MLP call length": (
        lambda: _mlp()(jnp.ones(3), 0.5),
        r"MLP takes one flat point of shape \(2,\), got shape \(3,\)",
    ),
    "MLP call batch": (
        lambda: _mlp()(jnp.ones((4, 2)), 0.5),
        r"jax\.vmap\(net, in_axes=\(0, None\)\)",
    ),
    "MLP call t": (
        lambda: _mlp()(ONE2, jnp.ones(3)),
        "t must be a scalar time",
    ),
    "UNet halving": (
        lambda: jf.nn.UNet((1, 7, 8), 4, (1, 2), key=KEY),
        "divisible by 2",
    ),
    "UNet H 0": (lambda: jf.nn.UNet((1, 0, 8), 4, (1, 2), key=KEY), "image_shape's H"),
    "UNet no levels": (lambda: jf.nn.UNet((1, 8, 8), 4, (), key=KEY), "multipliers is empty"),
    "UNet multiplier": (
        lambda: jf.nn.UNet((1, 8, 8), 4, (1, 0), key=KEY),
        "each multiplier must be a positive int",
    ),
    "UNet groups": (lambda: jf.nn.UNet((1, 8, 8), 4, (1, 2), groups=0, key=KEY), "groups"),
    "UNet call": (lambda: _unet()(jnp.ones(15), 0.5), r"flat images.*\(16,\)"),
    "UNet call t": (lambda: _unet()(jnp.ones(16), jnp.ones(2)), "t must be a scalar"),
    "Conv stride": (lambda: jf.nn.Conv(1, 1, 3, stride=0, key=KEY), "stride"),
    "Conv padding": (lambda: jf.nn.Conv(1, 1, 3, padding=-1, key=KEY), "padding"),
    "Conv call": (
        lambda: _abstract(jf.nn.Conv, 2, 3, 3)(jnp.ones((4, 4, 3))),
        r"channel-last image \(H, W, 2\)",
    ),
    "GroupNorm eps": (lambda: jf.nn.GroupNorm(1, 2, eps=-1.0), "eps"),
    "GroupNorm call": (lambda: jf.nn.GroupNorm(2, 4)(jnp.ones((2, 2, 3))), r"\(H, W, 4\)"),
    "ResBlock emb": (
        lambda: _abstract(jf.nn.ResBlock, 2, 2, 4, 1)(jnp.ones((4, 4, 2)), jnp.ones(3)),
        r"time embedding of shape \(4,\)",
    ),
    "SelfAttention heads": (lambda: jf.nn.SelfAttention(4, 3, 1, key=KEY), "divide"),
    "group_count": (lambda: jf.nn.group_count(0, 4), "groups must"),
    "embedding dim": (lambda: jf.nn.sinusoidal_embedding(0.5, 0), "dim must"),
    "embedding t": (lambda: jf.nn.sinusoidal_embedding(jnp.ones(3), 4), "t must be a scalar"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_is_a_value_error_naming_the_fix(name, plain):
    make, match = BAD[name]
    with pytest.raises(ValueError, match=match):
        make()


def test_lyapunov_transient_message_does_not_blame_covariant(plain):
    """Issue 12: `steps=4, transient_time=0.9` complained about `covariant`."""
    with pytest.raises(ValueError) as info:
        L(F, ONE2, 0.0, 1.0, steps=4, transient_time=0.9)
    assert "covariant" not in str(info.value)


TRACED = {
    "E zero u under jit": (
        lambda: jax.jit(lambda u: jf.intrinsic_instability(LIN, Z2, u))(Z2),
        "non-zero",
    ),
    "E nan u under vmap": (
        lambda: jax.vmap(lambda u: jf.intrinsic_instability(LIN, Z2, u))(jnp.stack([ONE2, NAN2])),
        "non-finite",
    ),
    "U h < 0 under jit": (
        lambda: jax.jit(jf.amplified_error_bound)(-1.0, 1.0, 2.0),
        "step_size h must be > 0",
    ),
    "LM x0 nan under jit": (
        lambda: jax.jit(lambda x0: LM(STEP, x0, 2).exponents)(NAN2),
        "x0 has non-finite",
    ),
    "ddpm_coefficients order under jit": (
        lambda: jax.jit(lambda t, s: jf.ddpm_coefficients(PATH, t, s))(0.3, 0.5),
        "t_next <= t",
    ),
    "reverse step h under jit": (
        lambda: jax.jit(lambda h: jf.reverse_sde_step(FIELD, ONE2, 0.5, h, ONE2))(-0.1),
        "h must be",
    ),
    "loss x nan under jit": (
        lambda: jax.jit(lambda x: jf.flow_matching_loss(F, PATH, x, KEY))(X3 * jnp.nan),
        "x has non-finite",
    ),
    "alignment zero score under jit": (
        lambda: jax.jit(jf.alignment)(Z2, jnp.ones((2, 1))),
        "score is zero",
    ),
    # a traced span the wrong way round ran silently (the state came back unchanged)
    "ddpm reversed span under jit": (
        lambda: jax.jit(lambda t: jf.sample_ddpm(FIELD, ONE2, KEY, steps=2, t_noise=0.3, t_data=t))(
            0.5
        ),
        "t_data < t_noise",
    ),
}


@pytest.mark.parametrize("name", sorted(TRACED))
def test_values_known_under_jit_raise_at_run_time(name):
    make, match = TRACED[name]
    with pytest.raises(Exception, match=match):
        jax.block_until_ready(make())


def test_a_reversed_traced_span_is_one_points_invalid_input():
    """With `throw=False` under `vmap`, a point whose span is the wrong way round is
    its own `invalid_input`, not an error of the batch (diffrax needs t0 < t1)."""
    out = jax.vmap(
        lambda t: jf.sample_sde(FIELD, ONE2, KEY, steps=2, t_noise=0.5, t_data=t, throw=False)
    )(jnp.array([0.0, 0.7]))
    np.testing.assert_array_equal(out.ok, [True, False])
    assert bool((out.result == jf.RESULTS.invalid_input)[1])
    assert np.all(np.isfinite(out.value[0])) and np.all(np.isnan(out.value[1]))


def test_numpy_integer_counts_give_the_same_result():
    """Counts are Python or NumPy ints (also through the annotation checks)."""
    i = np.int64
    a = LM(STEP, ONE2, i(3), k=i(1), transient_steps=i(1), covariant_steps=i(1))
    np.testing.assert_allclose(a.exponents, [np.log(0.5)], rtol=1e-12)
    b = jf.instability_lower_bound(LIN, Z2, ONE2, num_points=np.int32(3))
    np.testing.assert_allclose(b.bound, 2 * np.sqrt(2) / np.pi * 2.0, rtol=1e-12)
    np.testing.assert_array_equal(jf.batch_map(LIN, X3, batch_size=i(2)), 2.0 * X3)
    np.testing.assert_array_equal(jf.data.two_moons(KEY, np.int32(5)), jf.data.two_moons(KEY, 5))
    mlp = _abstract(jf.nn.MLP, i(2), i(8), i(1), time_dim=i(4))
    assert type(mlp.time_dim) is int and mlp.layers[-1].weight.shape == (2, 8)
    assert jf.nn.group_count(i(8), i(12)) == 6


def test_edge_inputs_give_the_right_value(plain):
    # an integer point is a point (its Jacobian, not a jacfwd dtype error)
    np.testing.assert_array_equal(jf.jacobian(LIN, jnp.array([1, 2])), 2.0 * np.eye(2))
    # C = 1 and C = 0 are the limits h M2 / 2 and 0
    np.testing.assert_allclose(jf.amplified_error_bound(0.1, 3.0, [0.0, 1.0]), [0.0, 0.15])
    # an empty batch maps to empty outputs of the right shape, as jax.vmap does
    out = jf.batch_map(lambda x: (x.sum(), jnp.outer(x, x)), jnp.zeros((0, 2)), batch_size=2)
    assert out[0].shape == (0,) and out[1].shape == (0, 2, 2)
    # all points equal: every cost is 0 and every plan optimal, not NaN
    np.testing.assert_array_equal(
        jf.ot_pairing(jnp.ones((3, 2)), jnp.ones((3, 2)), KEY, iters=3), 1.0
    )
    # a typed key is the same key as the raw one
    np.testing.assert_array_equal(
        jf.data.two_moons(jax.random.key(0), 4), jf.data.two_moons(jax.random.PRNGKey(0), 4)
    )


def test_one_sample_is_an_estimate():
    """Zero samples are refused; one gives the 0-or-1 fractions of that sample. On
    `N(0, I)` under rectified flow `G` is the identity, so `log Ebar = 0` (up to the
    two Euler steps' error)."""
    p = jf.instability_probability(FIELD, X3[:1], [0.5, 2.0], **EULER)
    np.testing.assert_allclose(p.log_ebar, [0.0], atol=0.02)
    np.testing.assert_array_equal(p.p_m, [1.0, 0.0])


def test_mnist_errors_name_the_install_and_the_preparation(monkeypatch, tmp_path):
    """An ImportError from deep inside tensorflow-datasets (here a missing
    `importlib_resources`, as etils imports it lazily) is the install hint, with
    the missing module named and the original error chained; unprepared data with
    `download=False` says how to prepare them."""
    tfds = pytest.importorskip("tensorflow_datasets")

    def missing(*args, **kwargs):
        raise ModuleNotFoundError(
            "No module named 'importlib_resources'", name="importlib_resources"
        )

    monkeypatch.setattr(tfds, "data_source", missing)
    with pytest.raises(ImportError, match=r"jaxflow\[data\].*pip install importlib_resources") as e:
        jf.data.mnist()
    assert isinstance(e.value.__cause__, ModuleNotFoundError)
    assert "tensorflow-cpu" in str(e.value)

    def unprepared(*args, **kwargs):
        raise NotImplementedError("Random access data source for file format TFRECORD")

    monkeypatch.setattr(tfds, "data_source", unprepared)
    with pytest.raises(FileNotFoundError, match="not prepared under .*tfds build mnist") as e:
        jf.data.mnist(download=False, data_dir=str(tmp_path))
    assert isinstance(e.value.__cause__, NotImplementedError)


def test_flax_wrapper_checks_the_call(plain):
    pytest.importorskip("flax")
    net = jf.nn.FlaxLinen(lambda variables, x, t: x[:1], {"params": {"w": jnp.ones(1)}})
    with pytest.raises(ValueError, match=r"FlaxLinen: the network maps .*\(2,\) to shape \(1,\)"):
        net(ONE2, 0.5)
    with pytest.raises(ValueError, match="FlaxLinen takes one flat point"):
        net(jnp.ones((2, 2)), 0.5)


def test_batch_generate_fixed_step_advice_is_followable():
    """`batch_generate` has no `steps=`: its advice for a fixed-step solver is
    `jf.batch_map` of `jf.generate_with_jacobian`, and following it works."""
    zs = jnp.array([[0.5, -1.0], [0.0, 2.0]])
    with pytest.raises(ValueError, match="no error estimate") as info:
        jf.batch_generate(FIELD, zs, jacobian=True, solver="euler")
    message = str(info.value)
    assert "jf.batch_map(lambda z: jf.generate_with_jacobian(field, z, solver=" in message
    assert "give `steps=`" not in message
    # the advice as written, with two steps: on FIELD's law v(x, t) = (a'/a)(t) x,
    # a(t)^2 = (1 - t)^2 + t^2, which is x at t = 1 and 0 at t = 1/2, so two Euler
    # steps map z to z / 2
    xs, js = jf.batch_map(lambda z: jf.generate_with_jacobian(FIELD, z, **EULER), zs)
    np.testing.assert_allclose(xs, 0.5 * zs, rtol=1e-6)
    np.testing.assert_allclose(js, np.broadcast_to(0.5 * np.eye(2), (2, 2, 2)), atol=1e-7)
    with pytest.raises(ValueError, match="no error estimate.*jf.generate\\(field, z, solver="):
        jf.batch_generate(FIELD, zs, solver="euler")
