"""Time-conditioned Equinox networks: an MLP for low-dimensional data and a UNet
for images. Both map a flat point `x` of shape `(n,)` and a time `t` to `(n,)`,
so that a `LearnedField` built on either is analysed like any closed-form field
(Jacobians, spectra and solvers all work on flat vectors).
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray


def sinusoidal_embedding(t: Float[ArrayLike, ""], dim: int, scale: float = 1000.0) -> Array:
    """`[sin(scale t w_k), cos(scale t w_k)]` with geometric frequencies `w_k` from 1
    to 1e-4 (Vaswani et al. 2017; Ho et al. 2020), `dim` even."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10_000.0) * jnp.arange(half) / max(half - 1, 1))
    arg = scale * jnp.asarray(t, dtype=freqs.dtype) * freqs
    return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)])


def _check_positive_int(name, value):
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")


class MLP(eqx.Module):
    """`f(x, t)`: an MLP on `[x, embed(t)]` with SiLU activations.

    **Arguments:**

    - `dim`: the data dimension `n`.
    - `width`, `depth`: hidden width and number of hidden layers.
    - `time_dim`: size of the sinusoidal time embedding (even).
    - `time_scale`: the embedding's frequency scale; pass `1000 / t_noise` for a
      path on `[0, T]` so the embedding sees the same range.
    - `key`: initialisation key.
    """

    layers: tuple[eqx.nn.Linear, ...]
    time_dim: int = eqx.field(static=True)
    time_scale: float = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        width: int = 128,
        depth: int = 3,
        *,
        time_dim: int = 32,
        time_scale: float = 1000.0,
        key: PRNGKeyArray,
    ):
        for name, value in (("dim", dim), ("width", width), ("depth", depth)):
            _check_positive_int(name, value)
        if time_dim % 2:
            raise ValueError(f"time_dim must be even, got {time_dim}.")
        sizes = [dim + time_dim] + [width] * depth + [dim]
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = tuple(
            eqx.nn.Linear(a, b, key=k) for a, b, k in zip(sizes[:-1], sizes[1:], keys, strict=True)
        )
        self.time_dim = time_dim
        self.time_scale = time_scale

    def __call__(self, x: Float[Array, " n"], t: Float[ArrayLike, ""]) -> Float[Array, " n"]:
        emb = sinusoidal_embedding(t, self.time_dim, self.time_scale).astype(x.dtype)
        h = jnp.concatenate([x, emb])
        for layer in self.layers[:-1]:
            h = jax.nn.silu(layer(h))
        return self.layers[-1](h)


# The UNet keeps its activations channel-last, (H, W, C): XLA:CPU runs channel-first
# convolutions inside a loop body (a scan, a diffrax solve, a Lyapunov iteration)
# about 6x slower than outside one, and channel-last ones at full speed
# (jax-ml/jax#12868; measured here: 18 ms vs 2.8 ms for a batch of 256 8x8x32).


class _Conv(eqx.Module):
    """A 2-D convolution of a channel-last image `(H, W, C_in) -> (H', W', C_out)`;
    weight `(kh, kw, C_in, C_out)` (HWIO)."""

    weight: Array
    bias: Array
    stride: int = eqx.field(static=True)
    padding: int = eqx.field(static=True)

    def __init__(self, c_in, c_out, kernel, *, stride=1, padding=0):
        # filled by _materialise; the shapes are what matter here
        self.weight = jnp.zeros((kernel, kernel, c_in, c_out))
        self.bias = jnp.zeros((c_out,))
        self.stride = stride
        self.padding = padding

    def __call__(self, x):
        p = self.padding
        y = jax.lax.conv_general_dilated(
            x[None],
            self.weight,
            (self.stride, self.stride),
            ((p, p), (p, p)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )[0]
        return y + self.bias


class _GroupNorm(eqx.Module):
    """Group normalisation (Wu & He 2018) of a channel-last image over space and
    the channels of each group, then a per-channel affine map."""

    weight: Array
    bias: Array
    groups: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)

    def __init__(self, groups, channels, eps=1e-5):
        self.weight = jnp.ones((channels,))
        self.bias = jnp.zeros((channels,))
        self.groups = groups
        self.eps = eps

    def __call__(self, x):
        h, w, c = x.shape
        g = x.reshape(h, w, self.groups, c // self.groups)
        mean = jnp.mean(g, axis=(0, 1, 3), keepdims=True)
        var = jnp.var(g, axis=(0, 1, 3), keepdims=True)
        g = (g - mean) * jax.lax.rsqrt(var + self.eps)
        return g.reshape(h, w, c) * self.weight + self.bias


class _ResBlock(eqx.Module):
    norm1: _GroupNorm
    conv1: _Conv
    time: eqx.nn.Linear
    norm2: _GroupNorm
    conv2: _Conv
    skip: _Conv | None

    def __init__(self, c_in, c_out, t_dim, groups, key):
        self.norm1 = _GroupNorm(_groups(groups, c_in), c_in)
        self.conv1 = _Conv(c_in, c_out, 3, padding=1)
        self.time = eqx.nn.Linear(t_dim, c_out, key=key)
        self.norm2 = _GroupNorm(_groups(groups, c_out), c_out)
        self.conv2 = _Conv(c_out, c_out, 3, padding=1)
        self.skip = None if c_in == c_out else _Conv(c_in, c_out, 1)

    def __call__(self, x, emb):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = h + self.time(emb)
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return h + (x if self.skip is None else self.skip(x))


class _Attention(eqx.Module):
    norm: _GroupNorm
    attn: eqx.nn.MultiheadAttention

    def __init__(self, c, heads, groups, key):
        self.norm = _GroupNorm(_groups(groups, c), c)
        self.attn = eqx.nn.MultiheadAttention(heads, c, key=key)

    def __call__(self, x):
        h, w, c = x.shape
        seq = self.norm(x).reshape(h * w, c)
        return x + self.attn(seq, seq, seq).reshape(h, w, c)


def _groups(groups, channels):
    """The largest group count up to `groups` that divides `channels`."""
    return max(g for g in range(1, min(groups, channels) + 1) if channels % g == 0)


def _unet_layers(c_img, widths, blocks, heads, groups, time_dim, t_dim, key):
    keys = iter(jax.random.split(key, 8 + 4 * len(widths) * (blocks + 1)))
    layers = dict(
        time_mlp=(
            eqx.nn.Linear(time_dim, t_dim, key=next(keys)),
            eqx.nn.Linear(t_dim, t_dim, key=next(keys)),
        ),
        conv_in=_Conv(c_img, widths[0], 3, padding=1),
    )
    down, downsample, skips = [], [], [widths[0]]
    c = widths[0]
    for i, w in enumerate(widths):
        level = []
        for _ in range(blocks):
            level.append(_ResBlock(c, w, t_dim, groups, next(keys)))
            c = w
            skips.append(c)
        down.append(tuple(level))
        if i < len(widths) - 1:
            downsample.append(_Conv(c, c, 3, stride=2, padding=1))
            skips.append(c)
    layers["down"], layers["downsample"] = tuple(down), tuple(downsample)
    layers["mid"] = (
        _ResBlock(c, c, t_dim, groups, next(keys)),
        _Attention(c, heads, groups, next(keys)),
        _ResBlock(c, c, t_dim, groups, next(keys)),
    )
    up, upsample = [], []
    for i, w in reversed(list(enumerate(widths))):
        level = []
        for _ in range(blocks + 1):
            level.append(_ResBlock(c + skips.pop(), w, t_dim, groups, next(keys)))
            c = w
        up.append(tuple(level))
        if i > 0:
            upsample.append(_Conv(c, c, 3, padding=1))
    layers["up"], layers["upsample"] = tuple(up), tuple(upsample)
    layers["norm_out"] = _GroupNorm(_groups(groups, c), c)
    layers["conv_out"] = _Conv(c, c_img, 3, padding=1)
    return layers


def _is_layer(m):
    return isinstance(m, (eqx.nn.Linear, _Conv, _GroupNorm))


def _fan_in(m):
    # Linear: (out, in); _Conv: (kh, kw, in, out)
    return m.weight.shape[1] if isinstance(m, eqx.nn.Linear) else math.prod(m.weight.shape[:-1])


def _materialise(abstract, key):
    """Fill abstract layers as Equinox initialises its own, weights and biases
    uniform on `+-1/sqrt(fan_in)` and GroupNorm's affine map the identity, but
    from one uniform draw for the whole network."""
    layers = [m for m in jax.tree.leaves(abstract, is_leaf=_is_layer) if _is_layer(m)]
    sizes = [
        m.weight.size + (0 if m.bias is None else m.bias.size)
        for m in layers
        if not isinstance(m, _GroupNorm)
    ]
    dtype = next(m.weight.dtype for m in layers)
    u = np.asarray(jax.random.uniform(key, (sum(sizes),), dtype, -1.0, 1.0))
    offset = 0

    def fill(m):
        nonlocal offset
        if not _is_layer(m):
            return m
        if isinstance(m, _GroupNorm):
            return eqx.tree_at(
                lambda g: (g.weight, g.bias),
                m,
                (jnp.ones(m.weight.shape, m.weight.dtype), jnp.zeros(m.bias.shape, m.bias.dtype)),
            )
        lim = 1.0 / math.sqrt(_fan_in(m))
        w = u[offset : offset + m.weight.size].reshape(m.weight.shape) * lim
        offset += m.weight.size
        if m.bias is None:
            return eqx.tree_at(lambda layer: layer.weight, m, jnp.asarray(w))
        b = u[offset : offset + m.bias.size].reshape(m.bias.shape) * lim
        offset += m.bias.size
        return eqx.tree_at(
            lambda layer: (layer.weight, layer.bias), m, (jnp.asarray(w), jnp.asarray(b))
        )

    return jax.tree.map(fill, abstract, is_leaf=_is_layer)


class UNet(eqx.Module):
    """`f(x, t)` for images stored flat: `x` of shape `(C * H * W,)` is reshaped to
    `image_shape`, passed through a UNet (residual blocks with a sinusoidal time
    embedding, down- and up-sampling stages with skip connections, self-attention
    at the coarsest level; Ho et al. 2020) and flattened back.

    **Arguments:**

    - `image_shape`: `(C, H, W)`; `H` and `W` divisible by `2^(len(multipliers) - 1)`.
    - `channels`: channels at the finest level; level `i` has `channels * multipliers[i]`.
    - `multipliers`: one entry per level; a downsampling between consecutive levels.
    - `blocks`: residual blocks per level.
    - `heads`: attention heads at the coarsest level (divides its channels).
    - `groups`: GroupNorm groups (for each layer, the largest divisor of its channels
      up to this).
    - `time_dim`, `time_scale`: the time embedding, as for `MLP`.
    - `key`: initialisation key.
    """

    image_shape: tuple[int, int, int] = eqx.field(static=True)
    time_dim: int = eqx.field(static=True)
    time_scale: float = eqx.field(static=True)
    time_mlp: tuple[eqx.nn.Linear, eqx.nn.Linear]
    conv_in: _Conv
    down: tuple[tuple[_ResBlock, ...], ...]
    downsample: tuple[_Conv, ...]
    mid: tuple[_ResBlock, _Attention, _ResBlock]
    up: tuple[tuple[_ResBlock, ...], ...]
    upsample: tuple[_Conv, ...]
    norm_out: _GroupNorm
    conv_out: _Conv

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        channels: int = 32,
        multipliers: tuple[int, ...] = (1, 2),
        blocks: int = 1,
        *,
        heads: int = 4,
        groups: int = 8,
        time_dim: int = 64,
        time_scale: float = 1000.0,
        key: PRNGKeyArray,
    ):
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {image_shape!r}.")
        c_img, height, width = image_shape
        factor = 2 ** (len(multipliers) - 1)
        if height % factor or width % factor:
            raise ValueError(
                f"H and W ({height}, {width}) must be divisible by {factor} for "
                f"{len(multipliers)} levels; pad the images or use fewer multipliers."
            )
        for name, value in (("channels", channels), ("blocks", blocks), ("heads", heads)):
            _check_positive_int(name, value)
        widths = [channels * m for m in multipliers]
        if widths[-1] % heads:
            raise ValueError(f"heads ({heads}) must divide the coarsest channels ({widths[-1]}).")
        self.image_shape = tuple(image_shape)
        self.time_dim = time_dim
        self.time_scale = time_scale
        # the layers are built abstractly and filled from one uniform draw: building
        # them eagerly compiles an initialiser per distinct layer shape (about 15 s
        # for a small UNet on a 2-core CPU)
        args = (c_img, tuple(widths), blocks, heads, groups, time_dim, 4 * channels)
        layers = _materialise(eqx.filter_eval_shape(_unet_layers, *args, key), key)
        self.time_mlp = layers["time_mlp"]
        self.conv_in = layers["conv_in"]
        self.down, self.downsample = layers["down"], layers["downsample"]
        self.mid = layers["mid"]
        self.up, self.upsample = layers["up"], layers["upsample"]
        self.norm_out, self.conv_out = layers["norm_out"], layers["conv_out"]

    def __call__(self, x: Float[Array, " n"], t: Float[ArrayLike, ""]) -> Float[Array, " n"]:
        n = math.prod(self.image_shape)
        if x.shape != (n,):
            raise ValueError(f"UNet takes flat images of shape ({n},), got {x.shape}.")
        emb = sinusoidal_embedding(t, self.time_dim, self.time_scale).astype(x.dtype)
        emb = self.time_mlp[1](jax.nn.silu(self.time_mlp[0](emb)))
        h = self.conv_in(jnp.transpose(x.reshape(self.image_shape), (1, 2, 0)))
        skips = [h]
        for i, level in enumerate(self.down):
            for block in level:
                h = block(h, emb)
                skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
                skips.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)
        for i, level in enumerate(self.up):
            for block in level:
                h = block(jnp.concatenate([h, skips.pop()], axis=-1), emb)
            if i < len(self.upsample):
                h = jnp.repeat(jnp.repeat(h, 2, axis=0), 2, axis=1)  # nearest-neighbour 2x
                h = self.upsample[i](h)
        h = self.conv_out(jax.nn.silu(self.norm_out(h)))
        return jnp.transpose(h, (2, 0, 1)).reshape(n)
