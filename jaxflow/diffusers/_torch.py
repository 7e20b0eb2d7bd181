"""The PyTorch side of the bridge: importing torch and diffusers with an
install hint, and moving weights and tensors across."""

import importlib

import ml_dtypes
import numpy as np

INSTALL_HINT = (
    "the diffusers bridge needs PyTorch and diffusers: pip install 'jaxflow[diffusers]' "
    "(any torch >= 2.4; on a CPU-only machine `pip install torch==2.13.0` first keeps "
    "pip from pulling CUDA wheels)"
)


def require(module: str):
    """Import `module` (torch, diffusers, transformers), or raise an `ImportError`
    that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{module} is not installed: {INSTALL_HINT}.") from error


def to_numpy(tensor) -> np.ndarray:
    """A torch tensor as a NumPy array of the same dtype; bfloat16 through
    `ml_dtypes` (NumPy has none), so a bfloat16 checkpoint is never widened."""
    torch = require("torch")
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def state_dict_numpy(module) -> dict[str, np.ndarray]:
    """A torch module's state dict as NumPy arrays, dtypes kept."""
    return {name: to_numpy(value) for name, value in module.state_dict().items()}
