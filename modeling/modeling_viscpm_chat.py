# Copyright 2026 The viscpm authors. Licensed under the Apache License, Version 2.0.
"""VisCPM-Chat: BEiT-3 encodes the image together with learned queries, an MLP maps the query outputs into the
pivot language model's width, and they replace the image placeholder tokens of the prompt.

The pivot is CPM-Bee (the released model: its structured prompt, position bias and the original's decoding), or any
causal LM transformers builds with `AutoModelForCausalLM` (MpM on another multilingual LLM: its own tokenizer, chat
template, cache and attention; docs/mpm-recipe.md).

Module names follow the original `VLU_CPMBee` (`vpm`, `query`, `mapping`, `llm`) so that its checkpoints map onto
this model with a plain key map (`viscpm.conversion.chat`).
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import ModelOutput
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_viscpm_chat import VisCPMChatConfig, route_attention
from .modeling_beit3 import Beit3VisionModel
from .modeling_cpmbee import CpmBeeForCausalLM, CpmBeeGenerationMixin, CpuFourBitLoadingMixin

# The original's `VisCPMChat.chat` settings (beam search over at most max_length=512 + 2 tokens, see
# docs/cpmbee.md "Decoding like the original").
CHAT_GENERATION_DEFAULTS = dict(
    num_beams=3,
    do_sample=False,
    cpmbee_temperature=0.7,
    repetition_penalty=1.1,
    length_penalty=3.0,
    early_stopping=False,  # the original's stopping test (CpmBeeGenerationMixin._update_finished_beams)
    max_new_tokens=514,
)


@dataclass
class VisCPMChatOutput(ModelOutput):
    """CPM-Bee's causal LM output plus the image features that were placed in the prompt."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    vision_hidden_states: torch.FloatTensor | None = None


def place_image_features(
    inputs_embeds: torch.Tensor, image_features: torch.Tensor, image_bound: torch.Tensor
) -> torch.Tensor:
    """Write each row's image features over its image placeholder tokens (the original's scatter).

    `image_features` is (batch, query_num, dim); `image_bound` is (batch, 1, 2) or (batch, 2): the `[start, end)`
    of each row's placeholders, which must span exactly `query_num` tokens.
    """
    bounds = image_bound.reshape(image_bound.shape[0], -1, 2)[:, 0].to(inputs_embeds.device)
    query_num = image_features.shape[1]
    if not torch.all(bounds[:, 1] - bounds[:, 0] == query_num):
        raise ValueError(
            f"image_bound {bounds.tolist()} does not span the {query_num} image features of each row: the prompt's "
            f"image placeholder must hold query_num={query_num} `<unk>` tokens (build it with VisCPMChatProcessor)"
        )
    positions = bounds[:, :1] + torch.arange(query_num, device=bounds.device)
    index = positions[..., None].expand(-1, -1, inputs_embeds.shape[-1])
    return inputs_embeds.scatter(1, index, image_features.to(inputs_embeds.dtype))


class VisCPMChatPreTrainedModel(CpuFourBitLoadingMixin, PreTrainedModel):
    config_class = VisCPMChatConfig
    config: VisCPMChatConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _no_split_modules = ["Beit3EncoderLayer"]  # and the pivot's own
    _supports_sdpa = True
    # a FlashAttention request runs the vision tower; CPM-Bee falls back to FlexAttention (`route_attention`)
    _supports_flash_attn = True
    _supports_flex_attn = True
    _can_compile_fullgraph = False

    def set_attn_implementation(self, attn_implementation, *args, **kwargs):
        requested = route_attention(attn_implementation, self.config.text_config)
        return super().set_attn_implementation(requested, *args, **kwargs)

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, VisCPMChatForConditionalGeneration):
            # the original draws the queries from a truncated normal (std 0.02)
            init.trunc_normal_(module.query, std=0.02)


class VisCPMChatForConditionalGeneration(VisCPMChatPreTrainedModel, CpmBeeGenerationMixin):
    def __init__(self, config: VisCPMChatConfig):
        super().__init__(config)
        text_config = config.text_config
        vision_width, text_width = config.vision_config.hidden_size, text_config.hidden_size
        self.vpm = Beit3VisionModel(config.vision_config)
        self.query = nn.Parameter(torch.empty(config.query_num, vision_width))
        self.mapping = nn.Sequential(nn.Linear(vision_width, text_width), nn.GELU(), nn.Linear(text_width, text_width))
        if config.pivot_is_cpmbee:
            self.llm = CpmBeeForCausalLM(text_config)
            defaults = CHAT_GENERATION_DEFAULTS
        else:
            self.llm = AutoModelForCausalLM.from_config(text_config)
            # another pivot decodes as transformers does, greedy by default
            defaults = {"max_new_tokens": CHAT_GENERATION_DEFAULTS["max_new_tokens"]}
        self.post_init()
        self.generation_config = GenerationConfig(
            bos_token_id=getattr(text_config, "bos_token_id", None),
            eos_token_id=getattr(text_config, "eos_token_id", None),
            pad_token_id=getattr(text_config, "pad_token_id", None),
            **defaults,
        )

    # Decoding: the CPM-Bee pivot decodes like the original (`CpmBeeGenerationMixin`: its logits processing, beam
    # bookkeeping and shared prefill); another pivot as transformers decodes any causal LM.

    def generate(self, *args, **kwargs):
        if self.config.pivot_is_cpmbee:
            return super().generate(*args, **kwargs)
        return GenerationMixin.generate(self, *args, **kwargs)

    def _update_finished_beams(self, **kwargs):
        if self.config.pivot_is_cpmbee:
            return super()._update_finished_beams(**kwargs)
        return GenerationMixin._update_finished_beams(self, **kwargs)

    def _check_early_stop_heuristic(self, is_early_stop_heuristic_unsatisfied, **kwargs):
        owner = CpmBeeGenerationMixin if self.config.pivot_is_cpmbee else GenerationMixin
        return owner._check_early_stop_heuristic(is_early_stop_heuristic_unsatisfied, **kwargs)

    def get_input_embeddings(self):
        return self.llm.get_input_embeddings()

    def get_output_embeddings(self):
        return self.llm.get_output_embeddings()

    def save_pretrained(self, save_directory, *args, **kwargs):
        self.name_second_auto_class()
        return super().save_pretrained(save_directory, *args, **kwargs)

    def name_second_auto_class(self) -> None:
        """`register_for_auto_class` puts one Auto class (AutoModel) in the config's `auto_map`; the model answers
        AutoModelForImageTextToText too, which a folder loaded as remote code needs to name as well."""
        if self._auto_class is not None:
            reference = f"{type(self).__module__.split('.')[-1]}.{type(self).__name__}"
            auto_map = getattr(self.config, "auto_map", None) or {}
            self.config.auto_map = {**auto_map, "AutoModelForImageTextToText": reference}

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image features in the pivot's width, one per query: (batch, query_num, hidden_size)."""
        pixel_values = pixel_values.to(self.query.dtype)
        query_outputs = self.vpm(pixel_values, query_embeds=self.query).query_hidden_states
        return self.mapping(query_outputs)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        vision_hidden_states: torch.FloatTensor | None = None,
        image_bound: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int = 0,
        logits_transform=None,
        **kwargs,
    ) -> VisCPMChatOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch, 3, image_size, image_size)`, *optional*):
            The images, as [`VisCPMChatImageProcessor`] prepares them.
        vision_hidden_states (`torch.FloatTensor` of shape `(batch, query_num, dim_model)`, *optional*):
            Image features computed earlier (a previous turn of the same conversation); used instead of
            `pixel_values`.
        image_bound (`torch.LongTensor` of shape `(batch, 1, 2)`):
            `[start, end)` of each row's image placeholder tokens, in the positions of `input_ids`.

        The other arguments, CPM-Bee's structure inputs among them (keyword arguments), are those of
        [`CpmBeeForCausalLM.forward`] for the CPM-Bee pivot; another pivot takes
        `input_ids`, `attention_mask`, `inputs_embeds`, `cache`, `labels`, `use_cache`, `output_hidden_states` and
        `logits_to_keep` (its position ids follow the attention mask: prompts are padded on the left).
        """
        if vision_hidden_states is None and pixel_values is not None:
            vision_hidden_states = self.get_image_features(pixel_values)
        query_length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        if vision_hidden_states is not None and inputs_embeds is None:
            if image_bound is None:
                raise ValueError("image features need `image_bound`, the positions of the image placeholder tokens")
            if self.config.pivot_is_cpmbee:
                input_id_subs = kwargs.get("input_id_subs")
                query_subs = None if input_id_subs is None else input_id_subs[:, -query_length:]
                inputs_embeds = self.llm.model.embed_tokens(
                    input_ids, query_subs, kwargs.get("ext_table_ids"), kwargs.get("ext_table_sub")
                )
            else:
                inputs_embeds = self.llm.get_input_embeddings()(input_ids)
            # image_bound counts from the start of the whole sequence; these embeddings are its last tokens
            sequence_length = attention_mask.shape[1] if attention_mask is not None else query_length
            inputs_embeds = place_image_features(
                inputs_embeds, vision_hidden_states, image_bound - (sequence_length - query_length)
            )
            input_ids = None

        if not self.config.pivot_is_cpmbee:  # transformers' causal LM arguments
            position_ids = None
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -query_length:]
            outputs = self.llm(
                input_ids=input_ids,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                labels=labels,
                use_cache=use_cache,
                output_hidden_states=output_hidden_states,
                logits_to_keep=logits_to_keep,
                # the Trainer's count of the labelled tokens of the optimizer step: the loss is normalised by it
                num_items_in_batch=kwargs.get("num_items_in_batch"),
            )
        else:
            outputs = self.llm(
                input_ids=input_ids,
                attention_mask=attention_mask,
                inputs_embeds=inputs_embeds,
                cache=cache,
                labels=labels,
                use_cache=use_cache,
                output_hidden_states=output_hidden_states,
                logits_to_keep=logits_to_keep,
                logits_transform=logits_transform,
                **kwargs,
            )
        return VisCPMChatOutput(
            loss=outputs.loss,
            logits=outputs.logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            vision_hidden_states=vision_hidden_states,
        )

    # the image's inputs: its features enter the cache with the prompt, and no later step reads them
    _PROMPT_ONLY_INPUTS = ("pixel_values", "vision_hidden_states", "image_bound")

    def prepare_inputs_for_generation(
        self, input_ids, inputs_embeds=None, answer_logits_processor=None, is_first_iteration=False, **kwargs
    ):
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            inputs_embeds=inputs_embeds,
            answer_logits_processor=answer_logits_processor,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        if not is_first_iteration and model_inputs.get("use_cache", True):
            # the image features live in the cache after the prompt's forward
            for name in self._PROMPT_ONLY_INPUTS:
                model_inputs.pop(name, None)
        return model_inputs

    @torch.no_grad()
    def chat(
        self,
        image,
        question,
        processor,
        context="",
        vision_hidden_states=None,
        return_token_ids: bool = False,
        **generate_kwargs,
    ):
        """One turn of the original `VisCPMChat.chat`: returns `(answer, context, vision_hidden_states)`.

        `context` is the conversation so far (`"User: ...\\nAI: ...\\n"` per turn) and `vision_hidden_states` the
        features returned by the previous turn, to skip the vision tower. Lists of images, questions (and contexts)
        chat in a batch and return lists. `generate_kwargs` override the chat defaults (`generation_config.json`),
        e.g. `num_beams=1` or `streamer=TextIteratorStreamer(...)` (greedy or sampling only).
        `return_token_ids=True` adds a fourth item: the generated ids of each answer up to and including its first
        `</s>` (a list of ints, a list of those for a batch; ids >= vocab_size index the row's ext table).
        """
        batched = isinstance(question, (list, tuple))
        questions = list(question) if batched else [question]
        contexts = list(context) if isinstance(context, (list, tuple)) else [context] * len(questions)
        if vision_hidden_states is None:
            images = list(image) if batched else [image]
            inputs = processor(images=images, text=questions, context=contexts, return_tensors="pt")
            vision_hidden_states = self.get_image_features(inputs.pop("pixel_values").to(self.device))
        else:
            inputs = processor(text=questions, context=contexts, return_tensors="pt")
        inputs = inputs.to(self.device)
        sequences = self.generate(**inputs, vision_hidden_states=vision_hidden_states, **generate_kwargs)
        generated = sequences[:, inputs["input_ids"].shape[1] :]
        answers = processor.decode_answers(generated, inputs.ext_tables)
        new_contexts = [
            f"{previous}User: {asked}\nAI: {answer}\n" for previous, asked, answer in zip(contexts, questions, answers)
        ]
        if not batched:
            answers, new_contexts = answers[0], new_contexts[0]
        if not return_token_ids:
            return answers, new_contexts, vision_hidden_states
        token_ids = processor.answer_token_ids(generated)
        return answers, new_contexts, vision_hidden_states, token_ids if batched else token_ids[0]


__all__ = ["VisCPMChatForConditionalGeneration", "VisCPMChatOutput", "VisCPMChatPreTrainedModel"]
