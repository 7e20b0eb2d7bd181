"""`jaxflow.nn.FluxTransformer` against diffusers' `FluxTransformer2DModel`: every
weight read once, the forward pass and its JVP to 1e-5 relative in float32, the
pipeline's packing and token ids, bfloat16, batching and the input checks."""

import copy

import pytest

pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline  # noqa: E402
from jaxtyping import TypeCheckError  # noqa: E402
from tiny_models import FLUX_CONFIG, state_dict_numpy, tiny_flux  # noqa: E402

import jaxflow.nn as jnn  # noqa: E402

L_TXT = 7
C_LAT = FLUX_CONFIG["in_channels"] // 4


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def dev():
    torch_model = tiny_flux()
    sd = state_dict_numpy(torch_model)
    return torch_model, sd, jnn.FluxTransformer.from_diffusers(dict(torch_model.config), sd)


@pytest.fixture(scope="module")
def schnell():
    torch_model = tiny_flux(seed=1, guidance_embeds=False)
    sd = state_dict_numpy(torch_model)
    return torch_model, sd, jnn.FluxTransformer.from_diffusers(dict(torch_model.config), sd)


def _inputs(height, width, seed=0):
    """A latent packed by diffusers' pipeline and by ours, its ids, a prompt."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((1, C_LAT, height, width)).astype(np.float32)
    context = rng.standard_normal((L_TXT, FLUX_CONFIG["joint_attention_dim"])).astype(np.float32)
    pooled = rng.standard_normal((FLUX_CONFIG["pooled_projection_dim"],)).astype(np.float32)
    packed_torch = FluxPipeline._pack_latents(torch.from_numpy(latent), 1, C_LAT, height, width)
    img_ids = FluxPipeline._prepare_latent_image_ids(
        1, height // 2, width // 2, "cpu", torch.float32
    )
    x = jnn.pack_latents(jnp.asarray(latent[0]))
    assert np.array_equal(np.asarray(x), packed_torch[0].numpy())
    assert np.array_equal(jnn.flux_image_ids(height, width), img_ids.numpy())
    return dict(
        latent=latent[0],
        x=x,
        packed_torch=packed_torch,
        img_ids=img_ids,
        txt_ids=torch.zeros(L_TXT, 3),
        context=context,
        pooled=pooled,
    )


def _torch_forward(model, inp, sigma, guidance, hidden_states=None, dtype=torch.float32):
    return model(
        hidden_states=(inp["packed_torch"] if hidden_states is None else hidden_states).to(dtype),
        encoder_hidden_states=torch.from_numpy(inp["context"])[None].to(dtype),
        pooled_projections=torch.from_numpy(inp["pooled"])[None].to(dtype),
        timestep=torch.tensor([sigma], dtype=torch.float32),
        img_ids=inp["img_ids"],
        txt_ids=inp["txt_ids"],
        guidance=None if guidance is None else torch.tensor([guidance], dtype=torch.float32),
    ).sample[0]


_call = jax.jit(lambda model, x, t, g, c, p, rope: model(x, t, g, c, p, rope))


def _rope(model, inp, height, width):
    return model.rope(jnn.flux_image_ids(height, width), np.zeros((L_TXT, 3)))


# ---------------------------------------------------------------------------- weights


def test_every_weight_is_used_exactly_once(dev):
    torch_model, sd, model = dev
    config = dict(torch_model.config)
    assert model.num_layers == 2 and model.num_single_layers == 2
    assert (model.in_channels, model.out_channels, model.patch_size) == (64, 64, 1)
    assert model.guidance_embeds and model.axes_dims_rope == (4, 6, 6)

    missing = dict(sd)
    del missing["single_transformer_blocks.1.attn.norm_k.weight"]
    with pytest.raises(ValueError, match=r"missing.*single_transformer_blocks\.1\.attn\.norm_k"):
        jnn.FluxTransformer.from_diffusers(config, missing)

    extra = {**sd, "transformer_blocks.0.attn.to_qkv.weight": np.zeros((96, 32), np.float32)}
    with pytest.raises(ValueError, match=r"not used.*transformer_blocks\.0\.attn\.to_qkv"):
        jnn.FluxTransformer.from_diffusers(config, extra)

    # a config that describes another architecture than the weights'
    with pytest.raises(ValueError, match=r"transformer_blocks\.2\."):
        jnn.FluxTransformer.from_diffusers({**config, "num_layers": 3}, sd)
    with pytest.raises(ValueError, match="guidance_embedder"):
        jnn.FluxTransformer.from_diffusers({**config, "guidance_embeds": False}, sd)
    with pytest.raises(ValueError, match="x_embedder.weight.*shape"):
        jnn.FluxTransformer.from_diffusers({**config, "in_channels": 16}, sd)
    with pytest.raises(ValueError, match="axes_dims_rope"):
        jnn.FluxTransformer.from_diffusers({**config, "axes_dims_rope": (4, 4, 4)}, sd)
    with pytest.raises(ValueError, match="qk_norm"):
        jnn.FluxTransformer.from_diffusers({**config, "qk_norm": "rms_norm"}, sd)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        jnn.FluxTransformer.from_diffusers(config, sd, dtype=jnp.float16)


# ---------------------------------------------------------------------------- forward


def test_packing_ids_and_rope_match_the_pipeline(dev):
    torch_model, _, model = dev
    inp = _inputs(16, 24)
    latent = jnp.asarray(inp["latent"])
    assert np.array_equal(np.asarray(jnn.unpack_latents(inp["x"], 16, 24)), inp["latent"])
    unpacked = FluxPipeline._unpack_latents(inp["packed_torch"], 16 * 8, 24 * 8, 8)
    assert np.array_equal(np.asarray(jnn.unpack_latents(inp["x"], 16, 24)), unpacked[0].numpy())
    assert jnn.pack_latents(latent).dtype == latent.dtype
    cos, sin = _rope(model, inp, 16, 24)
    ref_cos, ref_sin = torch_model.pos_embed(torch.cat([inp["txt_ids"], inp["img_ids"]]))
    assert cos.dtype == sin.dtype == jnp.float32
    # the float64 host table is diffusers' own to the bit
    assert np.array_equal(np.asarray(cos), ref_cos.numpy())
    assert np.array_equal(np.asarray(sin), ref_sin.numpy())


@pytest.mark.parametrize("height, width", [(16, 16), (16, 24)])
def test_forward_matches_diffusers(dev, height, width):
    torch_model, _, model = dev
    inp = _inputs(height, width)
    rope = _rope(model, inp, height, width)
    for sigma in (1.0, 0.5, 0.01):
        for guidance in (3.5, 1.0):
            with torch.no_grad():
                ref = _torch_forward(torch_model, inp, sigma, guidance).numpy()
            with jax.default_matmul_precision("highest"):
                out = _call(model, inp["x"], sigma, guidance, inp["context"], inp["pooled"], rope)
            assert out.dtype == jnp.float32 and out.shape == ref.shape
            assert _rel(out, ref) <= 1e-5, (sigma, guidance, _rel(out, ref))


def test_forward_without_guidance_embedding_matches_diffusers(schnell):
    torch_model, _, model = schnell
    assert not model.guidance_embeds and model.guidance_embedder is None
    inp = _inputs(16, 24, seed=1)
    rope = _rope(model, inp, 16, 24)
    for sigma in (1.0, 0.3):
        with torch.no_grad():
            ref = _torch_forward(torch_model, inp, sigma, None).numpy()
        with jax.default_matmul_precision("highest"):
            out = _call(model, inp["x"], sigma, None, inp["context"], inp["pooled"], rope)
        assert _rel(out, ref) <= 1e-5, (sigma, _rel(out, ref))


def test_float32_stays_float32(dev):
    # the suite runs with jax_enable_x64: a float64 constant or table would
    # promote the whole network silently
    _, _, model = dev
    inp = _inputs(16, 16)
    rope = _rope(model, inp, 16, 16)
    args = (inp["x"], 0.5, 3.5, jnp.asarray(inp["context"]), jnp.asarray(inp["pooled"]), rope)
    # the Python times arrive as float64 scalars; nothing computed may be float64
    closed = jax.make_jaxpr(lambda m, *a: m(*a))(model, *args)
    dtypes = {str(v.aval.dtype) for eqn in _equations(closed.jaxpr) for v in eqn.outvars}
    assert "float64" not in dtypes and "float32" in dtypes


def _equations(jaxpr):
    """The equations of a jaxpr and of those nested in it (scan, jit, custom rules)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for value in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(value, "jaxpr", value)  # a ClosedJaxpr's Jaxpr
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


# ---------------------------------------------------------------------------- JVP


def test_jvp_matches_torch_func_jvp(dev):
    torch_model, _, model = dev
    inp = _inputs(16, 16)
    rope = _rope(model, inp, 16, 16)
    context, pooled = jnp.asarray(inp["context"]), jnp.asarray(inp["pooled"])
    tangent = np.random.default_rng(2).standard_normal(inp["x"].shape).astype(np.float32)

    # diffusers' default attention backend calls F.scaled_dot_product_attention,
    # which honours sdpa_kernel; the CPU flash kernel has no forward-mode rule
    def f(hidden_states):
        return _torch_forward(torch_model, inp, 0.5, 3.5, hidden_states=hidden_states)

    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        primal, ref = torch.func.jvp(f, (inp["packed_torch"],), (torch.from_numpy(tangent)[None],))

    def g(m, x, dx):
        return jax.jvp(lambda x: m(x, 0.5, 3.5, context, pooled, rope), (x,), (dx,))

    with jax.default_matmul_precision("highest"):
        out, dout = jax.jit(g)(model, inp["x"], jnp.asarray(tangent))
    assert dout.dtype == jnp.float32
    assert _rel(out, primal.detach().numpy()) <= 1e-5
    assert _rel(dout, ref.detach().numpy()) <= 1e-5, _rel(dout, ref.detach().numpy())


# ---------------------------------------------------------------------------- bfloat16


def test_bfloat16(dev):
    torch_model, sd, model = dev
    bf16 = jnn.FluxTransformer.from_diffusers(dict(torch_model.config), sd, dtype=jnp.bfloat16)
    assert bf16.x_embedder.weight.dtype == jnp.bfloat16
    inp = _inputs(16, 24)
    rope = _rope(model, inp, 16, 24)
    x16 = inp["x"].astype(jnp.bfloat16)
    c16, p16 = (jnp.asarray(inp[k], jnp.bfloat16) for k in ("context", "pooled"))
    # 1000 sigma and 1000 guidance exact in bfloat16
    with jax.default_matmul_precision("highest"):  # the float32 program of the tests above
        out = _call(bf16, x16, 0.5, 1.0, c16, p16, rope)
        ref = _call(model, inp["x"], 0.5, 1.0, inp["context"], inp["pooled"], rope)
    assert out.dtype == jnp.bfloat16
    assert _rel(out, ref) <= 5e-2
    # guidance 3.5 -> 1000 g = 3504 in bfloat16, as in diffusers: far from float32
    # but close to diffusers' own bfloat16 model
    torch16 = copy.deepcopy(torch_model).to(torch.bfloat16)
    with torch.no_grad():
        ref16 = _torch_forward(torch16, inp, 0.5, 3.5, dtype=torch.bfloat16).float().numpy()
    with jax.default_matmul_precision("highest"):
        out = _call(bf16, x16, 0.5, 3.5, c16, p16, rope)
        ref = _call(model, inp["x"], 0.5, 3.5, inp["context"], inp["pooled"], rope)
    assert _rel(out, ref16) <= 5e-2
    assert _rel(out, ref) > 0.1  # the rounding of 1000 g is diffusers', not dropped
    # float32 tokens into the bfloat16 model: computed in bfloat16, returned as given
    out = jax.eval_shape(bf16, inp["x"], 0.5, 1.0, c16, p16, rope)
    assert out.dtype == jnp.float32


# ---------------------------------------------------------------------------- batching


def test_jit_vmap_equals_unbatched_calls(dev):
    _, _, model = dev
    inputs = [_inputs(16, 24, seed=s) for s in (3, 4)]
    rope = _rope(model, inputs[0], 16, 24)
    xs = jnp.stack([i["x"] for i in inputs])
    cs = jnp.stack([jnp.asarray(i["context"]) for i in inputs])
    ps = jnp.stack([jnp.asarray(i["pooled"]) for i in inputs])
    ts, gs = jnp.array([0.9, 0.2], jnp.float32), jnp.array([3.5, 2.0], jnp.float32)

    @jax.jit
    def batched(m, xs, ts, gs, cs, ps, rope):
        return jax.vmap(m, in_axes=(0, 0, 0, 0, 0, None))(xs, ts, gs, cs, ps, rope)

    with jax.default_matmul_precision("highest"):
        out = batched(model, xs, ts, gs, cs, ps, rope)
        for b in range(2):
            one = _call(model, xs[b], ts[b], gs[b], cs[b], ps[b], rope)
            assert _rel(out[b], one) <= 1e-6


# ---------------------------------------------------------------------------- checks


def test_bad_shapes_and_missing_guidance_raise(dev, schnell):
    _, _, model = dev
    inp = _inputs(16, 16)
    x, c, p = inp["x"], jnp.asarray(inp["context"]), jnp.asarray(inp["pooled"])
    rope = _rope(model, inp, 16, 16)

    with pytest.raises(ValueError, match=r"x must be packed latent tokens \(s, 64\)"):
        model(x[:, :63], 0.5, 3.5, c, p, rope)
    with pytest.raises(ValueError, match=r"context must be text embeddings \(l, 32\)"):
        model(x, 0.5, 3.5, c[:, :31], p, rope)
    with pytest.raises(ValueError, match=r"pooled must be .* \(24,\)"):
        model(x, 0.5, 3.5, c, p[:23], rope)
    # a table for another resolution or prompt length
    with pytest.raises(ValueError, match=r"rope table .* need \(71, 16\)"):
        model(x, 0.5, 3.5, c, p, _rope(model, inp, 16, 24))
    with pytest.raises(ValueError, match="rope table"):
        model(x, 0.5, 3.5, c[:5], p, rope)
    with pytest.raises(ValueError, match="guidance-distilled.*guidance=3.5"):
        model(x, 0.5, None, c, p, rope)
    with pytest.raises(ValueError, match="guidance=None"):
        schnell[2](x, 0.5, 3.5, c, p, rope)
    with pytest.raises((ValueError, TypeCheckError), match="timestep"):
        model(x, jnp.array([0.5, 0.6]), 3.5, c, p, rope)
    # shapes are static: the checks hold under jit
    with pytest.raises(ValueError, match="x must be packed latent tokens"):
        _call(model, x[:, :63], 0.5, 3.5, c, p, rope)

    with pytest.raises(ValueError, match="img_ids must be"):
        model.rope(np.zeros((64, 2)), np.zeros((7, 3)))
    with pytest.raises(ValueError, match="height must be an even int"):
        jnn.pack_latents(jnp.zeros((16, 15, 16)))
    with pytest.raises(ValueError, match="width must be an even int"):
        jnn.flux_image_ids(16, 7)
    with pytest.raises(ValueError, match=r"packs into \(96, 4c\) tokens"):
        jnn.unpack_latents(x, 16, 24)
