# Copyright 2026 The viscpm authors. Licensed under the Apache License, Version 2.0.
"""Configuration of the BEiT-3 vision tower of VisCPM-Chat.

The original builds the tower with torchscale's ``EncoderConfig`` (``VisCPM/models/beit3.py``,
``beit3_large_patch16_224``); the converter (`viscpm.conversion.beit3`) reads that config's dict form.
"""

from transformers import PretrainedConfig


class Beit3VisionConfig(PretrainedConfig):
    r"""
    Configuration of the BEiT-3 vision tower ([`Beit3VisionModel`]) that VisCPM-Chat runs on the image together
    with its learned queries. The defaults describe the released VisCPM-Chat tower, BEiT-3 large at 224x224.

    Args:
        hidden_size (`int`, defaults to 1024): width of the encoder (`encoder_embed_dim`).
        num_attention_heads (`int`, defaults to 16): attention heads (`encoder_attention_heads`).
        intermediate_size (`int`, defaults to 4096): inner width of the feed-forward (`encoder_ffn_embed_dim`).
        num_hidden_layers (`int`, defaults to 24): encoder layers (`encoder_layers`).
        image_size (`int`, defaults to 224): side of the square input image (`img_size`).
        patch_size (`int`, defaults to 16): side of a square patch (`patch_size`).
        num_channels (`int`, defaults to 3): input channels (`in_chans`).
        layer_norm_eps (`float`, defaults to 1e-5): epsilon of every LayerNorm (`layernorm_eps`).
        max_source_positions (`int`, defaults to 1024): rows of the text-expert position table (`max_source_positions`);
            query tokens use rows 2 .. num_queries + 1, so at most `max_source_positions - 2` queries.
        attention_dropout (`float`, defaults to 0.0): dropout on attention probabilities (`attention_dropout`).
        hidden_dropout (`float`, defaults to 0.0): dropout on embeddings and sub-layer outputs (`dropout`).
        activation_dropout (`float`, defaults to 0.0): dropout after the FFN activation (`activation_dropout`).
        initializer_range (`float`, defaults to 0.02): std of the truncated normal init of projections.
    """

    model_type = "viscpm_beit3"

    def __init__(
        self,
        hidden_size: int = 1024,
        num_attention_heads: int = 16,
        intermediate_size: int = 4096,
        num_hidden_layers: int = 24,
        image_size: int = 224,
        patch_size: int = 16,
        num_channels: int = 3,
        layer_norm_eps: float = 1e-5,
        max_source_positions: int = 1024,
        attention_dropout: float = 0.0,
        hidden_dropout: float = 0.0,
        activation_dropout: float = 0.0,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be divisible by num_attention_heads ({num_attention_heads})"
            )
        if image_size % patch_size:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.layer_norm_eps = layer_norm_eps
        self.max_source_positions = max_source_positions
        self.attention_dropout = attention_dropout
        self.hidden_dropout = hidden_dropout
        self.activation_dropout = activation_dropout
        self.initializer_range = initializer_range
        super().__init__(**kwargs)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_image_tokens(self) -> int:
        """The [cls] token plus one token per patch: the tokens of the image (A) expert."""
        return self.num_patches + 1


__all__ = ["Beit3VisionConfig"]
