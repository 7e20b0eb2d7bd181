"""The sinusoidal time embedding that every time-conditioned network here uses."""

import math

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Real

from .._misc import check_number, check_positive_int


def check_time_embedding(time_dim, time_scale) -> tuple[int, float]:
    """A network's time embedding: `time_dim` a positive even int, `time_scale` a
    finite number `> 0`."""
    time_dim = check_positive_int("time_dim", time_dim)
    if time_dim % 2:
        raise ValueError(f"time_dim must be even, got {time_dim}.")
    return time_dim, check_number("time_scale", time_scale, 0, open_low=True, static=True)


def sinusoidal_embedding(
    t: Real[ArrayLike, ""], dim: int | np.integer, scale: float = 1000.0
) -> Float[Array, " dim"]:
    """`[sin(scale t w_k), cos(scale t w_k)]` with geometric frequencies `w_k` from 1
    to 1e-4 (Vaswani et al. 2017; Ho et al. 2020).

    **Arguments:**

    - `t`: the time, a scalar.
    - `dim`: the embedding's size, even.
    - `scale`: multiplies `t`; `1000` suits a path on `[0, 1]`.

    **Returns:** the embedding, shape `(dim,)`.

    **Raises:** `ValueError` for `dim` not a positive even int or `t` not a scalar.
    """
    if check_positive_int("dim", dim) % 2:
        raise ValueError(f"the embedding's dim must be even, got {dim}.")
    if jnp.ndim(t) != 0:
        raise ValueError(f"t must be a scalar time, got shape {jnp.shape(t)}.")
    half = dim // 2
    freqs = jnp.exp(-math.log(10_000.0) * jnp.arange(half) / max(half - 1, 1))
    arg = scale * jnp.asarray(t, dtype=freqs.dtype) * freqs
    return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)])
