"""Stable Diffusion 3 / 3.5 and FLUX.1 as jaxflow fields.

The transformers run in JAX (`jf.nn.SD3Transformer`, `jf.nn.FluxTransformer`,
ported from diffusers and checked against it); the VAE and the text encoders,
used once per image or prompt and never differentiated, stay in PyTorch. Needs
the optional extra: `pip install "jaxflow[diffusers]"`.

```python
import jaxflow as jf
import jaxflow.diffusers as jfd

model = jfd.load("stabilityai/stable-diffusion-3.5-medium", dtype=jnp.bfloat16)
field = model.field(prompt="", height=1024, width=1024)
z = jf.invert(field, model.encode(image), solver="euler", times=model.times(500))
```
"""

from ._configs import transformer_config as transformer_config
from ._load import load as load
from ._model import AbstractDiffusersModel as AbstractDiffusersModel
from ._model import FluxModel as FluxModel
from ._model import SD3Model as SD3Model
from ._networks import FluxVelocity as FluxVelocity
from ._networks import SD3Velocity as SD3Velocity
from ._schedule import FlowMatchHeun as FlowMatchHeun
from ._tiny import tiny_pipeline as tiny_pipeline
