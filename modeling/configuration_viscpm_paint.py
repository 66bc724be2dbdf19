# Copyright 2026 The viscpm authors. Licensed under the Apache License, Version 2.0.
"""VisCPM-Paint configuration: CPM-Bee as the text encoder, a bridge to the UNet's width, a Stable Diffusion UNet."""

import copy

from transformers import PretrainedConfig

from .configuration_cpmbee import CpmBeeConfig

# The UNet of Stable Diffusion 2.1 base (`stabilityai/stable-diffusion-2-1-base`, `unet/config.json`), which the
# original builds from config and fills from the VisCPM-Paint checkpoint. Keys not given take diffusers' defaults.
SD21_BASE_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "upcast_attention": False,
    "norm_num_groups": 32,
    "norm_eps": 1e-05,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "center_input_sample": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dual_cross_attention": False,
    "only_cross_attention": False,
}


class VisCPMPaintConfig(PretrainedConfig):
    r"""
    Configuration of [`VisCPMPaintModel`] and of its text encoder [`VisCPMPaintTextEncoder`]. The defaults describe
    the released VisCPM-Paint (CPM-Bee 10B, the UNet of Stable Diffusion 2.1 base).

    Args:
        text_config (`CpmBeeConfig` or `dict`, *optional*): the CPM-Bee text encoder.
        unet_config (`dict`, *optional*): the `diffusers.UNet2DConditionModel` config (its `config.json` as a dict).
            Its `cross_attention_dim` is the bridge's output width.
        bridge_eps (`float`, defaults to 1e-6): epsilon of the bridge's LayerNorm (the original `CPMBeeTransBlock`).
        max_prompt_length (`int`, defaults to 3000): most tokens a prompt may encode to (the structured input
            `{'caption': prompt, 'objects': ''}`, special tokens included), as VisCPM-Chat's `max_prompt_length`.
    """

    model_type = "viscpm_paint"
    sub_configs_defaults = {"text_config": CpmBeeConfig}

    def __init__(
        self,
        text_config: CpmBeeConfig | dict | None = None,
        unet_config: dict | None = None,
        bridge_eps: float = 1e-6,
        max_prompt_length: int = 3000,
        **kwargs,
    ):
        if not isinstance(text_config, CpmBeeConfig):
            text_config = CpmBeeConfig(**(text_config or {}))
        unet_config = copy.deepcopy(dict(unet_config) if unet_config is not None else SD21_BASE_UNET_CONFIG)
        if not isinstance(unet_config.get("cross_attention_dim"), int):
            raise ValueError(
                "unet_config needs an integer `cross_attention_dim` (the width the bridge maps CPM-Bee's hidden states "
                f"to), got {unet_config.get('cross_attention_dim')!r}"
            )
        self.text_config = text_config
        self.unet_config = unet_config
        self.bridge_eps = bridge_eps
        self.max_prompt_length = max_prompt_length
        super().__init__(**kwargs)

    @property
    def cross_attention_dim(self) -> int:
        """Width of the UNet's cross-attention context, i.e. of the bridge's output."""
        return self.unet_config["cross_attention_dim"]


class VisCPMPaintTextEncoderConfig(VisCPMPaintConfig):
    r"""
    Configuration of [`VisCPMPaintTextEncoder`], the `text_encoder/` of a VisCPM-Paint pipeline folder: the fields of
    [`VisCPMPaintConfig`] (the UNet's config tells the bridge's width), under its own model type so that `AutoModel`
    tells the text encoder from the whole model.
    """

    model_type = "viscpm_paint_text_encoder"

    # an old-style config subclass needs its own __init__, or transformers skips the parent's
    def __init__(
        self,
        text_config: CpmBeeConfig | dict | None = None,
        unet_config: dict | None = None,
        bridge_eps: float = 1e-6,
        max_prompt_length: int = 3000,
        **kwargs,
    ):
        super().__init__(
            text_config=text_config,
            unet_config=unet_config,
            bridge_eps=bridge_eps,
            max_prompt_length=max_prompt_length,
            **kwargs,
        )

    @classmethod
    def from_paint_config(cls, config: VisCPMPaintConfig) -> "VisCPMPaintTextEncoderConfig":
        """The text encoder's config of a whole model's config."""
        return cls(
            text_config=config.text_config,
            unet_config=config.unet_config,
            bridge_eps=config.bridge_eps,
            max_prompt_length=config.max_prompt_length,
            dtype=config.dtype,
        )


__all__ = ["SD21_BASE_UNET_CONFIG", "VisCPMPaintConfig", "VisCPMPaintTextEncoderConfig"]
