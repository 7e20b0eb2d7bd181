"""FLUX.1's rectified-flow transformer (Black Forest Labs, 2024), ported from
diffusers' `FluxTransformer2DModel` to read its weights and reproduce its output.

The network is an MMDiT: double-stream blocks keep separate weights for the text
and the image tokens and attend over both jointly, then single-stream blocks run
attention and an MLP in parallel on the concatenated sequence. Positions enter
only through rotary embeddings (Su et al., 2021, "RoFormer: Enhanced Transformer
with Rotary Position Embedding") over three axes of token ids; the image enters
as 2x2 patches of the latent packed into tokens by `pack_latents`.
"""

from collections.abc import Mapping

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Real

from .._misc import transformer_dtype
from ._dit import (
    FeedForward,
    Linear,
    MLPEmbedding,
    Weights,
    attention,
    gelu_tanh,
    layer_norm,
    rms_norm,
    scan_blocks,
    stack,
    stacked_depth,
    timestep_embedding,
    to_device,
)

_WHAT = "FluxTransformer2DModel"

# FluxTransformer2DModel.__init__'s defaults, which a config.json may leave out
_DEFAULTS = dict(
    patch_size=1,
    in_channels=64,
    out_channels=None,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=False,
    axes_dims_rope=(16, 56, 56),
)

_THETA = 10000.0  # FluxPosEmbed(theta=10000), fixed in diffusers
_NORM_EPS = 1e-6
_TIME_CHANNELS = 256  # Timesteps(num_channels=256) of the time and guidance embedders


def _modulate(x: Array, shift: Array, scale: Array) -> Array:
    return layer_norm(x, _NORM_EPS) * (1 + scale) + shift


def _rotate(x: Float[Array, "n h d"], cos: Array, sin: Array) -> Float[Array, "n h d"]:
    # diffusers' apply_rotary_emb(use_real=True, use_real_unbind_dim=-1): channel
    # pairs (2i, 2i+1) are rotated as complex numbers, in float32 whatever the
    # compute dtype, and cast back
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    out = x.astype(jnp.float32) * cos[:, None] + rotated.astype(jnp.float32) * sin[:, None]
    return out.astype(x.dtype)


def _round_to(x: Array, dtype) -> Array:
    """float32 `x` rounded to `dtype`'s precision, kept in float32."""
    if jnp.dtype(dtype) == jnp.float32:
        return x
    info = jnp.finfo(dtype)
    return jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)


def _heads(x: Array, head_dim: int) -> Array:
    return x.reshape(x.shape[0], -1, head_dim)


class _DoubleBlock(eqx.Module):
    """diffusers' `FluxTransformerBlock`: AdaLN-Zero modulated joint attention and
    MLPs, with separate weights for the image and the text stream."""

    norm1: Linear
    norm1_context: Linear
    to_q: Linear
    to_k: Linear
    to_v: Linear
    to_out: Linear
    add_q_proj: Linear
    add_k_proj: Linear
    add_v_proj: Linear
    to_add_out: Linear
    norm_q: Float[Array, " d_head"]
    norm_k: Float[Array, " d_head"]
    norm_added_q: Float[Array, " d_head"]
    norm_added_k: Float[Array, " d_head"]
    ff: FeedForward
    ff_context: FeedForward
    head_dim: int = eqx.field(static=True)

    @classmethod
    def read(cls, weights: Weights, prefix: str, dim: int, head_dim: int):
        a = f"{prefix}.attn"
        return cls(
            norm1=Linear.read(weights, f"{prefix}.norm1.linear", dim, 6 * dim),
            norm1_context=Linear.read(weights, f"{prefix}.norm1_context.linear", dim, 6 * dim),
            to_q=Linear.read(weights, f"{a}.to_q", dim, dim),
            to_k=Linear.read(weights, f"{a}.to_k", dim, dim),
            to_v=Linear.read(weights, f"{a}.to_v", dim, dim),
            to_out=Linear.read(weights, f"{a}.to_out.0", dim, dim),
            add_q_proj=Linear.read(weights, f"{a}.add_q_proj", dim, dim),
            add_k_proj=Linear.read(weights, f"{a}.add_k_proj", dim, dim),
            add_v_proj=Linear.read(weights, f"{a}.add_v_proj", dim, dim),
            to_add_out=Linear.read(weights, f"{a}.to_add_out", dim, dim),
            norm_q=weights.take(f"{a}.norm_q.weight", (head_dim,)),
            norm_k=weights.take(f"{a}.norm_k.weight", (head_dim,)),
            norm_added_q=weights.take(f"{a}.norm_added_q.weight", (head_dim,)),
            norm_added_k=weights.take(f"{a}.norm_added_k.weight", (head_dim,)),
            ff=FeedForward.read(weights, f"{prefix}.ff", dim),
            ff_context=FeedForward.read(weights, f"{prefix}.ff_context", dim),
            head_dim=head_dim,
        )

    def __call__(self, img: Array, txt: Array, temb: Array, cos: Array, sin: Array):
        mod = jnp.split(self.norm1(jax.nn.silu(temb)), 6)
        c_mod = jnp.split(self.norm1_context(jax.nn.silu(temb)), 6)
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = mod
        c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = c_mod

        x = _modulate(img, shift, scale)
        c = _modulate(txt, c_shift, c_scale)
        d = self.head_dim
        q = rms_norm(_heads(self.to_q(x), d), _NORM_EPS, self.norm_q)
        k = rms_norm(_heads(self.to_k(x), d), _NORM_EPS, self.norm_k)
        v = _heads(self.to_v(x), d)
        cq = rms_norm(_heads(self.add_q_proj(c), d), _NORM_EPS, self.norm_added_q)
        ck = rms_norm(_heads(self.add_k_proj(c), d), _NORM_EPS, self.norm_added_k)
        cv = _heads(self.add_v_proj(c), d)
        # the text tokens come first in the joint sequence, as in the rope table
        q = _rotate(jnp.concatenate([cq, q]), cos, sin)
        k = _rotate(jnp.concatenate([ck, k]), cos, sin)
        o = attention(q, k, jnp.concatenate([cv, v]))
        o = o.reshape(o.shape[0], -1)
        n_txt = txt.shape[0]

        img = img + gate * self.to_out(o[n_txt:])
        img = img + gate_mlp * self.ff(_modulate(img, shift_mlp, scale_mlp))
        txt = txt + c_gate * self.to_add_out(o[:n_txt])
        txt = txt + c_gate_mlp * self.ff_context(_modulate(txt, c_shift_mlp, c_scale_mlp))
        return img, txt


class _SingleBlock(eqx.Module):
    """diffusers' `FluxSingleTransformerBlock`: attention and an MLP side by side on
    the joint sequence, their outputs projected together."""

    norm: Linear
    to_q: Linear
    to_k: Linear
    to_v: Linear
    norm_q: Float[Array, " d_head"]
    norm_k: Float[Array, " d_head"]
    proj_mlp: Linear
    proj_out: Linear
    head_dim: int = eqx.field(static=True)

    @classmethod
    def read(cls, weights: Weights, prefix: str, dim: int, head_dim: int):
        a = f"{prefix}.attn"
        return cls(
            norm=Linear.read(weights, f"{prefix}.norm.linear", dim, 3 * dim),
            to_q=Linear.read(weights, f"{a}.to_q", dim, dim),
            to_k=Linear.read(weights, f"{a}.to_k", dim, dim),
            to_v=Linear.read(weights, f"{a}.to_v", dim, dim),
            norm_q=weights.take(f"{a}.norm_q.weight", (head_dim,)),
            norm_k=weights.take(f"{a}.norm_k.weight", (head_dim,)),
            proj_mlp=Linear.read(weights, f"{prefix}.proj_mlp", dim, 4 * dim),
            proj_out=Linear.read(weights, f"{prefix}.proj_out", 5 * dim, dim),
            head_dim=head_dim,
        )

    def __call__(self, x: Array, temb: Array, cos: Array, sin: Array) -> Array:
        shift, scale, gate = jnp.split(self.norm(jax.nn.silu(temb)), 3)
        y = _modulate(x, shift, scale)
        mlp = gelu_tanh(self.proj_mlp(y))
        d = self.head_dim
        q = _rotate(rms_norm(_heads(self.to_q(y), d), _NORM_EPS, self.norm_q), cos, sin)
        k = _rotate(rms_norm(_heads(self.to_k(y), d), _NORM_EPS, self.norm_k), cos, sin)
        o = attention(q, k, _heads(self.to_v(y), d))
        o = o.reshape(o.shape[0], -1)
        return x + gate * self.proj_out(jnp.concatenate([o, mlp], axis=-1))


def _config(config: Mapping) -> dict:
    # diffusers' bookkeeping entries (_class_name, _diffusers_version,
    # _use_default_values, ...) start with an underscore; any other unknown entry
    # may change the architecture, so it is refused rather than ignored
    cfg = {k: v for k, v in dict(config).items() if not str(k).startswith("_")}
    unknown = sorted(set(cfg) - set(_DEFAULTS))
    if unknown:
        raise ValueError(
            f"{_WHAT}: the config has entries this port does not know: {unknown}; it "
            f"reads {sorted(_DEFAULTS)}."
        )
    cfg = {**_DEFAULTS, **cfg}
    if cfg["out_channels"] is None:
        cfg["out_channels"] = cfg["in_channels"]
    for name in (
        "patch_size",
        "in_channels",
        "out_channels",
        "attention_head_dim",
        "num_attention_heads",
        "joint_attention_dim",
        "pooled_projection_dim",
    ):
        value = cfg[name]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{_WHAT}: config {name!r} must be a positive int, got {value!r}.")
    for name in ("num_layers", "num_single_layers"):
        value = cfg[name]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{_WHAT}: config {name!r} must be an int >= 0, got {value!r}.")
    axes = tuple(int(a) for a in cfg["axes_dims_rope"])
    if any(a < 2 or a % 2 for a in axes) or sum(axes) != cfg["attention_head_dim"]:
        raise ValueError(
            f"{_WHAT}: config 'axes_dims_rope' {axes} must be even sizes summing to "
            f"attention_head_dim={cfg['attention_head_dim']} (each head's channels are "
            "split between the rotary axes)."
        )
    cfg["axes_dims_rope"] = axes
    cfg["guidance_embeds"] = bool(cfg["guidance_embeds"])
    return cfg


class FluxTransformer(eqx.Module):
    """FLUX.1's transformer (Black Forest Labs, 2024), as diffusers'
    `FluxTransformer2DModel`: the velocity of a packed latent at a time, given a
    prompt's T5 token embeddings and its pooled CLIP embedding.

    Unbatched like every equinox module: one sequence of latent tokens in, its
    velocity out; `jax.vmap` over a batch. Build it with `from_diffusers`. The
    double-stream blocks run as one `lax.scan` and the single-stream blocks as
    another, so compilation does not grow with depth. Attention goes through XLA's
    implementation, so `jax.jvp` works through the model.

    Computation runs in the weights' dtype (float32 or bfloat16), with layer-norm
    and RMS-norm statistics, the rotary embedding and the sinusoidal time
    features in float32, following diffusers' casts; the output has the dtype of
    the input `x`.

    Positions enter through rotary embeddings (Su et al., 2021, "RoFormer:
    Enhanced Transformer with Rotary Position Embedding") of three-axis token ids;
    `rope` builds their table once per resolution on the host.

    **Attributes:**

    - `in_channels`, `out_channels`, `patch_size`: token width in is
      `in_channels`, out is `patch_size**2 * out_channels` (64 and 64 for
      FLUX.1, whose 16-channel latents are packed 2x2 by `pack_latents`).
    - `joint_attention_dim`, `pooled_projection_dim`: the widths of the text
      token embeddings and of the pooled embedding.
    - `guidance_embeds`: whether the model takes a guidance scale (FLUX.1-dev is
      guidance-distilled; FLUX.1-schnell is not).
    - `axes_dims_rope`: the head channels given to each axis of the token ids.
    """

    x_embedder: Linear
    context_embedder: Linear
    time_embedder: MLPEmbedding
    guidance_embedder: MLPEmbedding | None
    text_embedder: MLPEmbedding
    double_blocks: _DoubleBlock | None
    single_blocks: _SingleBlock | None
    norm_out: Linear
    proj_out: Linear
    in_channels: int = eqx.field(static=True)
    out_channels: int = eqx.field(static=True)
    patch_size: int = eqx.field(static=True)
    joint_attention_dim: int = eqx.field(static=True)
    pooled_projection_dim: int = eqx.field(static=True)
    guidance_embeds: bool = eqx.field(static=True)
    axes_dims_rope: tuple[int, ...] = eqx.field(static=True)
    num_attention_heads: int = eqx.field(static=True)
    attention_head_dim: int = eqx.field(static=True)

    @classmethod
    def from_diffusers(
        cls,
        config: Mapping,
        state_dict: Mapping[str, np.ndarray],
        dtype=jnp.float32,
    ) -> "FluxTransformer":
        """The port of a diffusers `FluxTransformer2DModel`.

        **Arguments:**

        - `config`: the model's diffusers config (`model.config`, or the contents
          of its `config.json`); entries starting with `_` are ignored.
        - `state_dict`: its weights, name -> NumPy array (as
          `{k: v.float().numpy() for k, v in model.state_dict().items()}`).
        - `dtype`: `jnp.float32` or `jnp.bfloat16`, the dtype the weights are
          stored and computed in.

        **Returns:**

        A `FluxTransformer` whose every parameter is one entry of `state_dict`.

        **Raises:**

        `ValueError` for a `dtype` other than float32 or bfloat16, a config entry
        this port does not know or an invalid one, and weights that do not match
        the config: missing entries, unused entries or wrong shapes, all listed.
        """
        dtype = transformer_dtype(_WHAT, dtype)
        cfg = _config(config)
        w = Weights(state_dict, dtype, what=_WHAT)
        heads, head_dim = int(cfg["num_attention_heads"]), int(cfg["attention_head_dim"])
        dim = heads * head_dim
        patch, c_in = int(cfg["patch_size"]), int(cfg["in_channels"])
        c_out = int(cfg["out_channels"])
        joint, pooled = int(cfg["joint_attention_dim"]), int(cfg["pooled_projection_dim"])
        tte = "time_text_embed"

        guidance_embedder = None
        if cfg["guidance_embeds"]:
            guidance_embedder = MLPEmbedding.read(
                w, f"{tte}.guidance_embedder", _TIME_CHANNELS, dim
            )
        double = [
            _DoubleBlock.read(w, f"transformer_blocks.{i}", dim, head_dim)
            for i in range(int(cfg["num_layers"]))
        ]
        single = [
            _SingleBlock.read(w, f"single_transformer_blocks.{i}", dim, head_dim)
            for i in range(int(cfg["num_single_layers"]))
        ]
        model = cls(
            x_embedder=Linear.read(w, "x_embedder", c_in, dim),
            context_embedder=Linear.read(w, "context_embedder", joint, dim),
            time_embedder=MLPEmbedding.read(w, f"{tte}.timestep_embedder", _TIME_CHANNELS, dim),
            guidance_embedder=guidance_embedder,
            text_embedder=MLPEmbedding.read(w, f"{tte}.text_embedder", pooled, dim),
            double_blocks=stack(double) if double else None,
            single_blocks=stack(single) if single else None,
            norm_out=Linear.read(w, "norm_out.linear", dim, 2 * dim),
            proj_out=Linear.read(w, "proj_out", dim, patch * patch * c_out),
            in_channels=c_in,
            out_channels=c_out,
            patch_size=patch,
            joint_attention_dim=joint,
            pooled_projection_dim=pooled,
            guidance_embeds=cfg["guidance_embeds"],
            axes_dims_rope=cfg["axes_dims_rope"],
            num_attention_heads=heads,
            attention_head_dim=head_dim,
        )
        w.finish()
        return to_device(model)

    @property
    def dtype(self) -> jnp.dtype:
        """The dtype of the weights, which the network computes in."""
        return self.proj_out.weight.dtype

    @property
    def num_layers(self) -> int:
        """The number of double-stream blocks."""
        return stacked_depth(self.double_blocks)

    @property
    def num_single_layers(self) -> int:
        """The number of single-stream blocks."""
        return stacked_depth(self.single_blocks)

    def rope(
        self, img_ids: Real[ArrayLike, "s _"], txt_ids: Real[ArrayLike, "l _"]
    ) -> tuple[Float[Array, "n d_head"], Float[Array, "n d_head"]]:
        """The rotary table of a sequence of text then image tokens, as diffusers'
        `FluxPosEmbed` builds it.

        Built on the host with NumPy, frequencies and angles in float64 as
        diffusers computes them, then rounded to float32, so that the table is
        diffusers' own to the bit (angles computed in float32 differ from it by up
        to a few ulps, more for larger position ids).

        **Arguments:**

        - `img_ids`: `(s, 3)` ids of the image tokens, `flux_image_ids(h, w)`.
        - `txt_ids`: `(l, 3)` ids of the text tokens, zeros in FLUX.1's pipeline.

        **Returns:**

        `(cos, sin)`, each float32 `(l + s, attention_head_dim)`, text rows first.

        **Raises:**

        `ValueError` for ids that are not `(n, len(axes_dims_rope))`.
        """
        n_axes = len(self.axes_dims_rope)
        tables = []
        for name, ids in (("txt_ids", txt_ids), ("img_ids", img_ids)):
            ids = np.asarray(ids)
            if ids.ndim != 2 or ids.shape[1] != n_axes:
                raise ValueError(
                    f"FluxTransformer.rope: {name} must be (tokens, {n_axes}), one id per "
                    f"rotary axis, got shape {ids.shape}."
                )
            tables.append(ids)
        # diffusers rounds the ids to float32 (`ids.float()`) before the float64 outer
        # product; exact for the integer ids of the pipeline, matched for any other
        pos = np.concatenate(tables).astype(np.float32).astype(np.float64)
        cos, sin = [], []
        for axis, dim in enumerate(self.axes_dims_rope):
            freqs = 1.0 / (_THETA ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
            angles = np.outer(pos[:, axis], freqs)
            cos.append(np.repeat(np.cos(angles), 2, axis=1))
            sin.append(np.repeat(np.sin(angles), 2, axis=1))
        return (
            jnp.asarray(np.concatenate(cos, axis=1), dtype=jnp.float32),
            jnp.asarray(np.concatenate(sin, axis=1), dtype=jnp.float32),
        )

    def __call__(
        self,
        x: Float[Array, "s c_in"],
        timestep: Real[ArrayLike, ""],
        guidance: Real[ArrayLike, ""] | None,
        context: Float[Array, "l d_joint"],
        pooled: Float[Array, " p"],
        rope: tuple[Float[Array, "n d_head"], Float[Array, "n d_head"]],
    ) -> Float[Array, "s c_out"]:
        """The velocity of the packed latent tokens `x`.

        **Arguments:**

        - `x`: `(s, in_channels)` latent tokens, `pack_latents` of a latent.
        - `timestep`: the time as diffusers' `forward` receives it: FLUX's
          pipeline passes the noise level sigma in `[0, 1]`; the model scales it
          by 1000 itself.
        - `guidance`: the guidance scale (3.5 is FLUX.1-dev's default) for a
          guidance-distilled model (`guidance_embeds`), else `None`. It is an
          input of the network, not a combination of two evaluations.
        - `context`: `(l, joint_attention_dim)` text token embeddings (T5).
        - `pooled`: `(pooled_projection_dim,)` pooled text embedding (CLIP).
        - `rope`: `self.rope(img_ids, txt_ids)` for these `s` image and `l`
          text tokens.

        **Returns:**

        `(s, patch_size**2 * out_channels)`, in `x`'s dtype; `unpack_latents`
        turns it back into a latent.

        **Raises:**

        `ValueError` for inputs of the wrong width, a rope table whose length is
        not `l + s`, a non-scalar time, and a `guidance` given to a model without
        guidance embedding or missing for one with it.
        """
        self._check(x, timestep, guidance, context, pooled, rope)
        dtype = self.x_embedder.weight.dtype
        out_dtype = x.dtype
        cos, sin = (jnp.asarray(r, jnp.float32) for r in rope)

        h = self.x_embedder(x.astype(dtype))
        txt = self.context_embedder(context.astype(dtype))
        pooled = pooled.astype(dtype)

        def embed_time(t, embedder):
            # diffusers casts the time to the compute dtype and scales it there, so a
            # bfloat16 model sees 1000 t rounded to bfloat16 (guidance 3.5 becomes
            # 3504; on the randomised test model that alone moves the output 35% from
            # float32's, in diffusers as here): kept, to give what diffusers gives.
            # The rounding is explicit because under jit XLA's excess precision
            # would drop a bfloat16 cast between float32 operations.
            t = _round_to(_round_to(jnp.asarray(t, jnp.float32), dtype) * 1000, dtype)
            return embedder(timestep_embedding(t, _TIME_CHANNELS).astype(dtype))

        temb = embed_time(timestep, self.time_embedder)
        if self.guidance_embedder is not None:
            temb = temb + embed_time(guidance, self.guidance_embedder)
        temb = temb + self.text_embedder(pooled)

        if self.double_blocks is not None:
            h, txt = scan_blocks(
                self.double_blocks, (h, txt), lambda b, c: b(c[0], c[1], temb, cos, sin)
            )
        if self.single_blocks is not None:
            joint = jnp.concatenate([txt, h])
            joint = scan_blocks(self.single_blocks, joint, lambda b, c: b(c, temb, cos, sin))
            h = joint[txt.shape[0] :]

        # AdaLayerNormContinuous splits its modulation as (scale, shift), the
        # reverse of the AdaLN-Zero blocks
        scale, shift = jnp.split(self.norm_out(jax.nn.silu(temb)), 2)
        return self.proj_out(_modulate(h, shift, scale)).astype(out_dtype)

    def _check(self, x, timestep, guidance, context, pooled, rope) -> None:
        c_in = self.in_channels
        if x.ndim != 2 or x.shape[1] != c_in:
            raise ValueError(
                f"FluxTransformer: x must be packed latent tokens (s, {c_in}) (pack_latents "
                f"of a ({c_in // 4}, h, w) latent; vmap for a batch), got shape {x.shape}."
            )
        if context.ndim != 2 or context.shape[1] != self.joint_attention_dim:
            raise ValueError(
                f"FluxTransformer: context must be text embeddings (l, "
                f"{self.joint_attention_dim}), got shape {context.shape}."
            )
        if pooled.shape != (self.pooled_projection_dim,):
            raise ValueError(
                f"FluxTransformer: pooled must be a pooled text embedding "
                f"({self.pooled_projection_dim},), got shape {pooled.shape}."
            )
        for name, t in (("timestep", timestep), ("guidance", guidance)):
            if t is not None and jnp.shape(t) != ():
                raise ValueError(
                    f"FluxTransformer: {name} must be a scalar (vmap for a batch), got shape "
                    f"{jnp.shape(t)}."
                )
        if self.guidance_embeds and guidance is None:
            raise ValueError(
                "FluxTransformer: this model is guidance-distilled (guidance_embeds=True, as "
                "FLUX.1-dev): pass the guidance scale, e.g. guidance=3.5."
            )
        if not self.guidance_embeds and guidance is not None:
            raise ValueError(
                "FluxTransformer: this model has no guidance embedding (guidance_embeds="
                "False, as FLUX.1-schnell): pass guidance=None."
            )
        n, d = context.shape[0] + x.shape[0], self.attention_head_dim
        if not (isinstance(rope, tuple) and len(rope) == 2):
            raise ValueError("FluxTransformer: rope must be the pair (cos, sin) from .rope().")
        for r in rope:
            if jnp.shape(r) != (n, d):
                raise ValueError(
                    f"FluxTransformer: the rope table has shape {jnp.shape(r)}, the "
                    f"{context.shape[0]} text and {x.shape[0]} image tokens need ({n}, {d}); "
                    "build it with .rope(img_ids, txt_ids) for these token counts."
                )


def _check_even(where: str, height, width) -> tuple[int, int]:
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 2 or v % 2:
            raise ValueError(
                f"{where}: the latent {name} must be an even int >= 2 (FLUX packs 2x2 "
                f"patches), got {v!r}."
            )
    return int(height), int(width)


def pack_latents(latents: Float[Array, "c h w"]) -> Float[Array, "hw4 c4"]:
    """A latent packed into FLUX's tokens, as the pipeline's `_pack_latents`: each
    2x2 patch becomes one token of `4c` channels, channel-major then row then
    column within the patch, tokens in row-major order over the patch grid.

    **Arguments:**

    - `latents`: `(c, h, w)`, `h` and `w` even.

    **Returns:**

    `(h/2 * w/2, 4c)`.

    **Raises:**

    `ValueError` for a latent that is not `(c, h, w)` with even `h` and `w`.
    """
    if latents.ndim != 3:
        raise ValueError(
            f"pack_latents: latents must be one (c, h, w) latent (vmap for a batch), got "
            f"shape {latents.shape}."
        )
    c, h, w = latents.shape
    _check_even("pack_latents", h, w)
    x = latents.reshape(c, h // 2, 2, w // 2, 2).transpose(1, 3, 0, 2, 4)
    return x.reshape((h // 2) * (w // 2), 4 * c)


def unpack_latents(
    tokens: Float[Array, "s c4"], height: int, width: int
) -> Float[Array, "c height width"]:
    """The inverse of `pack_latents`, as the pipeline's `_unpack_latents`.

    **Arguments:**

    - `tokens`: `(height/2 * width/2, 4c)` tokens, e.g. `FluxTransformer`'s output.
    - `height`, `width`: the latent's size (not the image's), even.

    **Returns:**

    The `(c, height, width)` latent.

    **Raises:**

    `ValueError` for odd sizes, or tokens whose count or width do not fit them.
    """
    h, w = _check_even("unpack_latents", height, width)
    if tokens.ndim != 2 or tokens.shape[0] != (h // 2) * (w // 2) or tokens.shape[1] % 4:
        raise ValueError(
            f"unpack_latents: a ({height}, {width}) latent packs into ({(h // 2) * (w // 2)}, "
            f"4c) tokens, got shape {tokens.shape}."
        )
    c = tokens.shape[1] // 4
    x = tokens.reshape(h // 2, w // 2, c, 2, 2).transpose(2, 0, 3, 1, 4)
    return x.reshape(c, h, w)


def flux_image_ids(height: int, width: int) -> np.ndarray:
    """The rotary ids of the tokens of a packed `(c, height, width)` latent, as the
    pipeline's `_prepare_latent_image_ids`: `[0, row, column]` over the
    `(height/2, width/2)` patch grid, row-major like `pack_latents`.

    **Arguments:**

    - `height`, `width`: the latent's size (not the image's), even.

    **Returns:**

    A float64 NumPy array `(height/2 * width/2, 3)`, for `FluxTransformer.rope`
    (with text ids `np.zeros((l, 3))`).

    **Raises:**

    `ValueError` for sizes that are not even ints.
    """
    h, w = _check_even("flux_image_ids", height, width)
    ids = np.zeros((h // 2, w // 2, 3), dtype=np.float64)
    ids[..., 1] = np.arange(h // 2)[:, None]
    ids[..., 2] = np.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)
