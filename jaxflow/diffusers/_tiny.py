"""Tiny randomly initialised diffusers pipelines (SD3.5-like, FLUX-dev-like),
built offline, for the bridge's tests and the examples' `--quick` runs."""

import numpy as np

from ._configs import transformer_config
from ._torch import require

# A VAE with SD3's and FLUX's latent layout (16 channels, 8 pixels a cell) at a
# fraction of the width.
_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    block_out_channels=(8, 8, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    norm_num_groups=4,
    use_quant_conv=False,
    use_post_quant_conv=False,
    scaling_factor=1.5305,
    shift_factor=0.0609,
)

_WORDS = ["<pad>", "<s>", "</s>", "<unk>", "a", "photo", "of", "cat", "dog", "red", "blue"]


def _without_class(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _randomise(module, seed: int = 0, scale: float = 0.2):
    """Every parameter redrawn `N(0, scale^2 / fan_in)`-like, norm weights around 1:
    diffusers zero-initialises AdaLN and output projections, which would leave
    whole branches of a parity test comparing zeros."""
    torch = require("torch")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim >= 2:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(noise * (scale * 5.0 / np.sqrt(fan_in)))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return module.eval()


def _transformer(architecture: str, seed: int, overrides: dict):
    torch, diffusers = require("torch"), require("diffusers")
    name = {"sd3": "tiny-sd3", "flux": "tiny-flux"}[architecture]
    config = transformer_config(name)
    cls = getattr(diffusers, config["_class_name"])
    torch.manual_seed(seed)
    return _randomise(cls(**{**_without_class(config), **overrides}), seed)


def _vae(seed: int, **overrides):
    torch, diffusers = require("torch"), require("diffusers")
    torch.manual_seed(seed)
    return _randomise(diffusers.AutoencoderKL(**{**_VAE_CONFIG, **overrides}), seed, scale=0.5)


def _tokenizer(max_length: int):
    """A word-level tokenizer over a few words: the real CLIP and T5 tokenizers
    need downloaded vocabularies."""
    tokenizers = require("tokenizers")
    transformers = require("transformers")
    tok = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(_WORDS)}, unk_token="<unk>")
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=max_length,
    )


def _clip(hidden: int, projection: int | None, seed: int):
    torch, transformers = require("torch"), require("transformers")
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(
        vocab_size=len(_WORDS),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        projection_dim=projection or hidden,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if projection is None:
        return _randomise(transformers.CLIPTextModel(config), seed)
    return _randomise(transformers.CLIPTextModelWithProjection(config), seed)


def _t5(d_model: int, seed: int):
    torch, transformers = require("torch"), require("transformers")
    torch.manual_seed(seed)
    config = transformers.T5Config(
        vocab_size=len(_WORDS), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=2
    )
    return _randomise(transformers.T5EncoderModel(config), seed)


def _sd3_text_encoders(seed: int) -> dict:
    # CLIP-L, CLIP-G and T5 of the tiny SD3: hidden 8 + 16 (padded to T5's 32),
    # pooled projections 8 + 16 = 24 (the transformer's pooled_projection_dim)
    return dict(
        text_encoder=_clip(8, 8, seed),
        tokenizer=_tokenizer(16),
        text_encoder_2=_clip(16, 16, seed + 1),
        tokenizer_2=_tokenizer(16),
        text_encoder_3=_t5(32, seed + 2),
        tokenizer_3=_tokenizer(16),
    )


def _flux_text_encoders(seed: int) -> dict:
    # CLIP-L (pooled 24) and T5 (32) of the tiny FLUX
    return dict(
        text_encoder=_clip(24, None, seed),
        tokenizer=_tokenizer(16),
        text_encoder_2=_t5(32, seed + 1),
        tokenizer_2=_tokenizer(16),
    )


def tiny_pipeline(
    architecture: str, seed: int = 0, text_encoders: bool = True, **transformer_overrides
):
    """A tiny diffusers pipeline with random weights, built offline: for tests and
    the examples' `--quick` runs, never for images worth looking at.

    The transformer is `transformer_config("tiny-sd3")` or `"tiny-flux"` (a few
    layers, every feature of the released architecture), the VAE has SD3's and
    FLUX's latent layout (16 channels, 8 pixels a latent cell) at a small width,
    the text encoders are two-layer CLIP and T5 models behind word-level
    tokenizers over a dozen words, and the scheduler is the released one (SD3.5:
    shift 3.0; FLUX-dev: the resolution-dependent shift). Every parameter is
    redrawn at random (diffusers zero-initialises some output projections), so no
    branch of the network is zero. `pipeline.save_pretrained(folder)` then
    `jfd.load(folder)` goes through the real loading code.

    **Arguments:**

    - `architecture`: `"sd3"` (a `StableDiffusion3Pipeline`, SD3.5-Medium-like) or
      `"flux"` (a `FluxPipeline`, FLUX.1-dev-like).
    - `seed`: the seed of every weight.
    - `text_encoders`: `False` leaves the text encoders and tokenizers out (`None`),
      for a transformer and VAE alone.
    - `**transformer_overrides`: entries of the transformer config to change
      (e.g. `num_layers=16`, `guidance_embeds=False`).

    **Returns:** the diffusers pipeline object, on the CPU in float32.

    **Raises:** `ValueError` for an unknown `architecture`; `ImportError` naming
    the extra when torch, diffusers or transformers is missing.
    """
    if architecture not in ("sd3", "flux"):
        raise ValueError(f"architecture must be 'sd3' or 'flux', got {architecture!r}.")
    diffusers = require("diffusers")
    require("transformers")
    transformer = _transformer(architecture, seed, transformer_overrides)
    if architecture == "sd3":
        names = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
        names += ("text_encoder_3", "tokenizer_3")
        encoders = _sd3_text_encoders(seed) if text_encoders else dict.fromkeys(names)
        return diffusers.StableDiffusion3Pipeline(
            transformer=transformer,
            vae=_vae(seed),
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
            **encoders,
        )
    names = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    encoders = _flux_text_encoders(seed) if text_encoders else dict.fromkeys(names)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return diffusers.FluxPipeline(
        transformer=transformer,
        vae=_vae(seed, scaling_factor=0.3611, shift_factor=0.1159),
        scheduler=scheduler,
        **encoders,
    )
