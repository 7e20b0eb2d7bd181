"""The ported transformers conditioned on one prompt at one resolution: networks
`f(x, t)` on flat latents, which `jf.LearnedField(..., "velocity")` turns into a
field that every jaxflow analysis runs on.

A flat point is the latent `(c, h, w)` in row-major order, the VAE's layout, for
SD3 and FLUX alike (FLUX's 2x2 token packing happens inside the network), so
`model.encode`/`model.decode` and the analyses agree on one vector.
"""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Real

from ..nn import FluxTransformer, SD3Transformer, pack_latents, unpack_latents


def _latent(x, shape: tuple[int, int, int], dtype, name: str):
    if x.shape != (shape[0] * shape[1] * shape[2],):
        raise ValueError(
            f"{name}: a latent point of shape {x.shape}, the field is for latents "
            f"(c, h, w) = {shape}, i.e. flat points of length "
            f"{shape[0] * shape[1] * shape[2]}; build the field with the height and "
            "width of your images (model.field(height=..., width=...))."
        )
    return x.reshape(shape).astype(dtype)


class SD3Velocity(eqx.Module):
    """The SD3 / SD3.5 velocity at one prompt: `f(x, t) = v(x, 1000 t | prompt)`,
    with classifier-free guidance `v_u + g (v_c - v_u)` when a negative prompt is
    given (two passes; `model.field` gives none where guidance cannot change the
    result: `g = 1`, or the prompt equals the negative prompt, as for the null
    prompt of paper 000).

    **Arguments:**

    - `transformer`: a `jf.nn.SD3Transformer`.
    - `context`, `pooled`: the prompt's embeddings (`model.encode_prompt`).
    - `shape`: the latent shape `(c, h, w)`.
    - `negative_context`, `negative_pooled`, `guidance_scale`: the guidance.
    """

    transformer: SD3Transformer
    context: Float[Array, "l d"]
    pooled: Float[Array, " p"]
    shape: tuple[int, int, int] = eqx.field(static=True)
    negative_context: Float[Array, "l2 d"] | None = None
    negative_pooled: Float[Array, " p"] | None = None
    guidance_scale: Float[Array, ""] | None = None

    def __check_init__(self):
        guided = (self.negative_context, self.negative_pooled, self.guidance_scale)
        if any(g is None for g in guided) and any(g is not None for g in guided):
            raise ValueError(
                "classifier-free guidance needs negative_context, negative_pooled and "
                "guidance_scale together."
            )

    def __call__(self, x: Float[Array, " n"], t: Real[ArrayLike, ""]) -> Float[Array, " n"]:
        dtype = self.transformer.dtype
        latent = _latent(x, self.shape, dtype, "SD3Velocity")
        # the pipeline's timestep: 1000 sigma, in float32
        timestep = jnp.asarray(t).astype(jnp.float32) * jnp.float32(1000)
        v = self.transformer(
            latent, timestep, self.context.astype(dtype), self.pooled.astype(dtype)
        )
        if self.guidance_scale is not None:
            v_u = self.transformer(
                latent,
                timestep,
                self.negative_context.astype(dtype),
                self.negative_pooled.astype(dtype),
            )
            v = v_u + self.guidance_scale.astype(v.dtype) * (v - v_u)
        return v.reshape(-1).astype(x.dtype)


class FluxVelocity(eqx.Module):
    """The FLUX velocity at one prompt: latents packed 2x2 into tokens, the
    transformer called with the pipeline's `timestep = sigma` and the distilled
    guidance value (FLUX-dev; `None` for a model without guidance embeddings),
    unpacked again.

    **Arguments:**

    - `transformer`: a `jf.nn.FluxTransformer`.
    - `context`, `pooled`: the prompt's embeddings (`model.encode_prompt`).
    - `rope`: the rotary table for the text and image tokens
      (`transformer.rope(img_ids, txt_ids)`).
    - `shape`: the latent shape `(c, h, w)`.
    - `guidance`: the guidance value, an input of a guidance-distilled model.
    """

    transformer: FluxTransformer
    context: Float[Array, "l d"]
    pooled: Float[Array, " p"]
    rope: tuple[Array, Array]
    shape: tuple[int, int, int] = eqx.field(static=True)
    guidance: Float[Array, ""] | None = None

    def __call__(self, x: Float[Array, " n"], t: Real[ArrayLike, ""]) -> Float[Array, " n"]:
        dtype = self.transformer.dtype
        latent = _latent(x, self.shape, dtype, "FluxVelocity")
        # the pipeline passes (1000 sigma) / 1000 in float32; the model multiplies back
        timestep = jnp.asarray(t).astype(jnp.float32) * jnp.float32(1000) / jnp.float32(1000)
        v = self.transformer(
            pack_latents(latent),
            timestep,
            self.guidance,
            self.context.astype(dtype),
            self.pooled.astype(dtype),
            self.rope,
        )
        v = unpack_latents(v, self.shape[1], self.shape[2])
        return v.reshape(-1).astype(x.dtype)
