"""VisCPM-Chat training: which parameters each MpM stage trains, and LoRA / QLoRA through peft.

Stage 1 (`chat-pretrain`, the MpM alignment on English image-caption pairs): the pivot (CPM-Bee or another)
frozen; BEiT-3's language experts (through which the queries run), its text position table, the queries and the
mapping trained; the vision experts only with `tune_vision`. Stage 2 (`chat-sft`): everything, or LoRA adapters.
In every stage the patch embedding (and the class token beside it) stays frozen, as in the original
(`vision_embed.requires_grad_(False)`).
"""

from __future__ import annotations

import re

import torch
from torch import nn

# CPM-Bee's projections: attention (q, k, v, out) and the gated feed-forward (w_0, w_1, w_out)
DEFAULT_LORA_TARGETS = ("project_q", "project_k", "project_v", "attention_out", "w_0", "w_1", "w_out")


def is_vision_expert(name: str) -> bool:
    """A BEiT-3 parameter of the image ("A") experts: what the original's `stop_gradient_by_name('A')` freezes."""
    return ".image." in f".{name}" or name.startswith("embeddings.image_position_embedding")


def is_pivot_parameter(name: str) -> bool:
    """A parameter of VisCPM-Chat's pivot (`llm`), under any wrapper's prefix (peft, FSDP)."""
    return name.startswith("llm.") or ".llm." in name


def give_the_pivot_its_learning_rate(optimizer: torch.optim.Optimizer, model: nn.Module, learning_rate: float) -> None:
    """Every parameter group of `optimizer`, before its first step, split in two: the pivot's parameters at
    `learning_rate`, and the rest as they were, first, so that the Trainer's logged learning rate stays theirs. The
    schedule scales each group's own rate."""
    pivot = {id(parameter) for name, parameter in model.named_parameters() if is_pivot_parameter(name)}
    groups = list(optimizer.param_groups)
    optimizer.param_groups.clear()
    for group in groups:
        split = {False: [], True: []}
        for parameter in group["params"]:
            split[id(parameter) in pivot].append(parameter)
        for parameters, rate in ((split[False], group["lr"]), (split[True], learning_rate)):
            if parameters:
                optimizer.add_param_group({**group, "params": parameters, "lr": rate})


def set_chat_trainable(model: nn.Module, tune_llm: bool, tune_vision: bool) -> None:
    model.requires_grad_(True)
    model.vpm.embeddings.patch_embedding.requires_grad_(False)
    model.vpm.embeddings.cls_token.requires_grad_(False)
    if not tune_vision:
        for name, parameter in model.vpm.named_parameters():
            if is_vision_expert(name):
                parameter.requires_grad_(False)
    if not tune_llm:
        model.llm.requires_grad_(False)


def trainable_summary(model: nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{trainable:,} of {total:,} parameters trained ({100 * trainable / max(total, 1):.2f}%)"


def bitsandbytes_config(quantization: str | None):
    if quantization is None:
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32,
        )
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"lora.quantization must be nf4, int8 or null, got {quantization!r}")


def default_lora_targets(model: nn.Module) -> list[str] | str:
    """CPM-Bee's projections; for another pivot, the modules peft adapts in that model type by default, inside the
    pivot only (a regex: BEiT-3 has its own `q_proj` and `v_proj`)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    if model.config.pivot_is_cpmbee:
        return list(DEFAULT_LORA_TARGETS)
    model_type = model.config.text_config.model_type
    names = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if not names:
        raise ValueError(f"peft has no default LoRA targets for {model_type!r} pivots: set lora.target_modules")
    return rf"llm\..*\.({'|'.join(re.escape(name) for name in names)})"


def add_lora(model: nn.Module, lora: dict, quantized: bool, gradient_checkpointing: bool) -> nn.Module:
    """peft LoRA adapters on `lora["target_modules"]` (by default `default_lora_targets`); the base stays frozen."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    config = LoraConfig(
        r=lora.get("r", 8),
        lora_alpha=lora.get("alpha", 16),
        lora_dropout=lora.get("dropout", 0.05),
        target_modules=lora.get("target_modules") or default_lora_targets(model),
        modules_to_save=lora.get("modules_to_save"),
        bias="none",
    )
    return get_peft_model(model, config)
