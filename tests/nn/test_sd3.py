"""jaxflow.nn.SD3Transformer against diffusers' SD3Transformer2DModel: every weight
read exactly once, float32 forward and JVP parity on tiny random models (SD3.5
Medium-like, SD3.0-like, several dual-attention layers in a row, no position
table), bfloat16, jit and vmap, and the errors for latents it cannot take."""

import pytest

pytest.importorskip("diffusers")
import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tiny_models import SD3_CONFIG, state_dict_numpy, tiny_sd3  # noqa: E402

import jaxflow as jf  # noqa: E402

SIGMAS = (1.0, 0.5, 0.0089)
L_CONTEXT = 7


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def _inputs(h, w, batch=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, SD3_CONFIG["in_channels"], h, w)).astype(np.float32)
    context = rng.standard_normal((batch, L_CONTEXT, SD3_CONFIG["joint_attention_dim"]))
    pooled = rng.standard_normal((batch, SD3_CONFIG["pooled_projection_dim"]))
    t = (1000.0 * np.asarray(SIGMAS[:batch])).astype(np.float32)
    return x, t, context.astype(np.float32), pooled.astype(np.float32)


def _torch(model, x, t, context, pooled):
    with torch.no_grad():
        out = model(
            hidden_states=torch.from_numpy(x),
            encoder_hidden_states=torch.from_numpy(context),
            pooled_projections=torch.from_numpy(pooled),
            timestep=torch.from_numpy(t),
        )
    return out.sample.numpy()


@eqx.filter_jit
def _batched(model, x, t, context, pooled):
    return jax.vmap(model)(x, t, context, pooled)


def _port(torch_model, dtype=jnp.float32):
    return jf.nn.SD3Transformer.from_diffusers(
        torch_model.config, state_dict_numpy(torch_model), dtype=dtype
    )


@pytest.fixture(scope="module")
def models():
    torch_model = tiny_sd3()
    return torch_model, _port(torch_model)


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def test_every_weight_is_used_exactly_once(models):
    torch_model, model = models
    sd = state_dict_numpy(torch_model)
    config = {**torch_model.config, "_class_name": "SD3Transformer2DModel"}
    assert "pos_embed.pos_embed" in sd  # a persistent buffer when pos_embed_max_size is set
    jf.nn.SD3Transformer.from_diffusers(config, sd)
    assert (model.in_channels, model.out_channels, model.patch_size) == (16, 16, 2)
    assert (model.joint_attention_dim, model.pooled_projection_dim) == (32, 24)
    assert model.pos_embed_max_size == 32 and model.dual_attention_layers == (0,)

    missing = dict(sd)
    del missing["transformer_blocks.1.attn.norm_added_k.weight"]
    with pytest.raises(ValueError, match="transformer_blocks.1.attn.norm_added_k.weight"):
        jf.nn.SD3Transformer.from_diffusers(config, missing)
    extra = {**sd, "transformer_blocks.2.ff_context.net.2.bias": np.zeros(32, np.float32)}
    with pytest.raises(ValueError, match="transformer_blocks.2.ff_context.net.2.bias"):
        jf.nn.SD3Transformer.from_diffusers(config, extra)
    for wrong in (
        {"num_layers": 2},
        {"num_layers": 4},
        {"dual_attention_layers": ()},
        {"dual_attention_layers": (0, 1)},
        {"qk_norm": None},
    ):
        with pytest.raises(ValueError, match="SD3Transformer"):
            jf.nn.SD3Transformer.from_diffusers({**config, **wrong}, sd)
    with pytest.raises(ValueError, match="float32 or jnp.bfloat16"):
        jf.nn.SD3Transformer.from_diffusers(config, sd, dtype=jnp.float16)


def test_blocks_are_scanned_in_runs_of_one_structure():
    # SD3.5 Medium's layout: 13 MMDiT-X blocks, then plain ones, then the last block
    torch_model = tiny_sd3(num_layers=16, dual_attention_layers=tuple(range(13)))
    model = _port(torch_model)
    runs = [(r.dual, r.norm1.weight.shape[0]) for r in model.runs]
    assert runs == [(True, 13), (False, 2)]
    assert not model.last_block.dual and model.last_block.context_pre_only


@pytest.mark.parametrize("h, w", [(16, 16), (24, 8)])
def test_forward_matches_diffusers(models, h, w):
    torch_model, model = models
    x, t, context, pooled = _inputs(h, w)
    ref = _torch(torch_model, x, t, context, pooled)
    out = _batched(model, jnp.asarray(x), jnp.asarray(t), jnp.asarray(context), jnp.asarray(pooled))
    assert out.dtype == jnp.float32 and out.shape == ref.shape
    for i in range(len(SIGMAS)):
        assert _rel(out[i], ref[i]) <= 1e-5, SIGMAS[i]


@pytest.mark.parametrize(
    "overrides, h, w",
    [
        # SD3.0: no dual attention, no qk-norm
        (dict(dual_attention_layers=(), qk_norm=None), 16, 24),
        # two MMDiT-X blocks in a row (one scan of length 2), then a plain one
        (dict(num_layers=4, dual_attention_layers=(0, 1)), 24, 8),
        # no position table in the checkpoint (sin-cos embedding of the grid), and a
        # dual last block (context_pre_only and MMDiT-X at once)
        (
            dict(pos_embed_max_size=None, sample_size=16, num_layers=2, dual_attention_layers=(1,)),
            16,
            24,
        ),
    ],
)
def test_forward_matches_diffusers_for_other_configs(overrides, h, w):
    torch_model = tiny_sd3(seed=1, **overrides)
    model = _port(torch_model)
    x, t, context, pooled = _inputs(h, w, seed=1)
    ref = _torch(torch_model, x, t, context, pooled)
    out = _batched(model, jnp.asarray(x), jnp.asarray(t), jnp.asarray(context), jnp.asarray(pooled))
    for i in range(len(SIGMAS)):
        assert _rel(out[i], ref[i]) <= 1e-5, SIGMAS[i]


def test_float32_stays_float32_under_x64(models):
    _, model = models
    x, t, context, pooled = (a[0] for a in _inputs(16, 24, batch=1))
    # a Python-float time, as a user passes it; jax_enable_x64 is on in the tests
    jaxpr = jax.make_jaxpr(model)(jnp.asarray(x), 1000.0 * 0.5, jnp.asarray(context), pooled)
    # the time enters as float64 (the argument); no operation computes in float64
    assert "f64" not in "\n".join(str(eqn) for eqn in jaxpr.jaxpr.eqns)
    assert jaxpr.out_avals[0].dtype == jnp.float32


def test_jvp_matches_diffusers(models):
    torch_model, model = models
    x, t, context, pooled = _inputs(16, 8, batch=1, seed=2)
    v = np.random.default_rng(3).standard_normal(x.shape).astype(np.float32)

    def f(x_):
        return torch_model(
            hidden_states=x_,
            encoder_hidden_states=torch.from_numpy(context),
            pooled_projections=torch.from_numpy(pooled),
            timestep=torch.from_numpy(t),
        ).sample

    # the default CPU flash kernel has no forward-mode derivative
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH), torch.no_grad():
        ref_out, ref_tan = torch.func.jvp(f, (torch.from_numpy(x),), (torch.from_numpy(v),))

    @eqx.filter_jit
    def jvp(model, x, v, t, context, pooled):
        return jax.jvp(lambda x_: model(x_, t, context, pooled), (x,), (v,))

    out, tan = jvp(model, jnp.asarray(x[0]), jnp.asarray(v[0]), t[0], context[0], pooled[0])
    assert _rel(out, ref_out.numpy()[0]) <= 1e-5
    assert _rel(tan, ref_tan.numpy()[0]) <= 1e-5


def test_bfloat16(models):
    torch_model, model = models
    model_bf16 = _port(torch_model, dtype=jnp.bfloat16)
    assert model_bf16.proj_out.weight.dtype == jnp.bfloat16
    x, t, context, pooled = (jnp.asarray(a) for a in _inputs(24, 8))
    ref = _batched(model, x, t, context, pooled)
    out = _batched(model_bf16, x.astype(jnp.bfloat16), t, context, pooled)
    assert out.dtype == jnp.bfloat16
    for i in range(len(SIGMAS)):
        assert _rel(out[i], ref[i]) <= 5e-2


def test_jit_and_vmap_equal_the_unbatched_call(models):
    _, model = models
    x, t, context, pooled = (jnp.asarray(a) for a in _inputs(24, 8))
    batched = _batched(model, x, t, context, pooled)
    # the unbatched call jitted too (eagerly it compiles each operation: slow here)
    unbatched = eqx.filter_jit(lambda m, *args: m(*args))
    for i in range(len(SIGMAS)):
        one = unbatched(model, x[i], t[i], context[i], pooled[i])
        assert one.dtype == jnp.float32
        np.testing.assert_allclose(batched[i], one, rtol=1e-5, atol=1e-5 * np.abs(one).max())


def test_latents_it_cannot_take_raise(models):
    _, model = models
    context, pooled = jnp.zeros((L_CONTEXT, 32)), jnp.zeros(24)
    call = eqx.filter_jit(lambda m, x, c, p: m(x, 500.0, c, p))
    with pytest.raises(ValueError, match="channels"):
        call(model, jnp.zeros((4, 16, 16)), context, pooled)
    with pytest.raises(ValueError, match="multiples of the patch size 2"):
        call(model, jnp.zeros((16, 16, 15)), context, pooled)
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        call(model, jnp.zeros((16, 66, 16)), context, pooled)
    with pytest.raises(ValueError, match="joint_attention_dim"):
        call(model, jnp.zeros((16, 16, 16)), jnp.zeros((L_CONTEXT, 31)), pooled)
    with pytest.raises(ValueError, match="pooled_projection_dim"):
        call(model, jnp.zeros((16, 16, 16)), context, jnp.zeros(25))
