"""Shared pieces of the diffusion transformers (SD3 MMDiT, FLUX): layers that
read diffusers' weights, the norms and embeddings both use, attention that
forward-mode autodiff goes through, and stacking blocks for `lax.scan`.

The ports are unbatched, as equinox modules are: one latent in, one velocity
out; batch with `jax.vmap`. Weights are read from a diffusers state dict of
NumPy arrays through `Weights`, which checks that every checkpoint entry is
used exactly once.
"""

import math
from collections.abc import Callable, Mapping, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float


class Weights:
    """A diffusers state dict (name -> NumPy array) read entry by entry.

    `take(name)` returns one entry cast to `dtype` and marks it used; taking an
    entry twice, or one that does not exist, raises; `finish()` raises when any
    entry was never taken. Together they guarantee that every weight of the
    checkpoint fills exactly one parameter of the port.
    """

    def __init__(self, state_dict: Mapping[str, np.ndarray], dtype, what: str):
        self._entries = dict(state_dict)
        self._used: set[str] = set()
        self._missing: list[str] = []
        self.dtype = jnp.dtype(dtype)
        self.what = what

    def has(self, name: str) -> bool:
        return name in self._entries

    def take(self, name: str, shape: tuple[int, ...] | None = None) -> Array:
        if name in self._used:
            raise ValueError(f"{self.what}: the weight {name!r} was read twice.")
        if name not in self._entries:
            self._missing.append(name)
            # a placeholder so that every missing key is collected before raising
            return jnp.zeros(shape if shape is not None else (), self.dtype)
        value = np.asarray(self._entries[name])
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise ValueError(
                f"{self.what}: the weight {name!r} has shape {tuple(value.shape)}, the "
                f"configuration implies {tuple(shape)}; the config.json does not match "
                "the weights."
            )
        self._used.add(name)
        # cast by NumPy (ml_dtypes rounds to bfloat16 to nearest even, as XLA does)
        # and keep on the host until `to_device`: no op compiled per weight shape,
        # and no second copy of the model on an accelerator while blocks are stacked
        with jax.default_device(_host()):
            return jnp.asarray(value.astype(self.dtype))

    def finish(self) -> None:
        unused = sorted(set(self._entries) - self._used)
        if self._missing or unused:
            lines = []
            if self._missing:
                lines.append(f"missing from the checkpoint ({len(self._missing)}): {self._missing}")
            if unused:
                lines.append(
                    f"in the checkpoint but not used by the port ({len(unused)}): {unused}"
                )
            raise ValueError(
                f"{self.what}: the checkpoint's weights do not match the architecture "
                "its config describes; " + "; ".join(lines) + "."
            )


class Linear(eqx.Module):
    """`y = W x + b` with diffusers' `(out, in)` weight layout; applies to the last
    axis of `x`, so a sequence `(L, in)` maps to `(L, out)`."""

    weight: Float[Array, "out in"]
    bias: Float[Array, " out"] | None

    @classmethod
    def read(cls, weights: Weights, prefix: str, n_in: int, n_out: int, bias: bool = True):
        w = weights.take(f"{prefix}.weight", (n_out, n_in))
        b = weights.take(f"{prefix}.bias", (n_out,)) if bias else None
        return cls(w, b)

    def __call__(self, x: Float[Array, "... in"]) -> Float[Array, "... out"]:
        y = x @ self.weight.T.astype(x.dtype)
        return y if self.bias is None else y + self.bias.astype(x.dtype)


def layer_norm(x: Float[Array, "... d"], eps: float, weight=None, bias=None) -> Array:
    """Layer norm over the last axis with float32 statistics (as torch computes
    them for bfloat16 inputs), returned in `x`'s dtype."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


def rms_norm(x: Float[Array, "... d"], eps: float, weight=None) -> Array:
    """diffusers' `RMSNorm`: `x / sqrt(mean(x^2) + eps) * weight`, the mean square
    in float32."""
    var = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    y = (x.astype(jnp.float32) * jax.lax.rsqrt(var + eps)).astype(x.dtype)
    return y if weight is None else y * weight.astype(x.dtype)


def timestep_embedding(
    t,
    dim: int,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> Float[Array, " dim"]:
    """diffusers' `get_timestep_embedding` for one scalar time, in float32:
    `[sin(t f), cos(t f)]` (or `[cos, sin]` when flipped) with frequencies
    `f_i = max_period^(-i / (dim/2 - shift))`."""
    half = dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
    exponent = exponent / np.float32(half - downscale_freq_shift)
    # the exponent in float32 as torch forms it, its exp in float64 rounded once:
    # XLA's float32 exp differs from torch's by an ulp for 17 of 128 frequencies, and
    # at t ~ 1000 an ulp of f is ~1e-4 rad of phase (3x the transformers' error
    # against diffusers); the correctly rounded value differs for 2
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    arg = jnp.float32(scale) * (jnp.asarray(t, jnp.float32) * jnp.asarray(freqs))
    emb = jnp.concatenate([jnp.sin(arg), jnp.cos(arg)])
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[half:], emb[:half]])
    if dim % 2:
        emb = jnp.pad(emb, (0, 1))
    return emb


class MLPEmbedding(eqx.Module):
    """diffusers' `TimestepEmbedding` / `PixArtAlphaTextProjection`:
    `linear_2(act(linear_1(x)))`."""

    linear_1: Linear
    linear_2: Linear

    @classmethod
    def read(cls, weights: Weights, prefix: str, n_in: int, n_out: int):
        return cls(
            Linear.read(weights, f"{prefix}.linear_1", n_in, n_out),
            Linear.read(weights, f"{prefix}.linear_2", n_out, n_out),
        )

    def __call__(self, x: Float[Array, " d_in"]) -> Float[Array, " d_out"]:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


def gelu_tanh(x: Array) -> Array:
    """GELU with the tanh approximation (diffusers' `gelu-approximate`)."""
    return jax.nn.gelu(x, approximate=True)


class FeedForward(eqx.Module):
    """diffusers' `FeedForward(activation_fn="gelu-approximate")`: `dim -> 4 dim
    -> dim` with a tanh-GELU."""

    proj_in: Linear
    proj_out: Linear

    @classmethod
    def read(cls, weights: Weights, prefix: str, dim: int):
        return cls(
            Linear.read(weights, f"{prefix}.net.0.proj", dim, 4 * dim),
            Linear.read(weights, f"{prefix}.net.2", 4 * dim, dim),
        )

    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        return self.proj_out(gelu_tanh(self.proj_in(x)))


def attention(
    q: Float[Array, "l h d"], k: Float[Array, "m h d"], v: Float[Array, "m h d"]
) -> Float[Array, "l h d"]:
    """Softmax attention `softmax(q k^T / sqrt(d)) v`, per head.

    Through XLA's implementation: `jax.jvp` goes through it, where cuDNN's fused
    kernel (a `custom_vjp`) fails in forward mode. It materialises the
    `(heads, l, m)` score matrix, and the tangent's as well under a JVP.
    """
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")


def _host():
    return jax.devices("cpu")[0]


def stack(modules: Sequence[eqx.Module]) -> eqx.Module:
    """Blocks of one structure stacked into one module whose arrays have a
    leading layer axis, for `scan_blocks`. Stacked on the host by NumPy."""
    arrays = [eqx.filter(m, eqx.is_array) for m in modules]
    static = eqx.filter(modules[0], eqx.is_array, inverse=True)
    with jax.default_device(_host()):
        stacked = jax.tree.map(
            lambda *xs: jnp.asarray(np.stack([np.asarray(x) for x in xs])), *arrays
        )
    return eqx.combine(stacked, static)


def to_device(module: eqx.Module) -> eqx.Module:
    """A module read through `Weights` (on the host) moved to JAX's default
    device, once, so that a jitted call does not copy the weights each time."""
    arrays, static = eqx.partition(module, eqx.is_array)
    return eqx.combine(jax.device_put(arrays, jax.devices()[0]), static)


def scan_blocks(stacked: eqx.Module, carry, step: Callable):
    """`carry = step(block, carry)` for each block of `stacked` in order, as one
    `lax.scan`, so compile time does not grow with depth."""
    arrays, static = eqx.partition(stacked, eqx.is_array)

    def body(carry, block_arrays):
        return step(eqx.combine(block_arrays, static), carry), None

    return jax.lax.scan(body, carry, arrays)[0]


def stacked_depth(stacked: eqx.Module | None) -> int:
    """The number of blocks in a stacked module (0 for `None`)."""
    if stacked is None:
        return 0
    return jax.tree.leaves(eqx.filter(stacked, eqx.is_array))[0].shape[0]
