"""The sinusoidal time embedding that every time-conditioned network here uses."""

import math

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Real


def sinusoidal_embedding(
    t: Real[ArrayLike, ""], dim: int, scale: float = 1000.0
) -> Float[Array, " dim"]:
    """`[sin(scale t w_k), cos(scale t w_k)]` with geometric frequencies `w_k` from 1
    to 1e-4 (Vaswani et al. 2017; Ho et al. 2020).

    **Arguments:**

    - `t`: the time, a scalar.
    - `dim`: the embedding's size, even.
    - `scale`: multiplies `t`; `1000` suits a path on `[0, 1]`.

    **Returns:** the embedding, shape `(dim,)`.
    """
    if dim % 2:
        raise ValueError(f"the embedding's dim must be even, got {dim}.")
    half = dim // 2
    freqs = jnp.exp(-math.log(10_000.0) * jnp.arange(half) / max(half - 1, 1))
    arg = scale * jnp.asarray(t, dtype=freqs.dtype) * freqs
    return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)])
