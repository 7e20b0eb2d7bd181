"""A time-conditioned UNet for images stored flat (Ho et al. 2020), channel-last
inside (see `jaxflow.nn.Conv` for why)."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, Real

from .._misc import check_key, check_network_input, check_positive_int
from ._embedding import check_time_embedding, sinusoidal_embedding
from ._layers import Conv, GroupNorm, ResBlock, SelfAttention, group_count


def _unet_layers(c_img, widths, blocks, heads, groups, time_dim, t_dim, key):
    keys = iter(jax.random.split(key, 8 + 6 * len(widths) * (blocks + 2)))
    layers = dict(
        time_mlp=(
            eqx.nn.Linear(time_dim, t_dim, key=next(keys)),
            eqx.nn.Linear(t_dim, t_dim, key=next(keys)),
        ),
        conv_in=Conv(c_img, widths[0], 3, padding=1, key=next(keys)),
    )
    down, downsample, skips = [], [], [widths[0]]
    c = widths[0]
    for i, w in enumerate(widths):
        level = []
        for _ in range(blocks):
            level.append(ResBlock(c, w, t_dim, groups, key=next(keys)))
            c = w
            skips.append(c)
        down.append(tuple(level))
        if i < len(widths) - 1:
            downsample.append(Conv(c, c, 3, stride=2, padding=1, key=next(keys)))
            skips.append(c)
    layers["down"], layers["downsample"] = tuple(down), tuple(downsample)
    layers["mid"] = (
        ResBlock(c, c, t_dim, groups, key=next(keys)),
        SelfAttention(c, heads, groups, key=next(keys)),
        ResBlock(c, c, t_dim, groups, key=next(keys)),
    )
    up, upsample = [], []
    for i, w in reversed(list(enumerate(widths))):
        level = []
        for _ in range(blocks + 1):
            level.append(ResBlock(c + skips.pop(), w, t_dim, groups, key=next(keys)))
            c = w
        up.append(tuple(level))
        if i > 0:
            upsample.append(Conv(c, c, 3, padding=1, key=next(keys)))
    layers["up"], layers["upsample"] = tuple(up), tuple(upsample)
    layers["norm_out"] = GroupNorm(group_count(groups, c), c)
    layers["conv_out"] = Conv(c, c_img, 3, padding=1, key=next(keys))
    return layers


def _is_layer(m):
    return isinstance(m, (eqx.nn.Linear, Conv, GroupNorm))


def _fan_in(m):
    # Linear: (out, in); Conv: (kh, kw, in, out)
    return m.weight.shape[1] if isinstance(m, eqx.nn.Linear) else math.prod(m.weight.shape[:-1])


def _materialise(abstract, key):
    """Fill abstract layers as Equinox initialises its own, weights and biases
    uniform on `+-1/sqrt(fan_in)` and GroupNorm's affine map the identity, but
    from one uniform draw for the whole network."""
    layers = [m for m in jax.tree.leaves(abstract, is_leaf=_is_layer) if _is_layer(m)]
    sizes = [
        m.weight.size + (0 if m.bias is None else m.bias.size)
        for m in layers
        if not isinstance(m, GroupNorm)
    ]
    dtype = next(m.weight.dtype for m in layers)
    u = np.asarray(jax.random.uniform(key, (sum(sizes),), dtype, -1.0, 1.0))
    offset = 0

    def fill(m):
        nonlocal offset
        if not _is_layer(m):
            return m
        if isinstance(m, GroupNorm):
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

    **Raises:** `ValueError` for an `image_shape` that is not three positive ints or
    whose `H`, `W` the levels cannot halve, `channels`, `blocks`, `heads`, `groups`
    or a multiplier not a positive int, no multipliers, `heads` not dividing the
    coarsest channels, a bad time embedding (as `MLP`) or `key`; at call time, for
    `x` not a flat image `(C * H * W,)` or `t` not a scalar.
    """

    image_shape: tuple[int, int, int] = eqx.field(static=True)
    time_dim: int = eqx.field(static=True)
    time_scale: float = eqx.field(static=True)
    time_mlp: tuple[eqx.nn.Linear, eqx.nn.Linear]
    conv_in: Conv
    down: tuple[tuple[ResBlock, ...], ...]
    downsample: tuple[Conv, ...]
    mid: tuple[ResBlock, SelfAttention, ResBlock]
    up: tuple[tuple[ResBlock, ...], ...]
    upsample: tuple[Conv, ...]
    norm_out: GroupNorm
    conv_out: Conv

    def __init__(
        self,
        image_shape: tuple[int | np.integer, int | np.integer, int | np.integer],
        channels: int | np.integer = 32,
        multipliers: tuple[int | np.integer, ...] = (1, 2),
        blocks: int | np.integer = 1,
        *,
        heads: int | np.integer = 4,
        groups: int | np.integer = 8,
        time_dim: int | np.integer = 64,
        time_scale: float = 1000.0,
        key: PRNGKeyArray,
    ):
        shape = tuple(image_shape) if np.ndim(image_shape) == 1 else ()
        if len(shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {image_shape!r}.")
        c_img, height, width = (
            check_positive_int(f"image_shape's {name}", value)
            for name, value in zip("CHW", shape, strict=True)
        )
        multipliers = tuple(multipliers)
        if not multipliers:
            raise ValueError("multipliers is empty; give one entry per level, e.g. (1, 2).")
        multipliers = tuple(check_positive_int("each multiplier", m) for m in multipliers)
        factor = 2 ** (len(multipliers) - 1)
        if height % factor or width % factor:
            raise ValueError(
                f"H and W ({height}, {width}) must be divisible by {factor} for "
                f"{len(multipliers)} levels; pad the images or use fewer multipliers."
            )
        channels, blocks, heads, groups = (
            check_positive_int(name, value)
            for name, value in (
                ("channels", channels),
                ("blocks", blocks),
                ("heads", heads),
                ("groups", groups),
            )
        )
        time_dim, time_scale = check_time_embedding(time_dim, time_scale)
        check_key("key", key)
        widths = [channels * m for m in multipliers]
        if widths[-1] % heads:
            raise ValueError(f"heads ({heads}) must divide the coarsest channels ({widths[-1]}).")
        self.image_shape = (c_img, height, width)
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

    def __call__(self, x: Float[Array, "..."], t: Real[ArrayLike, ""]) -> Float[Array, " n"]:
        n = math.prod(self.image_shape)
        where = "UNet (on flat images, {}x{}x{})".format(*self.image_shape)
        x = check_network_input(where, x, t, n)
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
