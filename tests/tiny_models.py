"""Tiny randomly initialised diffusers models for the bridge's parity tests: a thin
layer over `jaxflow.diffusers.tiny_pipeline` (which builds them offline, every
parameter randomised), under the names the tests use.

Importing this module needs torch and diffusers: tests call
`pytest.importorskip("diffusers")` first.
"""

import numpy as np
import torch

from jaxflow.diffusers import tiny_pipeline, transformer_config


def _without_class(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


SD3_CONFIG = _without_class(transformer_config("tiny-sd3"))
FLUX_CONFIG = _without_class(transformer_config("tiny-flux"))


def tiny_sd3(seed: int = 0, **overrides):
    return tiny_pipeline("sd3", seed, text_encoders=False, **overrides).transformer


def tiny_flux(seed: int = 0, **overrides):
    return tiny_pipeline("flux", seed, text_encoders=False, **overrides).transformer


def tiny_vae(seed: int = 0):
    return tiny_pipeline("sd3", seed, text_encoders=False).vae


def state_dict_numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """A torch module's state dict as float32 NumPy arrays."""
    return {k: v.detach().float().cpu().numpy() for k, v in module.state_dict().items()}


def sd3_pipeline(seed: int = 0, text_encoders: bool = True, **transformer):
    """A tiny StableDiffusion3Pipeline (SD3.5's scheduler: shift 3.0)."""
    return tiny_pipeline("sd3", seed, text_encoders, **transformer)


def flux_pipeline(seed: int = 0, text_encoders: bool = True, **transformer):
    """A tiny FluxPipeline (FLUX-dev's dynamic shift)."""
    return tiny_pipeline("flux", seed, text_encoders, **transformer)
