# Copyright 2026 The viscpm authors. Licensed under the Apache License, Version 2.0.
"""VisCPM-Chat configuration: a BEiT-3 vision tower, learned queries and the pivot language model (CPM-Bee, or any
transformers causal LM)."""

from transformers import CONFIG_MAPPING, PretrainedConfig
from transformers.utils import logging

from .configuration_beit3 import Beit3VisionConfig
from .configuration_cpmbee import CpmBeeConfig

logger = logging.get_logger(__name__)

# CPM-Bee adds a learned position bias to every attention score; FlashAttention kernels take no bias, FlexAttention
# computes it inside its score function.
LANGUAGE_MODEL_FALLBACK_ATTENTION = "flex_attention"


def route_attention(requested, text_config=None):
    """A FlashAttention request for the whole model: FlashAttention for the BEiT-3 tower (no bias), FlexAttention
    for CPM-Bee. Anything else (another name, a per-sub-config dict, another pivot) is used as given."""
    if not (isinstance(requested, str) and "flash" in requested) or not is_cpmbee(text_config):
        return requested
    logger.warning_once(
        f"attn_implementation={requested!r} runs the BEiT-3 vision tower; CPM-Bee adds a position bias to its "
        f"attention scores, which FlashAttention cannot take, so the language model uses "
        f"{LANGUAGE_MODEL_FALLBACK_ATTENTION!r} (pass a dict keyed by sub-config to choose otherwise)"
    )
    return {"": requested, "vision_config": requested, "text_config": LANGUAGE_MODEL_FALLBACK_ATTENTION}


def is_cpmbee(text_config) -> bool:
    """Whether the pivot is CPM-Bee (None: the default, which is). By model type: loaded as remote code, the config
    classes come from a copy of this package's modules."""
    return text_config is None or text_config.model_type == CpmBeeConfig.model_type


def pivot_config(text_config: PretrainedConfig | dict | None) -> PretrainedConfig:
    """The pivot's config: CPM-Bee's by default and for a dict without a `model_type` (the released folders), else
    the transformers config class its `model_type` names."""
    if isinstance(text_config, PretrainedConfig):
        return text_config
    text_config = dict(text_config or {})
    model_type = text_config.pop("model_type", CpmBeeConfig.model_type)
    if model_type == CpmBeeConfig.model_type:
        return CpmBeeConfig(**text_config)
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"text_config has model_type {model_type!r}, which transformers does not know")
    return CONFIG_MAPPING[model_type](**text_config)


class VisCPMChatConfig(PretrainedConfig):
    r"""
    Configuration of [`VisCPMChatForConditionalGeneration`]. The defaults describe the released VisCPM-Chat
    (BEiT-3 large at 224 px, 64 queries, CPM-Bee 10B).

    Args:
        vision_config (`Beit3VisionConfig` or `dict`, *optional*): the BEiT-3 vision tower.
        text_config (`PretrainedConfig` or `dict`, *optional*): the pivot language model: CPM-Bee (the default; a
            dict without `model_type` is CPM-Bee's), or the config of any model `AutoModelForCausalLM` builds
            (Llama, Qwen2, Gemma, BLOOM, ...; a dict names it by `model_type`).
        query_num (`int`, defaults to 64): learned queries, i.e. image placeholder tokens in the prompt.
        max_prompt_length (`int`, defaults to 3000): longest prompt accepted (the original's `max_inp_length`).
    """

    model_type = "viscpm_chat"
    sub_configs_defaults = {"vision_config": Beit3VisionConfig, "text_config": CpmBeeConfig}

    def __init__(
        self,
        vision_config: Beit3VisionConfig | dict | None = None,
        text_config: PretrainedConfig | dict | None = None,
        query_num: int = 64,
        max_prompt_length: int = 3000,
        **kwargs,
    ):
        if not isinstance(vision_config, Beit3VisionConfig):
            vision_config = Beit3VisionConfig(**(vision_config or {}))
        self.vision_config = vision_config
        self.text_config = text_config = pivot_config(text_config)
        self.query_num = query_num
        self.max_prompt_length = max_prompt_length
        kwargs.setdefault("tie_word_embeddings", getattr(text_config, "tie_word_embeddings", False))
        super().__init__(**kwargs)

    @property
    def pivot_is_cpmbee(self) -> bool:
        return is_cpmbee(self.text_config)

    @property
    def _attn_implementation(self):
        return self._attn_implementation_internal

    @_attn_implementation.setter
    def _attn_implementation(self, value):
        PretrainedConfig._attn_implementation.fset(self, route_attention(value, getattr(self, "text_config", None)))


__all__ = ["VisCPMChatConfig"]
