# Copyright 2026 The viscpm authors. Licensed under the Apache License, Version 2.0.
"""Configuration of the BEiT-3 vision tower of VisCPM-Chat.

The original builds the tower with torchscale's ``EncoderConfig`` (``VisCPM/models/beit3.py``,
``beit3_large_patch16_224``); `Beit3VisionConfig.from_original` reads that config's dict form.
"""

from collections.abc import Mapping

from transformers import PretrainedConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)

# torchscale EncoderConfig settings that change the forward pass, with the only values this port implements
# (those of VisCPM-Chat's `beit3_large_patch16_224`). Anything else is refused by `from_original`.
SUPPORTED_ORIGINAL_SETTINGS = {
    "multiway": True,  # two experts per module: image tokens (A) and text/query tokens (B)
    "subln": True,  # extra LayerNorm inside attention (before out_proj) and inside the FFN (before fc2)
    "encoder_normalize_before": True,  # pre-norm blocks
    "normalize_output": True,  # final multiway LayerNorm after the last layer
    "no_scale_embedding": True,  # token embeddings are not multiplied by sqrt(dim)
    "layernorm_embedding": False,  # no LayerNorm on the embeddings
    "deepnorm": False,  # residual weight 1
    "rel_pos_buckets": 0,  # no relative position bias
    "max_rel_pos": 0,
    "xpos_rel_pos": False,  # no XPos rotation of queries/keys
    "moe_freq": 0,  # no mixture-of-experts layers
    "activation_fn": "gelu",  # exact (erf) GELU
    "share_encoder_input_output_embed": False,
    "no_output_layer": True,  # no vocabulary projection on top
}

# torchscale EncoderConfig field -> Beit3VisionConfig field
ORIGINAL_FIELD_NAMES = {
    "encoder_embed_dim": "hidden_size",
    "encoder_attention_heads": "num_attention_heads",
    "encoder_ffn_embed_dim": "intermediate_size",
    "encoder_layers": "num_hidden_layers",
    "img_size": "image_size",
    "patch_size": "patch_size",
    "in_chans": "num_channels",
    "layernorm_eps": "layer_norm_eps",
    "max_source_positions": "max_source_positions",
    "attention_dropout": "attention_dropout",
    "dropout": "hidden_dropout",
    "activation_dropout": "activation_dropout",
}

# torchscale's own defaults (EncoderConfig.__init__) for every field read here
TORCHSCALE_ENCODER_DEFAULTS = {
    "encoder_embed_dim": 768,
    "encoder_attention_heads": 12,
    "encoder_ffn_embed_dim": 3072,
    "encoder_layers": 12,
    "img_size": 224,
    "patch_size": 16,
    "in_chans": 3,
    "layernorm_eps": 1e-5,
    "max_source_positions": 1024,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "activation_dropout": 0.0,
    "drop_path_rate": 0.0,
    "multiway": False,
    "subln": True,
    "encoder_normalize_before": True,
    "normalize_output": True,
    "no_scale_embedding": True,
    "layernorm_embedding": False,
    "deepnorm": False,
    "rel_pos_buckets": 0,
    "max_rel_pos": 0,
    "xpos_rel_pos": False,
    "moe_freq": 0,
    "activation_fn": "gelu",
    "share_encoder_input_output_embed": False,
    "no_output_layer": False,
}


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

    @classmethod
    def from_original(cls, encoder_config: Mapping, **kwargs) -> "Beit3VisionConfig":
        """The config of an original torchscale ``EncoderConfig``, given as a dict (its ``__dict__``).

        Keys the dict lacks take torchscale's defaults (not this class's). Raises `ValueError` for settings that
        change the forward pass in a way this port does not implement. ``drop_path_rate`` (stochastic depth, a
        training-only regulariser) is not implemented and is ignored with a warning.
        """
        original = {**TORCHSCALE_ENCODER_DEFAULTS, **encoder_config}
        unsupported = {
            name: original[name] for name, value in SUPPORTED_ORIGINAL_SETTINGS.items() if original[name] != value
        }
        if unsupported:
            raise ValueError(
                f"unsupported torchscale EncoderConfig settings {unsupported}; this port implements "
                + ", ".join(f"{name}={value!r}" for name, value in SUPPORTED_ORIGINAL_SETTINGS.items())
            )
        if original["drop_path_rate"]:
            logger.warning(
                "drop_path_rate=%s (stochastic depth) is not implemented; ignored", original["drop_path_rate"]
            )
        return cls(**{ours: original[theirs] for theirs, ours in ORIGINAL_FIELD_NAMES.items()}, **kwargs)


__all__ = ["Beit3VisionConfig"]
