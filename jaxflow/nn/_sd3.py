"""Stable Diffusion 3 / 3.5's MMDiT (Esser et al. 2024), ported from diffusers'
`SD3Transformer2DModel` so that a diffusers checkpoint runs, and differentiates,
in JAX with the same numbers."""

import warnings
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
    layer_norm,
    rms_norm,
    scan_blocks,
    stack,
    timestep_embedding,
    to_device,
)

# SD3Transformer2DModel.__init__'s defaults, for a config that leaves a key out
# (diffusers fills those in the same way)
_DEFAULTS = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=18,
    attention_head_dim=64,
    num_attention_heads=18,
    joint_attention_dim=4096,
    caption_projection_dim=1152,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=96,
    dual_attention_layers=(),
    qk_norm=None,
)
_EPS = 1e-6  # every LayerNorm and qk-RMSNorm of the model
_TIME_CHANNELS = 256  # CombinedTimestepTextProjEmbeddings' sinusoidal width


class _Attention(eqx.Module):
    """diffusers' `Attention` with `JointAttnProcessor2_0`: self-attention over the
    image tokens, joint with the context tokens when the `add_*` projections are
    present (the MMDiT's two streams with their own weights, one softmax), and
    SD3.5's RMS qk-norm per head when its weights are present."""

    to_q: Linear
    to_k: Linear
    to_v: Linear
    to_out: Linear
    norm_q: Float[Array, " d_head"] | None
    norm_k: Float[Array, " d_head"] | None
    add_q_proj: Linear | None
    add_k_proj: Linear | None
    add_v_proj: Linear | None
    to_add_out: Linear | None
    norm_added_q: Float[Array, " d_head"] | None
    norm_added_k: Float[Array, " d_head"] | None
    heads: int = eqx.field(static=True)

    @classmethod
    def read(
        cls,
        weights: Weights,
        prefix: str,
        dim: int,
        heads: int,
        qk_norm: bool,
        joint: bool,
        context_out: bool,
    ):
        head_dim = dim // heads

        def lin(name):
            return Linear.read(weights, f"{prefix}.{name}", dim, dim)

        def norm(name):
            return weights.take(f"{prefix}.{name}.weight", (head_dim,)) if qk_norm else None

        to_q, to_k, to_v, to_out = lin("to_q"), lin("to_k"), lin("to_v"), lin("to_out.0")
        norm_q, norm_k = norm("norm_q"), norm("norm_k")
        if not joint:
            return cls(to_q, to_k, to_v, to_out, norm_q, norm_k, *(None,) * 6, heads=heads)
        add_k, add_v = lin("add_k_proj"), lin("add_v_proj")
        add_q, norm_added_q = lin("add_q_proj"), norm("norm_added_q")
        norm_added_k = norm("norm_added_k")
        to_add_out = lin("to_add_out") if context_out else None
        if not context_out:
            # The last block's context queries only produce context outputs, which
            # diffusers computes and discards: the weights are read (the checkpoint
            # holds them) but take no part, and only image queries are computed.
            add_q, norm_added_q = None, None
        return cls(
            to_q,
            to_k,
            to_v,
            to_out,
            norm_q,
            norm_k,
            add_q,
            add_k,
            add_v,
            to_add_out,
            norm_added_q,
            norm_added_k,
            heads=heads,
        )

    def _heads(self, proj: Linear, norm, x):
        y = proj(x).reshape(x.shape[0], self.heads, -1)
        return y if norm is None else rms_norm(y, _EPS, norm)

    def __call__(self, x, context=None):
        q = self._heads(self.to_q, self.norm_q, x)
        k = self._heads(self.to_k, self.norm_k, x)
        v = self._heads(self.to_v, None, x)
        if context is not None:
            # image tokens first, then context tokens, as diffusers concatenates them
            k = jnp.concatenate([k, self._heads(self.add_k_proj, self.norm_added_k, context)])
            v = jnp.concatenate([v, self._heads(self.add_v_proj, None, context)])
            if self.add_q_proj is not None:
                q = jnp.concatenate([q, self._heads(self.add_q_proj, self.norm_added_q, context)])
        out = attention(q, k, v).reshape(q.shape[0], -1)
        n = x.shape[0]
        x_out = self.to_out(out[:n])
        if context is None or self.to_add_out is None:
            return x_out, None
        return x_out, self.to_add_out(out[n:])


class _JointBlock(eqx.Module):
    """diffusers' `JointTransformerBlock`: an MMDiT block (Esser et al. 2024), with
    SD3.5 Medium's extra image self-attention (MMDiT-X, `SD35AdaLayerNormZeroX`)
    when `dual`, and without the context's outputs when `context_pre_only` (the
    last block, whose context norm is an `AdaLayerNormContinuous`)."""

    norm1: Linear
    norm1_context: Linear
    attn: _Attention
    attn2: _Attention | None
    ff: FeedForward
    ff_context: FeedForward | None
    dual: bool = eqx.field(static=True)
    context_pre_only: bool = eqx.field(static=True)

    @classmethod
    def read(cls, weights, prefix, dim, heads, qk_norm, dual, context_pre_only):
        return cls(
            norm1=Linear.read(weights, f"{prefix}.norm1.linear", dim, (9 if dual else 6) * dim),
            norm1_context=Linear.read(
                weights, f"{prefix}.norm1_context.linear", dim, (2 if context_pre_only else 6) * dim
            ),
            attn=_Attention.read(
                weights, f"{prefix}.attn", dim, heads, qk_norm, True, not context_pre_only
            ),
            attn2=(
                _Attention.read(weights, f"{prefix}.attn2", dim, heads, qk_norm, False, False)
                if dual
                else None
            ),
            ff=FeedForward.read(weights, f"{prefix}.ff", dim),
            ff_context=(
                None if context_pre_only else FeedForward.read(weights, f"{prefix}.ff_context", dim)
            ),
            dual=dual,
            context_pre_only=context_pre_only,
        )

    def __call__(self, x, context, temb):
        silu_temb = jax.nn.silu(temb)
        mod = jnp.split(self.norm1(silu_temb), 9 if self.dual else 6)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:6]
        normed = layer_norm(x, _EPS)
        x_in = normed * (1 + scale_msa) + shift_msa

        c_mod = jnp.split(self.norm1_context(silu_temb), 2 if self.context_pre_only else 6)
        if self.context_pre_only:
            # AdaLayerNormContinuous: (scale, shift), the reverse of AdaLayerNormZero's order
            c_scale, c_shift = c_mod
            c_in = layer_norm(context, _EPS) * (1 + c_scale) + c_shift
        else:
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = c_mod
            c_in = layer_norm(context, _EPS) * (1 + c_scale_msa) + c_shift_msa

        x_attn, c_attn = self.attn(x_in, c_in)
        x = x + gate_msa * x_attn
        if self.dual:
            shift_msa2, scale_msa2, gate_msa2 = mod[6:]
            # the second attention reads the same normalised x, modulated on its own
            x_attn2, _ = self.attn2(normed * (1 + scale_msa2) + shift_msa2)
            x = x + gate_msa2 * x_attn2
        x_ff = self.ff(layer_norm(x, _EPS) * (1 + scale_mlp) + shift_mlp)
        x = x + gate_mlp * x_ff
        if self.context_pre_only:
            return x, None

        context = context + c_gate_msa * c_attn
        c_ff = self.ff_context(layer_norm(context, _EPS) * (1 + c_scale_mlp) + c_shift_mlp)
        return x, context + c_gate_mlp * c_ff


def _sincos_pos_embed(dim: int, h: int, w: int, base_size: int) -> np.ndarray:
    """diffusers' `get_2d_sincos_pos_embed(dim, (h, w), base_size=base_size)`, for a
    PatchEmbed without `pos_embed_max_size` (not a checkpoint entry then)."""
    grid_h = np.arange(h, dtype=np.float32) / np.float32(h / base_size)
    grid_w = np.arange(w, dtype=np.float32) / np.float32(w / base_size)
    # diffusers' meshgrid puts the w coordinate in the first half of the channels
    coord_w, coord_h = np.meshgrid(grid_w, grid_h, indexing="xy")
    omega = 1.0 / 10000.0 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))

    def one_d(pos):
        out = np.outer(pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(coord_w), one_d(coord_h)], axis=1).astype(np.float32)


class SD3Transformer(eqx.Module):
    """The denoiser of Stable Diffusion 3 and 3.5: the MMDiT of Esser et al. 2024,
    "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis", as
    diffusers' `SD3Transformer2DModel` implements it, for one latent.

    Image patches and text tokens run in two streams with their own weights that
    meet in one joint attention per block, modulated (adaLN-Zero) by the timestep
    and the pooled text embedding. Stable Diffusion 3.5 (Stability AI, 2024) adds
    RMS-normalised queries and keys (`qk_norm="rms_norm"`) and, in SD3.5 Medium,
    MMDiT-X blocks: a second, image-only self-attention in the first layers
    (`dual_attention_layers`).

    The configuration is kept as read-only fields (`in_channels`, `out_channels`,
    `patch_size`, `pos_embed_max_size`, `joint_attention_dim`,
    `pooled_projection_dim`, ...). Position embeddings are cropped from the
    checkpoint's `pos_embed_max_size`^2 table around its centre, as diffusers'
    `PatchEmbed.cropped_pos_embed` does, so any latent up to
    `patch_size * pos_embed_max_size` on each side, square or not, is accepted.

    Build it from a diffusers checkpoint with
    [`SD3Transformer.from_diffusers`][jaxflow.nn.SD3Transformer.from_diffusers]. It
    is unbatched, as equinox modules are: `jax.vmap` it for a batch. Runs of
    blocks of one structure are stacked and run as one `lax.scan` each, so compile
    time does not grow with depth.

    It computes in the weights' dtype (float32 or bfloat16), with layer- and
    RMS-norm statistics and the sinusoidal time features in float32, as diffusers
    does. Attention goes through XLA's implementation, so `jax.jvp` and
    `jax.jacfwd` work through it.
    """

    patch_embed: Linear
    pos_embed: Float[Array, "m m d"] | None
    time_embedder: MLPEmbedding
    text_embedder: MLPEmbedding
    context_embedder: Linear
    runs: tuple[_JointBlock, ...]
    last_block: _JointBlock
    norm_out: Linear
    proj_out: Linear
    sample_size: int = eqx.field(static=True)
    patch_size: int = eqx.field(static=True)
    in_channels: int = eqx.field(static=True)
    out_channels: int = eqx.field(static=True)
    num_layers: int = eqx.field(static=True)
    attention_head_dim: int = eqx.field(static=True)
    num_attention_heads: int = eqx.field(static=True)
    joint_attention_dim: int = eqx.field(static=True)
    caption_projection_dim: int = eqx.field(static=True)
    pooled_projection_dim: int = eqx.field(static=True)
    pos_embed_max_size: int | None = eqx.field(static=True)
    dual_attention_layers: tuple[int, ...] = eqx.field(static=True)
    qk_norm: str | None = eqx.field(static=True)

    @classmethod
    def from_diffusers(
        cls,
        config: Mapping,
        state_dict: Mapping[str, np.ndarray],
        dtype=jnp.float32,
    ) -> "SD3Transformer":
        """The port of a diffusers `SD3Transformer2DModel` checkpoint.

        **Arguments:**

        - `config`: the model's configuration, `model.config` or the contents of its
          `config.json`. Keys starting with `_` (`_class_name`, `_diffusers_version`)
          are ignored; a missing key takes diffusers' default.
        - `state_dict`: name -> NumPy array, as `model.state_dict()` names them
          (including the `pos_embed.pos_embed` table, a persistent buffer).
        - `dtype`: `jnp.float32` or `jnp.bfloat16`; the weights are cast to it and
          the network computes in it.

        **Returns:**

        The `SD3Transformer`.

        **Raises:**

        `ValueError` when the checkpoint's weights do not match the architecture the
        config describes (each missing and each unused entry is listed: every entry
        fills exactly one parameter), when the config is one this port does not
        implement, or for another `dtype`.
        """
        dtype = transformer_dtype("SD3Transformer.from_diffusers", dtype)
        config = dict(config)
        unknown = sorted(k for k in config if not k.startswith("_") and k not in _DEFAULTS)
        if unknown:
            # diffusers ignores such keys as well (with a warning)
            warnings.warn(
                f"SD3Transformer.from_diffusers: ignoring unknown config keys {unknown}.",
                stacklevel=2,
            )
        cfg = {k: config.get(k, v) for k, v in _DEFAULTS.items()}
        if cfg["out_channels"] is None:
            cfg["out_channels"] = cfg["in_channels"]
        dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        num_layers = int(cfg["num_layers"])
        if num_layers < 1:
            raise ValueError(f"SD3Transformer: num_layers must be at least 1, got {num_layers}.")
        if cfg["caption_projection_dim"] != dim:
            raise ValueError(
                f"SD3Transformer: caption_projection_dim ({cfg['caption_projection_dim']}) must "
                f"equal num_attention_heads * attention_head_dim ({dim}): the projected "
                "context enters the blocks at their width."
            )
        if cfg["qk_norm"] not in (None, "rms_norm"):
            raise ValueError(
                f"SD3Transformer: qk_norm must be None (SD3) or 'rms_norm' (SD3.5), got "
                f"{cfg['qk_norm']!r}."
            )
        max_size = cfg["pos_embed_max_size"]
        p, c_in, c_out = cfg["patch_size"], cfg["in_channels"], cfg["out_channels"]
        if not max_size and dim % 4:
            raise ValueError(
                f"SD3Transformer: the sin-cos position embedding needs a width divisible by 4, "
                f"got {dim}."
            )
        # as diffusers, indices past the last layer are ignored
        dual_layers = tuple(i for i in range(num_layers) if i in set(cfg["dual_attention_layers"]))
        qk_norm = cfg["qk_norm"] == "rms_norm"

        weights = Weights(state_dict, dtype, what="SD3Transformer2DModel")
        conv = weights.take("pos_embed.proj.weight", (dim, c_in, p, p))
        # a stride-p conv with a p x p kernel is a linear map of each flattened patch
        patch_embed = Linear(
            conv.reshape(dim, c_in * p * p), weights.take("pos_embed.proj.bias", (dim,))
        )
        pos_embed = None
        if max_size:
            table = weights.take("pos_embed.pos_embed", (1, max_size * max_size, dim))
            pos_embed = table.reshape(max_size, max_size, dim)
        time_embedder = MLPEmbedding.read(
            weights, "time_text_embed.timestep_embedder", _TIME_CHANNELS, dim
        )
        text_embedder = MLPEmbedding.read(
            weights, "time_text_embed.text_embedder", cfg["pooled_projection_dim"], dim
        )
        context_embedder = Linear.read(weights, "context_embedder", cfg["joint_attention_dim"], dim)
        blocks = [
            _JointBlock.read(
                weights,
                f"transformer_blocks.{i}",
                dim,
                cfg["num_attention_heads"],
                qk_norm,
                i in dual_layers,
                i == num_layers - 1,
            )
            for i in range(num_layers)
        ]
        norm_out = Linear.read(weights, "norm_out.linear", dim, 2 * dim)
        proj_out = Linear.read(weights, "proj_out", dim, p * p * c_out)
        weights.finish()

        # maximal runs of consecutive blocks of one structure, one scan each
        runs, start = [], 0
        for i in range(1, num_layers):
            if i == num_layers - 1 or blocks[i].dual != blocks[start].dual:
                runs.append(stack(blocks[start:i]))
                start = i
        model = cls(
            patch_embed=patch_embed,
            pos_embed=pos_embed,
            time_embedder=time_embedder,
            text_embedder=text_embedder,
            context_embedder=context_embedder,
            runs=tuple(runs),
            last_block=blocks[-1],
            norm_out=norm_out,
            proj_out=proj_out,
            sample_size=int(cfg["sample_size"]),
            patch_size=int(p),
            in_channels=int(c_in),
            out_channels=int(c_out),
            num_layers=num_layers,
            attention_head_dim=int(cfg["attention_head_dim"]),
            num_attention_heads=int(cfg["num_attention_heads"]),
            joint_attention_dim=int(cfg["joint_attention_dim"]),
            caption_projection_dim=int(cfg["caption_projection_dim"]),
            pooled_projection_dim=int(cfg["pooled_projection_dim"]),
            pos_embed_max_size=int(max_size) if max_size else None,
            dual_attention_layers=dual_layers,
            qk_norm=cfg["qk_norm"],
        )
        return to_device(model)

    @property
    def dtype(self) -> jnp.dtype:
        """The dtype of the weights, which the network computes in."""
        return self.proj_out.weight.dtype

    def _check_inputs(self, x, context, pooled) -> None:
        c, h, w = x.shape
        p, m = self.patch_size, self.pos_embed_max_size
        if c != self.in_channels:
            raise ValueError(
                f"SD3Transformer: the latent has {c} channels, the model takes "
                f"{self.in_channels}; pass a (C, H, W) latent with C = {self.in_channels}."
            )
        if h % p or w % p:
            raise ValueError(
                f"SD3Transformer: the latent's height and width ({h}, {w}) must be multiples "
                f"of the patch size {p}; crop or pad the latent (or the image by "
                f"{p} x the VAE's downsampling)."
            )
        if m is not None and (h // p > m or w // p > m):
            raise ValueError(
                f"SD3Transformer: a {h}x{w} latent is a {h // p}x{w // p} patch grid, larger "
                f"than the position embedding's {m}x{m} (pos_embed_max_size); use a latent of "
                f"at most {m * p}x{m * p}."
            )
        if context.shape[-1] != self.joint_attention_dim:
            raise ValueError(
                f"SD3Transformer: the context has width {context.shape[-1]}, the model takes "
                f"joint_attention_dim = {self.joint_attention_dim}; pass the text encoders' "
                "joint embedding of shape (L, joint_attention_dim)."
            )
        if pooled.shape != (self.pooled_projection_dim,):
            raise ValueError(
                f"SD3Transformer: the pooled embedding has shape {pooled.shape}, the model takes "
                f"({self.pooled_projection_dim},) (pooled_projection_dim)."
            )

    def _positions(self, h: int, w: int) -> Array:
        if self.pos_embed is None:
            base = self.sample_size // self.patch_size
            dim = self.patch_embed.weight.shape[0]
            return jnp.asarray(_sincos_pos_embed(dim, h, w, base))
        # PatchEmbed.cropped_pos_embed: the centre h x w of the max_size^2 table
        m = self.pos_embed.shape[0]
        top, left = (m - h) // 2, (m - w) // 2
        return self.pos_embed[top : top + h, left : left + w].reshape(h * w, -1)

    def __call__(
        self,
        x: Float[Array, "c h w"],
        timestep: Real[ArrayLike, ""],
        context: Float[Array, "l d_joint"],
        pooled: Float[Array, " p"],
    ) -> Float[Array, "c_out h w"]:
        """The velocity prediction for one latent, diffusers' `.sample`.

        **Arguments:**

        - `x`: the noisy latent `(C, H, W)`, `H` and `W` multiples of `patch_size`
          and at most `patch_size * pos_embed_max_size`.
        - `timestep`: the time in diffusers' convention, `1000 * sigma` (what the
          SD3 pipeline passes).
        - `context`: the joint text embedding `(L, joint_attention_dim)` (CLIP-L/G and
          T5 tokens).
        - `pooled`: the pooled text embedding `(pooled_projection_dim,)`.

        **Returns:**

        The prediction `(out_channels, H, W)`, in `x`'s dtype.
        """
        self._check_inputs(x, context, pooled)
        dtype = self.dtype
        out_dtype = x.dtype
        p = self.patch_size
        c, h, w = x.shape
        gh, gw = h // p, w // p

        patches = x.astype(dtype).reshape(c, gh, p, gw, p).transpose(1, 3, 0, 2, 4)
        tokens = self.patch_embed(patches.reshape(gh * gw, c * p * p))
        # diffusers adds the table in its own dtype (float32 when computed on the fly)
        positions = self._positions(gh, gw)
        tokens = (tokens.astype(positions.dtype) + positions).astype(dtype)

        # the sinusoidal features in float32, cast to the compute dtype before the MLP,
        # as CombinedTimestepTextProjEmbeddings casts them to the pooled embedding's
        t_feat = timestep_embedding(timestep, _TIME_CHANNELS)
        temb = self.time_embedder(t_feat.astype(dtype)) + self.text_embedder(pooled.astype(dtype))
        ctx = self.context_embedder(context.astype(dtype))

        def step(block, carry):
            tok, ctx = carry
            return block(tok, ctx, temb)

        carry = (tokens, ctx)
        for run in self.runs:
            carry = scan_blocks(run, carry, step)
        tokens, _ = self.last_block(*carry, temb)

        scale, shift = jnp.split(self.norm_out(jax.nn.silu(temb)), 2)
        tokens = layer_norm(tokens, _EPS) * (1 + scale) + shift
        out = self.proj_out(tokens).reshape(gh, gw, p, p, self.out_channels)
        out = out.transpose(4, 0, 2, 1, 3).reshape(self.out_channels, h, w)
        return out.astype(out_dtype)
