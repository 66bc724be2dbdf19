# Copyright 2026 The viscpm authors. Licensed under the Apache License, Version 2.0.
"""VisCPM-Chat configuration: a BEiT-3 vision tower, learned queries and the CPM-Bee language model."""

from transformers import PretrainedConfig

from .configuration_beit3 import Beit3VisionConfig
from .configuration_cpmbee import CpmBeeConfig


class VisCPMChatConfig(PretrainedConfig):
    r"""
    Configuration of [`VisCPMChatForConditionalGeneration`]. The defaults describe the released VisCPM-Chat
    (BEiT-3 large at 224 px, 64 queries, CPM-Bee 10B).

    Args:
        vision_config (`Beit3VisionConfig` or `dict`, *optional*): the BEiT-3 vision tower.
        text_config (`CpmBeeConfig` or `dict`, *optional*): the CPM-Bee language model.
        query_num (`int`, defaults to 64): learned queries, i.e. image placeholder tokens in the prompt.
        max_prompt_length (`int`, defaults to 3000): longest prompt accepted (the original's `max_inp_length`).
    """

    model_type = "viscpm_chat"
    sub_configs_defaults = {"vision_config": Beit3VisionConfig, "text_config": CpmBeeConfig}

    def __init__(
        self,
        vision_config: Beit3VisionConfig | dict | None = None,
        text_config: CpmBeeConfig | dict | None = None,
        query_num: int = 64,
        max_prompt_length: int = 3000,
        **kwargs,
    ):
        if not isinstance(vision_config, Beit3VisionConfig):
            vision_config = Beit3VisionConfig(**(vision_config or {}))
        if not isinstance(text_config, CpmBeeConfig):
            text_config = CpmBeeConfig(**(text_config or {}))
        self.vision_config = vision_config
        self.text_config = text_config
        self.query_num = query_num
        self.max_prompt_length = max_prompt_length
        kwargs.setdefault("tie_word_embeddings", text_config.tie_word_embeddings)
        super().__init__(**kwargs)


__all__ = ["VisCPMChatConfig"]
