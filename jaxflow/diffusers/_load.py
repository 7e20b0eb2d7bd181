"""`jfd.load`: a diffusers checkpoint (a pipeline folder, a hub id, a loaded
pipeline or transformer, or a folder written by `model.save`) as a jaxflow model."""

import json
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np

from .._misc import transformer_dtype
from ..nn import FluxTransformer, SD3Transformer
from . import _safetensors
from ._model import (
    AbstractDiffusersModel,
    Components,
    FluxModel,
    SD3Model,
    cache_key,
    default_prompt_cache,
)
from ._torch import require, state_dict_numpy

_ARCHITECTURES = {
    "SD3Transformer2DModel": (SD3Transformer, SD3Model),
    "FluxTransformer2DModel": (FluxTransformer, FluxModel),
}
# a transformer alone carries no scheduler: the released pipelines' settings
_DEFAULT_SCHEDULERS = {
    "sd3": {"num_train_timesteps": 1000, "shift": 3.0},
    "flux": {
        "num_train_timesteps": 1000,
        "shift": 3.0,
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    },
}
_CLASS_NAMES = {model_cls.architecture: name for name, (_, model_cls) in _ARCHITECTURES.items()}
_SCHEDULER = "FlowMatchEulerDiscreteScheduler"
_SAVED = "jaxflow_model.json"


def _architecture(class_name):
    if class_name not in _ARCHITECTURES:
        raise ValueError(
            f"unsupported transformer {class_name!r}: jaxflow.diffusers ports "
            f"{sorted(_ARCHITECTURES)} (Stable Diffusion 3 / 3.5 and FLUX.1)."
        )
    return _ARCHITECTURES[class_name]


def _clean(config) -> dict:
    """A config as a plain JSON-able dict (diffusers' FrozenDict, tuples as lists)."""
    return json.loads(json.dumps(dict(config), default=list))


def _module_config(module) -> dict:
    """A loaded module's config with its `_class_name`, as its `config.json` would
    hold it: diffusers adds the name only when it writes the file, and a folder
    written by `model.save` is read back by that name."""
    return {"_class_name": type(module).__name__, **_clean(module.config)}


def _read_json(file: pathlib.Path) -> dict:
    with open(file) as f:
        return json.load(f)


def _folder_weights(folder: pathlib.Path):
    """A function reading a transformer folder's safetensors (all shards)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"{folder} has no .safetensors weights; jaxflow reads diffusers' safetensors "
            "checkpoints (re-save a .bin checkpoint with save_pretrained(safe_serialization=True))."
        )

    def weights():
        out = {}
        for file in files:
            out.update(_safetensors.read(file))
        return out

    return weights


def load(
    source,
    *,
    dtype=jnp.float32,
    local_files_only: bool = False,
    cache_dir=None,
    revision: str | None = None,
    token=None,
    prompt_cache="default",
) -> AbstractDiffusersModel:
    """Load a Stable Diffusion 3 / 3.5 or FLUX.1 checkpoint: the transformer
    converted to JAX (`jf.nn.SD3Transformer` / `jf.nn.FluxTransformer`), the VAE
    and text encoders kept in PyTorch and loaded when first needed.

    **Arguments:**

    - `source`: a hub id (`"stabilityai/stable-diffusion-3.5-medium"`, fetched by
      diffusers' own `DiffusionPipeline.download`, so its cache,
      `local_files_only`, `cache_dir`, `revision` and `token` apply); a local
      diffusers pipeline folder (`model_index.json`) or transformer folder
      (`config.json`); a folder written by `model.save`; or a loaded diffusers
      pipeline or transformer object.
    - `dtype`: `jnp.float32` or `jnp.bfloat16`: the transformer's weights and
      compute (norm statistics in float32). The VAE runs in float32, the text
      encoders in `dtype`.
    - `prompt_cache`: a folder for prompt embeddings; `"default"`
      (`$JAXFLOW_CACHE/prompt_embeddings`, else `~/.cache/jaxflow/...`) or `None`
      (memory only).

    **Returns:** an `SD3Model` or a `FluxModel`.

    **Raises:** `ValueError` for a path that is not a diffusers checkpoint, an
    unsupported architecture, a dtype other than the two, or weights that do not
    match their config (the keys are listed); `ImportError` naming the extra
    where torch or diffusers is needed and missing. A folder's transformer is
    read without PyTorch.
    """
    # checked before a large checkpoint is read
    dtype = transformer_dtype("jfd.load", dtype)
    cache = default_prompt_cache() if prompt_cache == "default" else prompt_cache
    cache = None if cache is None else pathlib.Path(cache)
    if isinstance(source, str | pathlib.Path):
        path = pathlib.Path(source).expanduser()
        if path.is_dir():
            return _load_folder(path, dtype, cache)
        text = str(source)
        if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
            raise ValueError(
                f"{text!r} is neither a folder nor a hub id of the form 'owner/name'; give "
                "a diffusers pipeline folder (with model_index.json), a transformer folder "
                "(with config.json) or a folder written by model.save."
            )
        diffusers = require("diffusers")
        folder = diffusers.DiffusionPipeline.download(
            text,
            local_files_only=local_files_only,
            cache_dir=cache_dir,
            revision=revision,
            token=token,
        )
        return _load_folder(pathlib.Path(folder), dtype, cache, source=text)
    return _load_object(source, dtype, cache)


def _dtype_argument(diffusers, dtype) -> dict:
    """`from_pretrained`'s dtype keyword for the installed diffusers: `dtype=` from
    0.40 on, where `torch_dtype=` warns (FutureWarning) on every load; `torch_dtype=`
    before, where `dtype=` is not a keyword (the pin allows diffusers >= 0.32)."""
    from packaging.version import Version

    accepts_dtype = Version(diffusers.__version__).release >= (0, 40)
    return {"dtype" if accepts_dtype else "torch_dtype": dtype}


def _pipeline_loader(path: pathlib.Path, dtype):
    def loader():
        diffusers = require("diffusers")
        torch = require("torch")
        text_dtype = torch.bfloat16 if dtype == jnp.bfloat16 else torch.float32
        index = _read_json(path / "model_index.json")
        pipeline_cls = getattr(diffusers, index["_class_name"], diffusers.DiffusionPipeline)
        expected, optional = pipeline_cls._get_signature_keys(pipeline_cls)
        # the transformer runs in JAX; components the folder lacks (a pipeline saved
        # without text encoders) are passed as None, as diffusers asks
        absent = {
            name: None
            for name in [*expected, *optional]
            if not (isinstance(index.get(name), list) and index[name][0] is not None)
        }
        pipeline = diffusers.DiffusionPipeline.from_pretrained(
            str(path), **{**absent, "transformer": None}, **_dtype_argument(diffusers, text_dtype)
        )
        # the VAE encodes once and decodes once per image: float32 whatever the
        # transformer's dtype
        if getattr(pipeline, "vae", None) is not None and pipeline.vae.dtype != torch.float32:
            pipeline.vae.to(torch.float32)
        return pipeline

    return loader


def _load_folder(path: pathlib.Path, dtype, cache, source: str | None = None):
    source = source or str(path.resolve())
    if (path / _SAVED).exists():
        return _load_saved(path, dtype)
    if (path / "model_index.json").exists():
        index = _read_json(path / "model_index.json")
        if not (path / "transformer" / "config.json").exists():
            raise ValueError(
                f"{path} is a diffusers pipeline ({index.get('_class_name')}) without a "
                "transformer/ folder; jaxflow.diffusers ports the SD3 and FLUX transformers."
            )
        config = _read_json(path / "transformer" / "config.json")
        port, model_cls = _architecture(config.get("_class_name"))
        weights = _folder_weights(path / "transformer")
        transformer = port.from_diffusers(config, weights(), dtype=dtype)
        scheduler = _read_json(path / "scheduler" / "scheduler_config.json")
        vae_file = path / "vae" / "config.json"
        return model_cls(
            transformer,
            _clean(config),
            scheduler.get("_class_name", _SCHEDULER),
            _clean(scheduler),
            _clean(_read_json(vae_file)) if vae_file.exists() else None,
            source,
            cache,
            Components(loader=_pipeline_loader(path, dtype), weights=weights),
        )
    if (path / "config.json").exists():
        config = _read_json(path / "config.json")
        port, model_cls = _architecture(config.get("_class_name"))
        weights = _folder_weights(path)
        transformer = port.from_diffusers(config, weights(), dtype=dtype)
        return model_cls(
            transformer,
            _clean(config),
            _SCHEDULER,
            dict(_DEFAULT_SCHEDULERS[model_cls.architecture]),
            None,
            source,
            cache,
            Components(weights=weights),
        )
    raise ValueError(
        f"{path} is not a diffusers checkpoint: expected model_index.json (a pipeline "
        "folder), config.json (a transformer folder) or jaxflow_model.json (a folder "
        "written by model.save)."
    )


def _load_object(obj, dtype, cache):
    diffusers = require("diffusers")
    if isinstance(obj, diffusers.DiffusionPipeline):
        module = getattr(obj, "transformer", None)
        if module is None:
            raise ValueError(
                f"{type(obj).__name__} has no transformer; jaxflow.diffusers ports the SD3 "
                "and FLUX transformers."
            )
        port, model_cls = _architecture(type(module).__name__)
        vae = getattr(obj, "vae", None)
        return model_cls(
            port.from_diffusers(module.config, state_dict_numpy(module), dtype=dtype),
            _module_config(module),
            type(obj.scheduler).__name__,
            _clean(obj.scheduler.config),
            None if vae is None else _clean(vae.config),
            obj.config.get("_name_or_path") or None,
            cache,
            Components(pipeline=obj, weights=lambda: state_dict_numpy(module)),
        )
    if type(obj).__name__ in _ARCHITECTURES:
        port, model_cls = _architecture(type(obj).__name__)
        return model_cls(
            port.from_diffusers(obj.config, state_dict_numpy(obj), dtype=dtype),
            _module_config(obj),
            _SCHEDULER,
            dict(_DEFAULT_SCHEDULERS[model_cls.architecture]),
            None,
            obj.config.get("_name_or_path") or None,
            cache,
            Components(weights=lambda: state_dict_numpy(obj)),
        )
    raise ValueError(
        f"cannot load a {type(obj).__name__}: give a hub id, a folder, a diffusers "
        f"pipeline (StableDiffusion3Pipeline, FluxPipeline) or a transformer "
        f"({sorted(_ARCHITECTURES)})."
    )


class _VaeOnly:
    """A saved model's PyTorch side: its VAE, no text encoders."""

    def __init__(self, vae):
        self.vae = vae

    def encode_prompt(self, *args, **kwargs):
        raise ValueError(
            "this model was saved by model.save without its text encoders: the prompts "
            "encoded before saving are cached, a new one is not; load the diffusers "
            "checkpoint to encode it."
        )


def _load_saved(path: pathlib.Path, dtype):
    meta = _read_json(path / _SAVED)
    config = _read_json(path / "transformer" / "config.json")
    # a folder saved from a loaded object before the class name was recorded
    config.setdefault("_class_name", _CLASS_NAMES.get(meta.get("architecture")))
    port, model_cls = _architecture(config.get("_class_name"))
    weights = _folder_weights(path / "transformer")
    loader = None
    if (path / "vae" / "config.json").exists():

        def loader():
            diffusers = require("diffusers")
            torch = require("torch")
            vae = diffusers.AutoencoderKL.from_pretrained(str(path / "vae"))
            return _VaeOnly(vae.to(torch.float32))

    return model_cls(
        port.from_diffusers(config, weights(), dtype=dtype),
        config,
        meta["scheduler_class"],
        meta["scheduler_config"],
        meta["vae_config"],
        meta["source"],
        path / "prompt_embeddings",
        Components(loader=loader, weights=weights),
    )


def save_model(model: AbstractDiffusersModel, path: pathlib.Path) -> None:
    """`model.save(path)`: see its docstring."""
    if model.components.weights is None:
        raise ValueError("this model holds no reference to its checkpoint's weights.")
    path.mkdir(parents=True, exist_ok=True)
    (path / "transformer").mkdir(exist_ok=True)
    _safetensors.write(
        path / "transformer" / "diffusion_pytorch_model.safetensors",
        {name: np.asarray(array) for name, array in model.components.weights().items()},
    )
    # the class name `jfd.load` reads the folder by (a model built by hand may lack it)
    config = {"_class_name": _CLASS_NAMES[model.architecture], **model.config}
    with open(path / "transformer" / "config.json", "w") as f:
        json.dump(config, f, indent=1)
    prompts = path / "prompt_embeddings"
    prompts.mkdir(exist_ok=True)
    for (prompt, length), (context, pooled) in model.components.prompts.items():
        key = cache_key(model.source, model.architecture, prompt, length)
        if key is not None:
            np.savez(
                prompts / f"{key}.npz", context=context, pooled=pooled, prompt=np.asarray(prompt)
            )
    if model.components.available:
        try:
            vae = model.components.pipeline("save").vae
        except (ImportError, ValueError, AttributeError):
            vae = None
        if vae is not None:
            if (path / "vae").exists():
                shutil.rmtree(path / "vae")
            vae.save_pretrained(str(path / "vae"))
    meta = dict(
        format=1,
        architecture=model.architecture,
        scheduler_class=model.scheduler_class,
        scheduler_config=model.scheduler_config,
        vae_config=model.vae_config,
        source=model.source,
    )
    with open(path / _SAVED, "w") as f:
        json.dump(meta, f, indent=1)
