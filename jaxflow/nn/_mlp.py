"""A time-conditioned MLP for low-dimensional data."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, Real

from .._misc import check_key, check_network_input, check_positive_int
from ._embedding import check_time_embedding, sinusoidal_embedding


class MLP(eqx.Module):
    """`f(x, t)`: an MLP on `[x, embed(t)]` with SiLU activations, mapping a point
    `(n,)` and a time to `(n,)`: the network of a `jf.LearnedField`.

    **Arguments:**

    - `dim`: the data dimension `n`.
    - `width`, `depth`: hidden width and number of hidden layers.
    - `time_dim`: size of the sinusoidal time embedding (even).
    - `time_scale`: the embedding's frequency scale; pass `1000 / t_noise` for a
      path on `[0, T]` so the embedding sees the same range.
    - `key`: initialisation key.

    **Raises:** `ValueError` for `dim`, `width` or `depth` not a positive int,
    `time_dim` not a positive even int, `time_scale` not a finite number `> 0`, or a
    `key` that is not one PRNG key; at call time, for `x` not of shape `(dim,)` or `t`
    not a scalar.
    """

    layers: tuple[eqx.nn.Linear, ...]
    time_dim: int = eqx.field(static=True)
    time_scale: float = eqx.field(static=True)

    def __init__(
        self,
        dim: int | np.integer,
        width: int | np.integer = 128,
        depth: int | np.integer = 3,
        *,
        time_dim: int | np.integer = 32,
        time_scale: float = 1000.0,
        key: PRNGKeyArray,
    ):
        dim, width, depth = (
            check_positive_int(name, value)
            for name, value in (("dim", dim), ("width", width), ("depth", depth))
        )
        time_dim, time_scale = check_time_embedding(time_dim, time_scale)
        check_key("key", key)
        sizes = [dim + time_dim] + [width] * depth + [dim]
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = tuple(
            eqx.nn.Linear(a, b, key=k) for a, b, k in zip(sizes[:-1], sizes[1:], keys, strict=True)
        )
        self.time_dim = time_dim
        self.time_scale = time_scale

    def __call__(self, x: Float[Array, " n"], t: Real[ArrayLike, ""]) -> Float[Array, " n"]:
        x = check_network_input("MLP", x, t, self.layers[-1].out_features)
        emb = sinusoidal_embedding(t, self.time_dim, self.time_scale).astype(x.dtype)
        h = jnp.concatenate([x, emb])
        for layer in self.layers[:-1]:
            h = jax.nn.silu(layer(h))
        return self.layers[-1](h)
