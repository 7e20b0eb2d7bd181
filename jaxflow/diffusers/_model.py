"""A diffusers text-to-image model on the jaxflow side: the transformer ported
to JAX, the VAE and text encoders left in PyTorch (each used once per image or
prompt, never differentiated), the scheduler's grid, and prompt embeddings
cached to disk."""

import abc
import hashlib
import json
import os
import pathlib
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from .._learned import LearnedField
from .._misc import check
from .._paths import RectifiedFlow
from ..nn import FluxTransformer, SD3Transformer, flux_image_ids
from ._networks import FluxVelocity, SD3Velocity
from ._schedule import as_times, pipeline_sigmas
from ._torch import require, to_numpy


def default_prompt_cache() -> pathlib.Path:
    """Where prompt embeddings are cached: `$JAXFLOW_CACHE/prompt_embeddings`,
    by default `~/.cache/jaxflow/prompt_embeddings`."""
    root = os.environ.get("JAXFLOW_CACHE", os.path.join("~", ".cache", "jaxflow"))
    return pathlib.Path(root).expanduser() / "prompt_embeddings"


class Components:
    """The PyTorch parts of a model, loaded on first use: a pipeline built
    without its transformer (VAE, tokenizers, text encoders), or what a
    loaded pipeline object already holds. Mutable on purpose (loading is lazy);
    it sits in a static field of the immutable model."""

    def __init__(self, pipeline=None, loader=None, weights=None):
        self._pipeline = pipeline
        self._loader = loader
        # the checkpoint's transformer weights, re-read when the model is saved
        self.weights = weights
        self.prompts: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
        # the latent shapes of the fields built and the images encoded, in order:
        # `decode` finds the size of flat latents among them
        self.shapes: dict[tuple[int, int, int], None] = {}

    @property
    def available(self) -> bool:
        return self._pipeline is not None or self._loader is not None

    def pipeline(self, what: str):
        if self._pipeline is None:
            if self._loader is None:
                raise ValueError(
                    f"{what} needs the model's VAE or text encoders, and this model was "
                    "loaded without them (from a transformer alone, or from a saved JAX "
                    "folder without a vae/ subfolder): load the diffusers pipeline folder "
                    "or hub id, or pass prompt_embeds= / latents directly."
                )
            self._pipeline = self._loader()
        return self._pipeline


def cache_key(source: str | None, architecture: str, prompt: str, length: int) -> str | None:
    if source is None:
        return None
    text = json.dumps([source, architecture, prompt, length])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class AbstractDiffusersModel(eqx.Module):
    """What every ported text-to-image model offers: `field`, `times`,
    `encode`, `decode`, `encode_prompt`, `latent_shape`, `save`.

    Built by `jfd.load`. The model is a handle, not an argument for `jit`: pass
    the field it builds to `jit` (as an argument, never closed over: closed-over
    weights become compiled constants)."""

    transformer: eqx.AbstractVar[Any]
    config: eqx.AbstractVar[dict]
    scheduler_class: eqx.AbstractVar[str]
    scheduler_config: eqx.AbstractVar[dict]
    vae_config: eqx.AbstractVar[dict | None]
    source: eqx.AbstractVar[str | None]
    prompt_cache: eqx.AbstractVar[pathlib.Path | None]
    components: eqx.AbstractVar[Components]

    architecture: eqx.AbstractClassVar[str]
    default_max_sequence_length: eqx.AbstractClassVar[int]

    # ---- resolution -------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell: `2^(len(block_out_channels) - 1)`, 8 for SD3 and FLUX."""
        if self.vae_config is None:
            return 8
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae_config["latent_channels"]) if self.vae_config else 16

    @property
    @abc.abstractmethod
    def default_resolution(self) -> int:
        """The pipeline's default height and width in pixels."""

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple:
        """The latent `(c, h, w)` of an image `height x width` (pixels; the
        pipeline's default size when `None`), with a `ValueError` where the size
        is not a multiple of `16` (the VAE's 8 times the patch or packing size 2)."""
        height = self.default_resolution if height is None else height
        width = self.default_resolution if width is None else width
        multiple = self.vae_scale_factor * 2
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int | np.integer) or value <= 0 or value % multiple:
                lower = max(multiple, (int(value) // multiple) * multiple)
                raise ValueError(
                    f"{name}={value!r}: the image size must be a positive multiple of "
                    f"{multiple} ({self.vae_scale_factor} per latent cell times the "
                    f"transformer's patch of 2); use {lower} or {lower + multiple}, or "
                    "crop the images."
                )
        f = self.vae_scale_factor
        return (self.latent_channels, int(height) // f, int(width) // f)

    # ---- time grid --------------------------------------------------------
    def times(
        self, steps: int, *, height: int | None = None, width: int | None = None
    ) -> Float[Array, " k"]:
        """The pipeline's time grid for `steps` steps, increasing from `0` to the
        first sigma (`steps + 1` times): `sigmas[::-1]` of diffusers' own
        scheduler (SD3.5: shift 3.0; FLUX: the shift `mu` of the image size).

        `jf.generate(field, z, solver="euler", times=grid)` is the pipeline's
        Euler loop; `solver=jfd.FlowMatchHeun()` its Heun scheduler.
        """
        if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}.")
        _, h, w = self.latent_shape(height, width)
        seq_len = (h // 2) * (w // 2)
        sigmas = pipeline_sigmas(
            self.architecture, self.scheduler_class, self.scheduler_config, int(steps), seq_len
        )
        return as_times(sigmas)

    # ---- prompts ----------------------------------------------------------
    @abc.abstractmethod
    def _encode_prompt_torch(self, pipeline, prompt: str, max_sequence_length: int):
        """(context (l, d), pooled (p,)) as torch tensors from the pipeline."""

    def encode_prompt(
        self, prompt: str = "", *, max_sequence_length: int | None = None
    ) -> tuple[Float[Array, "l d"], Float[Array, " p"]]:
        """The prompt's embeddings `(context, pooled)` through the pipeline's own
        text encoders (SD3: CLIP-L, CLIP-G and T5; FLUX: CLIP-L pooled and T5),
        float32. The null prompt is `""` through the encoders, not zeros.

        Cached in memory and on disk (`prompt_cache`, keyed by the checkpoint,
        the prompt and the sequence length), so a later run needs no text
        encoder.
        """
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}.")
        length = max_sequence_length or self.default_max_sequence_length
        key = cache_key(self.source, self.architecture, prompt, length)
        memory = self.components.prompts
        mem_key = (prompt, length)
        if mem_key in memory:
            context, pooled = memory[mem_key]
        else:
            file = None
            if key is not None and self.prompt_cache is not None:
                file = pathlib.Path(self.prompt_cache) / f"{key}.npz"
            if file is not None and file.exists():
                with np.load(file) as saved:
                    context, pooled = saved["context"], saved["pooled"]
            else:
                torch = require("torch")
                pipeline = self.components.pipeline("encode_prompt")
                with torch.no_grad():
                    context, pooled = self._encode_prompt_torch(pipeline, prompt, length)
                context = to_numpy(context.float())[0]
                pooled = to_numpy(pooled.float())[0]
                if file is not None:
                    file.parent.mkdir(parents=True, exist_ok=True)
                    tmp = file.with_suffix(".tmp.npz")
                    np.savez(tmp, context=context, pooled=pooled, prompt=np.asarray(prompt))
                    os.replace(tmp, file)
            memory[mem_key] = (context, pooled)
        return jnp.asarray(context, jnp.float32), jnp.asarray(pooled, jnp.float32)

    def _embeddings(self, prompt, context, pooled, max_sequence_length, prefix=""):
        """The embeddings `(context, pooled)` given, or those of `prompt`, checked:
        one prompt, finite. `prefix` is `"negative_"` for the negative ones."""
        names = (f"{prefix}prompt_embeds", f"{prefix}pooled_prompt_embeds")
        if (context is None) != (pooled is None):
            raise ValueError(f"give {names[0]} and {names[1]} together.")
        if context is None:
            context, pooled = self.encode_prompt(prompt, max_sequence_length=max_sequence_length)
            names = (f"the context embeddings of {prompt!r}", f"the pooled ones of {prompt!r}")
        context, pooled = jnp.asarray(context), jnp.asarray(pooled)
        if context.ndim == 3 and context.shape[0] == 1:
            context = context[0]
        if pooled.ndim == 2 and pooled.shape[0] == 1:
            pooled = pooled[0]
        if context.ndim != 2 or pooled.ndim != 1:
            raise ValueError(
                f"{names[0]} must have shape (l, d) and {names[1]} (p,) "
                f"(one prompt), got {context.shape} and {pooled.shape}."
            )
        return _finite(names[0], context), _finite(names[1], pooled)

    # ---- the field --------------------------------------------------------
    @abc.abstractmethod
    def field(self, prompt: str = "", **kwargs) -> LearnedField:
        """The PF-ODE velocity field on flat latents at one prompt and size."""

    # ---- VAE --------------------------------------------------------------
    def _vae(self, what: str):
        return self.components.pipeline(what).vae

    def _scaling(self):
        config = self.vae_config or {}
        return config.get("scaling_factor", 1.0), config.get("shift_factor", None) or 0.0

    def encode(self, images) -> Float[Array, "*b n"]:
        """Images in `[0, 1]` to flat latents: the VAE's posterior mean, then
        `(mean - shift_factor) * scaling_factor` (the VAE config's values).

        **Arguments:**

        - `images`: one image `(H, W, 3)` or a batch `(B, H, W, 3)`, floats in
          `[0, 1]` (uint8 in `[0, 255]` accepted), or PIL images; `H` and `W`
          multiples of 16.

        **Returns:** float32 latents `(n,)` or `(B, n)`, `n = c (H/8) (W/8)`.
        """
        torch = require("torch")
        batch, single = _images_array(images)
        self.components.shapes[self.latent_shape(batch.shape[1], batch.shape[2])] = None
        vae = self._vae("encode")
        x = torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))
        x = (2.0 * x - 1.0).to(dtype=next(vae.parameters()).dtype)
        with torch.no_grad():
            mean = vae.encode(x).latent_dist.mean.float()
        scale, shift = self._scaling()
        latents = ((mean - shift) * scale).reshape(mean.shape[0], -1).numpy()
        latents = jnp.asarray(latents, jnp.float32)
        return latents[0] if single else latents

    def decode(
        self,
        latents: Float[ArrayLike, "*b n"],
        *,
        height: int | None = None,
        width: int | None = None,
    ) -> np.ndarray:
        """Flat latents back to images `(H, W, 3)` or `(B, H, W, 3)` in `[0, 1]`
        (float32 NumPy): `latents / scaling_factor + shift_factor`, the VAE's
        decoder, clipped.

        `height, width` are the image's. Flat latents do not fix the aspect ratio,
        so where they are left out the size follows the points: the one size,
        among the fields this model built, the images it encoded and its default
        size, whose latents have the points' length; given one of the two, the
        other follows from that length. A `ValueError` asks for `height=` and
        `width=` where no size, or more than one, fits.
        """
        torch = require("torch")
        # a copy: torch refuses to wrap a read-only view of a JAX array
        latents = np.array(latents, dtype=np.float32)
        single = latents.ndim == 1
        latents = latents[None] if single else latents
        if latents.ndim != 2:
            raise ValueError(
                f"latents of shape {latents.shape}: give flat latents (n,) or a batch (B, n)."
            )
        shape = self._decode_shape(latents.shape[1], height, width)
        if latents.shape[1] != np.prod(shape):
            raise ValueError(
                f"latents of shape {latents.shape} for images of latent shape {shape}: "
                f"give (n,) or (B, n) with n = {int(np.prod(shape))}, and the height and "
                "width the latents were encoded at."
            )
        vae = self._vae("decode")
        scale, shift = self._scaling()
        z = torch.from_numpy(latents.reshape(-1, *shape)) / scale + shift
        with torch.no_grad():
            image = vae.decode(z.to(dtype=next(vae.parameters()).dtype)).sample.float()
        image = ((image + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        return image[0] if single else image

    def _decode_shape(self, n: int, height, width) -> tuple[int, int, int]:
        """The latent shape of flat latents of length `n`: see `decode`."""
        if height is not None and width is not None:
            return self.latent_shape(height, width)
        c, f = self.latent_channels, self.vae_scale_factor
        if height is not None or width is not None:
            given = height if height is not None else width
            _, cells, _ = self.latent_shape(given, given)  # checks the size given
            other, rest = divmod(n, c * cells)
            if rest or other == 0:
                name = "height" if height is not None else "width"
                raise ValueError(
                    f"latents of length {n} are no image with {name}={given}: n = {c} "
                    f"(height / {f}) (width / {f}); give the height and width the "
                    "latents were encoded at."
                )
            other *= f
            return self.latent_shape(*((given, other) if height is not None else (other, given)))
        candidates = [*self.components.shapes, self.latent_shape()]
        fits = list(dict.fromkeys(s for s in candidates if int(np.prod(s)) == n))
        if len(fits) == 1:
            return fits[0]

        def size(shape):
            return f"{shape[1] * f} x {shape[2] * f}"

        if fits:
            raise ValueError(
                f"latents of length {n} fit images of {' and of '.join(map(size, fits))} "
                "(fields this model built or images it encoded, or its default size): "
                "give decode(..., height=..., width=...)."
            )
        side = np.sqrt(n / c)
        square = (
            f" (height={int(side) * f}, width={int(side) * f} for a square image)"
            if side == int(side)
            else ""
        )
        raise ValueError(
            f"latents of length {n}: no field this model built, no image it encoded and "
            f"not its default size {size(self.latent_shape())} has latents of that length, "
            f"and flat latents do not fix the aspect ratio: give decode(..., height=..., "
            f"width=...), the image size with n = {c} (height / {f}) (width / {f}){square}."
        )

    # ---- saving -----------------------------------------------------------
    def save(self, path) -> None:
        """Write the converted model in JAX form to the folder `path`: the
        transformer's weights (diffusers names, NumPy), the transformer,
        scheduler and VAE configs, the cached prompt embeddings, and the VAE in
        diffusers form when it is loaded. `jfd.load(path)` reads it back; the
        transformer, the grid and the cached prompts then need no PyTorch."""
        from ._load import save_model

        save_model(self, pathlib.Path(path))


def _images_array(images) -> tuple[np.ndarray, bool]:
    """Images as a float32 `(B, H, W, 3)` array in `[0, 1]`, and whether one
    image was given."""
    if isinstance(images, list | tuple):
        arrays = [_one_image(image) for image in images]
        if len({a.shape for a in arrays}) != 1:
            raise ValueError("the images of a batch must all have one size.")
        return np.stack(arrays), False
    if type(images).__module__.startswith("PIL"):
        return _one_image(images)[None], True
    array = np.asarray(images)
    if array.ndim == 3:
        return _one_image(array)[None], True
    if array.ndim == 4:
        return np.stack([_one_image(a) for a in array]), False
    raise ValueError(
        f"images must be (H, W, 3), (B, H, W, 3) or PIL images, got shape {array.shape}."
    )


def _one_image(image) -> np.ndarray:
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"an image must be (H, W, 3) RGB, got shape {array.shape}.")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    array = array.astype(np.float32)
    if not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > 1:
        raise ValueError(
            "image values must be finite and in [0, 1] (or uint8 in [0, 255]), got "
            f"range [{array.min()}, {array.max()}]."
        )
    return array


def _finite(name: str, x: Array) -> Array:
    """`x`, refused where an entry is NaN or infinite: such embeddings make every
    velocity NaN, which an analysis would then blame on the field."""

    def got():  # where, for the eager error
        values = np.asarray(x)
        bad = ~np.isfinite(values)
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        return f"{int(bad.sum())} of {values.size} values not finite ({values[where]} at {where})"

    return check(
        x,
        ~jnp.isfinite(x),
        f"{name} are not all finite: recompute the embeddings (a text encoder in "
        "float16 can overflow: run it in float32 or bfloat16), or give the text "
        "(prompt= or negative_prompt=) to encode it here.",
        got=got,
    )


def _finite_scalar(name: str, value) -> None:
    if isinstance(value, jax.core.Tracer):
        return
    array = np.asarray(value)
    if array.shape != () or not np.issubdtype(array.dtype, np.number) or not np.isfinite(array):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")


def _equal(a: Array, b: Array) -> bool:
    """Whether two concrete arrays are equal (`False` under a transformation)."""
    if isinstance(a, jax.core.Tracer) or isinstance(b, jax.core.Tracer):
        return False
    return a.shape == b.shape and bool(np.array_equal(np.asarray(a), np.asarray(b)))


class SD3Model(AbstractDiffusersModel):
    """Stable Diffusion 3 / 3.5 (Medium, Large): the MMDiT in JAX, VAE and text
    encoders (CLIP-L, CLIP-G, T5) in PyTorch. Built by `jfd.load`."""

    transformer: SD3Transformer
    config: dict = eqx.field(static=True)
    scheduler_class: str = eqx.field(static=True)
    scheduler_config: dict = eqx.field(static=True)
    vae_config: dict | None = eqx.field(static=True)
    source: str | None = eqx.field(static=True)
    prompt_cache: pathlib.Path | None = eqx.field(static=True)
    components: Components = eqx.field(static=True)

    architecture = "sd3"
    default_max_sequence_length = 256

    @property
    def default_resolution(self) -> int:
        return int(self.config.get("sample_size", 128)) * self.vae_scale_factor

    def _encode_prompt_torch(self, pipeline, prompt, max_sequence_length):
        context, _, pooled, _ = pipeline.encode_prompt(
            prompt=prompt,
            prompt_2=None,
            prompt_3=None,
            device="cpu",
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
        return context, pooled

    def field(
        self,
        prompt: str = "",
        *,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str | None = "",
        guidance_scale: float = 7.0,
        prompt_embeds=None,
        pooled_prompt_embeds=None,
        negative_prompt_embeds=None,
        negative_pooled_prompt_embeds=None,
        max_sequence_length: int | None = None,
    ) -> LearnedField:
        """The SD3 PF-ODE velocity on flat latents: a `jf.LearnedField` on
        `jf.RectifiedFlow()` (time `t = sigma`) whose network is `SD3Velocity`.

        **Arguments:**

        - `prompt`: the text (default the null prompt `""` of paper 000).
        - `height, width`: the image size in pixels (default the pipeline's).
        - `negative_prompt`, `guidance_scale`: classifier-free guidance as the
          pipeline (default `""` and 7.0). One transformer pass per evaluation
          where guidance cannot change the velocity (`guidance_scale = 1`, or
          the prompt equal to the negative prompt, the null prompt's case), two
          otherwise.
        - `prompt_embeds`, `pooled_prompt_embeds` (and the negative ones):
          embeddings computed elsewhere instead of the text encoders; finite, or a
          `ValueError` names the argument. Without negative embeddings, guidance is
          against `negative_prompt` (`""`) as in diffusers, encoded at
          `max_sequence_length`, which must then be the length `prompt_embeds` was
          encoded at; a model without text encoders and without that prompt
          cached refuses (pass the negative embeddings, or `guidance_scale=1`)
          rather than drop the guidance.
        - `max_sequence_length`: T5 tokens (default 256, the pipeline's).

        **Returns:** a field; its points are latents `(c, h, w)` flattened.
        """
        shape = self.latent_shape(height, width)
        context, pooled = self._embeddings(
            prompt, prompt_embeds, pooled_prompt_embeds, max_sequence_length
        )
        _finite_scalar("guidance_scale", guidance_scale)
        negative_prompt = "" if negative_prompt is None else negative_prompt
        negative = None
        if float(guidance_scale) == 1.0:
            pass  # v_u + 1 (v_c - v_u) = v_c: one pass, whatever the negative
        elif negative_prompt_embeds is not None or negative_pooled_prompt_embeds is not None:
            negative = self._embeddings(
                None, negative_prompt_embeds, negative_pooled_prompt_embeds, None, "negative_"
            )
        elif prompt_embeds is not None or negative_prompt != prompt:
            # as diffusers: embeddings without negative ones guide against
            # `negative_prompt`, `""` by default, never against nothing
            negative = self._negative(
                negative_prompt, context, guidance_scale, max_sequence_length, prompt_embeds
            )
        if negative is not None and all(
            _equal(a, b) for a, b in zip((context, pooled), negative, strict=True)
        ):
            negative = None  # the negative prompt is the prompt: guidance changes nothing
        if negative is not None:
            guidance = (*negative, jnp.asarray(guidance_scale, jnp.float32))
        else:
            guidance = (None, None, None)
        network = SD3Velocity(self.transformer, context, pooled, shape, *guidance)
        self.components.shapes[shape] = None
        return LearnedField(network, RectifiedFlow(), "velocity")

    def _negative(self, negative_prompt, context, guidance_scale, length, prompt_embeds):
        """The negative prompt's embeddings for guidance, at the prompt's length."""
        what = (
            f"guidance_scale={guidance_scale} guides against the negative prompt "
            f"{negative_prompt!r}"
        )
        try:
            negative = self._embeddings(negative_prompt, None, None, length)
        except (ValueError, ImportError) as error:
            raise ValueError(
                f"{what}, whose embeddings cannot be computed here ({error}) Pass "
                "negative_prompt_embeds= and negative_pooled_prompt_embeds= (e.g. "
                f"model.encode_prompt({negative_prompt!r}) on a model with its text "
                "encoders), or guidance_scale=1 for the unguided field."
            ) from error
        got, used = negative[0].shape[0], length or self.default_max_sequence_length
        if prompt_embeds is not None and got != context.shape[0]:
            # l = clip + max_sequence_length: the CLIP tokens, then T5's
            fit = context.shape[0] - (got - used)
            hint = f"max_sequence_length={fit} (the T5 length of prompt_embeds), or " * (fit > 0)
            raise ValueError(
                f"{what}, encoded with max_sequence_length={used} to {got} tokens, and "
                f"prompt_embeds has {context.shape[0]}: pass {hint}negative_prompt_embeds= "
                "and negative_pooled_prompt_embeds= of the prompt_embeds' length."
            )
        return negative


class FluxModel(AbstractDiffusersModel):
    """FLUX.1 (dev, schnell): the transformer in JAX, VAE and text encoders
    (CLIP-L, T5) in PyTorch. Built by `jfd.load`."""

    transformer: FluxTransformer
    config: dict = eqx.field(static=True)
    scheduler_class: str = eqx.field(static=True)
    scheduler_config: dict = eqx.field(static=True)
    vae_config: dict | None = eqx.field(static=True)
    source: str | None = eqx.field(static=True)
    prompt_cache: pathlib.Path | None = eqx.field(static=True)
    components: Components = eqx.field(static=True)

    architecture = "flux"
    default_max_sequence_length = 512

    @property
    def default_resolution(self) -> int:
        return 128 * self.vae_scale_factor

    def _encode_prompt_torch(self, pipeline, prompt, max_sequence_length):
        context, pooled, _ = pipeline.encode_prompt(
            prompt=prompt,
            prompt_2=None,
            device="cpu",
            num_images_per_prompt=1,
            max_sequence_length=max_sequence_length,
        )
        return context, pooled

    def field(
        self,
        prompt: str = "",
        *,
        height: int | None = None,
        width: int | None = None,
        guidance: float | None = None,
        prompt_embeds=None,
        pooled_prompt_embeds=None,
        max_sequence_length: int | None = None,
    ) -> LearnedField:
        """The FLUX PF-ODE velocity on flat latents: a `jf.LearnedField` on
        `jf.RectifiedFlow()` whose network is `FluxVelocity`.

        **Arguments:**

        - `prompt`: the text (default the null prompt `""`).
        - `height, width`: the image size in pixels (default 1024).
        - `guidance`: FLUX-dev's distilled guidance, an input of the network (no
          second pass); default 3.5, the pipeline's. A model without guidance
          embeddings (schnell) takes none.
        - `prompt_embeds`, `pooled_prompt_embeds`: embeddings computed elsewhere.
        - `max_sequence_length`: T5 tokens (default 512, the pipeline's).

        **Returns:** a field; its points are latents `(c, h, w)` flattened.
        """
        shape = self.latent_shape(height, width)
        context, pooled = self._embeddings(
            prompt, prompt_embeds, pooled_prompt_embeds, max_sequence_length
        )
        if guidance is not None:
            _finite_scalar("guidance", guidance)
        if self.config.get("guidance_embeds", False):
            guidance = jnp.asarray(3.5 if guidance is None else guidance, jnp.float32)
        elif guidance is not None:
            raise ValueError(
                "this FLUX model has no guidance embedding (guidance_embeds=False, e.g. "
                "FLUX.1-schnell): leave guidance=None."
            )
        self.components.shapes[shape] = None
        img_ids = flux_image_ids(shape[1], shape[2])
        txt_ids = np.zeros((context.shape[0], 3))
        rope = self.transformer.rope(img_ids, txt_ids)
        network = FluxVelocity(self.transformer, context, pooled, rope, shape, guidance)
        return LearnedField(network, RectifiedFlow(), "velocity")
