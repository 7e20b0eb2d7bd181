"""Tiny randomly initialised diffusers models (SD3.5-like, FLUX-dev-like, a VAE)
for the bridge's parity tests: built offline, every parameter randomised (diffusers
zero-initialises AdaLN and output projections, which would make a parity test
compare zeros), optionally saved with `save_pretrained`.

Importing this module needs torch and diffusers: tests call
`pytest.importorskip("diffusers")` first.
"""

import numpy as np
import torch

from jaxflow.diffusers import transformer_config


def _without_class(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


SD3_CONFIG = _without_class(transformer_config("tiny-sd3"))
FLUX_CONFIG = _without_class(transformer_config("tiny-flux"))

VAE_CONFIG = dict(
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


def randomise(module: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Every parameter redrawn `N(0, scale^2 / fan_in)`-like, norm weights around 1,
    so that no branch of the network is zero."""
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


def tiny_sd3(seed: int = 0, **overrides):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return randomise(SD3Transformer2DModel(**{**SD3_CONFIG, **overrides}), seed)


def tiny_flux(seed: int = 0, **overrides):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return randomise(FluxTransformer2DModel(**{**FLUX_CONFIG, **overrides}), seed)


def tiny_vae(seed: int = 0, **overrides):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return randomise(AutoencoderKL(**{**VAE_CONFIG, **overrides}), seed, scale=0.5)


def state_dict_numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """A torch module's state dict as float32 NumPy arrays."""
    return {k: v.detach().float().cpu().numpy() for k, v in module.state_dict().items()}


def tiny_tokenizer(max_length: int, pad: str = "<pad>"):
    """A word-level tokenizer over a few words, built offline (the real CLIP and
    T5 tokenizers need downloaded vocabularies)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "a", "photo", "of", "cat", "dog", "red", "blue"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token=pad,
        model_max_length=max_length,
    )


def _clip(hidden: int, projection: int | None, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=11,
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
    cls = CLIPTextModel if projection is None else CLIPTextModelWithProjection
    return randomise(cls(config), seed)


def _t5(d_model: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=11, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=2
    )
    return randomise(T5EncoderModel(config), seed)


def tiny_sd3_text_encoders(seed: int = 0) -> dict:
    """CLIP-L, CLIP-G and T5 for `tiny_sd3`: hidden 8 + 16 (padded to T5's 32),
    pooled projections 8 + 16 = 24, sequences of 16 CLIP tokens."""
    return dict(
        text_encoder=_clip(8, 8, seed),
        tokenizer=tiny_tokenizer(16),
        text_encoder_2=_clip(16, 16, seed + 1),
        tokenizer_2=tiny_tokenizer(16),
        text_encoder_3=_t5(32, seed + 2),
        tokenizer_3=tiny_tokenizer(16),
    )


def tiny_flux_text_encoders(seed: int = 0) -> dict:
    """CLIP-L (pooled 24) and T5 (32) for `tiny_flux`."""
    return dict(
        text_encoder=_clip(24, None, seed),
        tokenizer=tiny_tokenizer(16),
        text_encoder_2=_t5(32, seed + 1),
        tokenizer_2=tiny_tokenizer(16),
    )


def sd3_pipeline(seed: int = 0, text_encoders: bool = True, **transformer):
    """A tiny StableDiffusion3Pipeline (SD3.5's scheduler: shift 3.0)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    names = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    names += ("text_encoder_3", "tokenizer_3")
    encoders = tiny_sd3_text_encoders(seed) if text_encoders else dict.fromkeys(names)
    return StableDiffusion3Pipeline(
        transformer=tiny_sd3(seed, **transformer),
        vae=tiny_vae(seed),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        **encoders,
    )


def flux_pipeline(seed: int = 0, text_encoders: bool = True, **transformer):
    """A tiny FluxPipeline (FLUX-dev's dynamic shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    names = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    encoders = tiny_flux_text_encoders(seed) if text_encoders else dict.fromkeys(names)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        transformer=tiny_flux(seed, **transformer),
        vae=tiny_vae(seed, scaling_factor=0.3611, shift_factor=0.1159),
        scheduler=scheduler,
        **encoders,
    )
