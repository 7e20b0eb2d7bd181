"""The transformer configs of the released checkpoints, and tiny twins of them
for offline tests, benchmarks and `--quick` runs (random weights)."""

_CONFIGS = {
    # the released transformer/config.json of each checkpoint (entries left at
    # diffusers' defaults are left out, as there)
    "sd3.5-medium": dict(
        _class_name="SD3Transformer2DModel",
        sample_size=128,
        patch_size=2,
        in_channels=16,
        num_layers=24,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        out_channels=16,
        pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)),
        qk_norm="rms_norm",
    ),
    "sd3.5-large": dict(
        _class_name="SD3Transformer2DModel",
        sample_size=128,
        patch_size=2,
        in_channels=16,
        num_layers=38,
        attention_head_dim=64,
        num_attention_heads=38,
        joint_attention_dim=4096,
        caption_projection_dim=2432,
        pooled_projection_dim=2048,
        out_channels=16,
        pos_embed_max_size=192,
        dual_attention_layers=(),
        qk_norm="rms_norm",
    ),
    "flux.1-dev": dict(
        _class_name="FluxTransformer2DModel",
        patch_size=1,
        in_channels=64,
        num_layers=19,
        num_single_layers=38,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ),
    # SD3.5-Medium-like: RMS qk-norm, a dual-attention (MMDiT-X) first block;
    # caption_projection_dim must equal heads x head_dim
    "tiny-sd3": dict(
        _class_name="SD3Transformer2DModel",
        sample_size=32,
        patch_size=2,
        in_channels=16,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=24,
        out_channels=16,
        pos_embed_max_size=32,
        qk_norm="rms_norm",
        dual_attention_layers=(0,),
    ),
    # FLUX-dev-like: guidance embedding; axes_dims_rope must sum to head_dim
    "tiny-flux": dict(
        _class_name="FluxTransformer2DModel",
        patch_size=1,
        in_channels=64,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=24,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ),
}


def transformer_config(name: str) -> dict:
    """A transformer config by name, as diffusers' `config.json` holds it
    (`_class_name` included): `"sd3.5-medium"`, `"sd3.5-large"`, `"flux.1-dev"`
    (the released architectures, for random-weight benchmarks), or `"tiny-sd3"`,
    `"tiny-flux"` (a few layers and small widths with every feature of the real
    ones, for offline tests and `--quick` runs). Build the diffusers model with
    `SD3Transformer2DModel(**{k: v for k, v in config.items() if k[0] != "_"})`."""
    if name not in _CONFIGS:
        raise ValueError(f"unknown config {name!r}; known: {sorted(_CONFIGS)}.")
    return dict(_CONFIGS[name])
