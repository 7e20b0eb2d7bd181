"""Networks for learned fields, like `equinox.nn`: each maps a flat point `(n,)`
and a time to `(n,)`, so a `jf.LearnedField` built on it is analysed like any
closed-form field (Jacobians, spectra and solvers all work on flat vectors).

`FlaxNNX` and `FlaxLinen` wrap Flax networks (nnx, or linen with its variables)
the same way; they need the optional `flax` (`pip install "jaxflow[flax]"`)."""

from ._embedding import sinusoidal_embedding as sinusoidal_embedding
from ._flax import FlaxLinen as FlaxLinen
from ._flax import FlaxNNX as FlaxNNX
from ._flux import FluxTransformer as FluxTransformer
from ._flux import flux_image_ids as flux_image_ids
from ._flux import pack_latents as pack_latents
from ._flux import unpack_latents as unpack_latents
from ._layers import Conv as Conv
from ._layers import GroupNorm as GroupNorm
from ._layers import ResBlock as ResBlock
from ._layers import SelfAttention as SelfAttention
from ._layers import group_count as group_count
from ._mlp import MLP as MLP
from ._sd3 import SD3Transformer as SD3Transformer
from ._unet import UNet as UNet
