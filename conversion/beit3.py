"""The BEiT-3 vision tower of an original VisCPM-Chat checkpoint, in and out of `Beit3VisionModel`.

The original checkpoint keeps the tower under ``vpm.beit3.`` (``VLU_CPMBee.vpm`` is the ``BEiT3Wrapper``, whose
``beit3`` is torchscale's ``BEiT3``). `Beit3VisionModel` keeps torchscale's module tree except for:

* the multiway experts ``A`` / ``B`` are named ``image`` / ``text``;
* the embeddings live under ``embeddings.``: ``vision_embed.proj`` -> ``embeddings.patch_embedding``,
  ``vision_embed.cls_token`` -> ``embeddings.cls_token``, and the multiway position table
  ``encoder.embed_positions.{A,B}`` -> ``embeddings.{image,text}_position_embedding``.

Original tensors that `Beit3VisionModel` does not have (the key map returns ``None`` for them):

* ``vpm.mim_head.*``: a ``Linear(1024, 8192)`` masked-image-modelling head that ``BEiT3Wrapper`` hard-codes and no
  forward uses;
* ``vpm.beit3.text_embed.weight``: BEiT-3's token embedding (64010 rows); VisCPM never feeds text to BEiT-3 and
  reads it only once, at construction, to initialise two of its learned queries;
* ``vpm.beit3.vision_embed.mask_token``: the masked-patch token of BEiT-3 pre-training, unused without
  ``vision_masked_position``.

They cannot be recomputed from the model, so writing a checkpoint back in the original layout has to carry them
over from the source checkpoint (`DROPPED_ORIGINAL_PREFIXES` names them).
"""

from collections.abc import Mapping

from transformers.utils import logging

from ..modeling.configuration_beit3 import Beit3VisionConfig

logger = logging.get_logger(__name__)

# `VLU_CPMBee.vpm` (BEiT3Wrapper) -> `.beit3` (torchscale BEiT3)
BEIT3_PREFIX = "vpm.beit3."

# original keys (or key prefixes, ending in '.') that have no counterpart in `Beit3VisionModel`: see the module doc
DROPPED_ORIGINAL_PREFIXES = ("vpm.mim_head.", "vpm.beit3.text_embed.", "vpm.beit3.vision_embed.mask_token")

# whole modules that moved (original name under `vpm.beit3.` -> our name); everything else keeps its name
MOVED_MODULES = {
    "vision_embed.cls_token": "embeddings.cls_token",
    "vision_embed.proj": "embeddings.patch_embedding",
    "encoder.embed_positions.A": "embeddings.image_position_embedding",
    "encoder.embed_positions.B": "embeddings.text_position_embedding",
}

# multiway experts: the `A` / `B` child of a torchscale MultiwayNetwork -> the `image` / `text` child of Beit3Multiway
EXPERT_NAMES = {"A": "image", "B": "text"}


# torchscale EncoderConfig settings that change the forward pass, with the only values this port implements
# (those of VisCPM-Chat's `beit3_large_patch16_224`). Anything else is refused by `beit3_config_from_original`.
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


def beit3_config_from_original(encoder_config: Mapping, **kwargs) -> Beit3VisionConfig:
    """The config of an original torchscale ``EncoderConfig``, given as a dict (its ``__dict__``).

    Keys the dict lacks take torchscale's defaults (not `Beit3VisionConfig`'s). Raises `ValueError` for settings
    that change the forward pass in a way this port does not implement. ``drop_path_rate`` (stochastic depth, a
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
        logger.warning("drop_path_rate=%s (stochastic depth) is not implemented; ignored", original["drop_path_rate"])
    return Beit3VisionConfig(**{ours: original[theirs] for theirs, ours in ORIGINAL_FIELD_NAMES.items()}, **kwargs)


def _is_dropped(original_key: str) -> bool:
    return any(
        original_key == prefix or (prefix.endswith(".") and original_key.startswith(prefix))
        for prefix in DROPPED_ORIGINAL_PREFIXES
    )


def _rename(name: str, moves: Mapping[str, str], experts: Mapping[str, str]) -> str:
    for source, target in moves.items():
        if name == source or name.startswith(source + "."):
            return target + name[len(source) :]
    return ".".join(experts.get(part, part) for part in name.split("."))


def beit3_key(original_key: str, prefix: str = BEIT3_PREFIX) -> str | None:
    """Original checkpoint key -> `Beit3VisionModel` key; ``None`` for keys that are not the tower's or are dropped.

    A key under ``prefix`` that the tower does not know maps to a name the model lacks, so loading reports it.
    """
    if _is_dropped(original_key) or not original_key.startswith(prefix):
        return None
    return _rename(original_key[len(prefix) :], MOVED_MODULES, EXPERT_NAMES)


def original_beit3_key(key: str, prefix: str = BEIT3_PREFIX) -> str:
    """`Beit3VisionModel` key -> original checkpoint key (the inverse of `beit3_key`)."""
    moves = {ours: theirs for theirs, ours in MOVED_MODULES.items()}
    experts = {ours: theirs for theirs, ours in EXPERT_NAMES.items()}
    return prefix + _rename(key, moves, experts)
