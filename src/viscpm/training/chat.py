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


def set_chat_trainable(model: nn.Module, tune_llm: bool, tune_vision: bool, tune_patch_embedding: bool = False) -> None:
    model.requires_grad_(True)
    if not tune_patch_embedding:  # the original's: BEiT-3's pretrained patch embedding (and class token) stays
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


def caption_distillation_loss(model: nn.Module, student: dict, student_outputs, teacher: dict) -> torch.Tensor:
    """Stage 1's feature target: the pivot's states after the image, made to match its states after the image's
    caption written in the image slot (`teacher`, the same sample with the caption's tokens there; the frozen pivot
    reads it without gradient). MpM's premise is that the image is read as the pivot reads its description; the
    caption's tokens train the image only on the answer, these targets on every layer's reading of it, at every
    token after it (the request, the answer), which is what later questions about the image draw on.

    The tokens after the image slot are the same in both samples; each layer's squared distance over them is divided
    by the teacher states' squared norm there (a scale-free distance: the pivot's widths and depths differ), and the
    layers are averaged. The embedding layer is left out: its states after the slot are the tokens' own in both."""
    with torch.no_grad():
        teacher_inputs = {name: value for name, value in teacher.items() if name != "labels"}
        teacher_states = model(**teacher_inputs, output_hidden_states=True).hidden_states[1:]
    student_states = student_outputs.hidden_states[1:]
    device = student_states[0].device
    student_end, teacher_end = (
        batch["image_bound"].reshape(len(batch["image_bound"]), -1, 2)[:, :1, 1].to(device)
        for batch in (student, teacher)
    )
    student_length, teacher_length = (
        batch["attention_mask"].sum(1, keepdim=True).to(device) for batch in (student, teacher)
    )
    if not torch.equal(student_length - student_end, teacher_length - teacher_end):
        raise ValueError(
            "caption distillation: a teacher sample's tokens after the image slot differ from its student's"
        )
    positions = torch.arange(student_states[0].shape[1], device=device)[None]
    after_image = (positions >= student_end) & (positions < student_length)
    teacher_index = (positions - student_end + teacher_end).clamp(0, teacher_states[0].shape[1] - 1)
    teacher_index = teacher_index[..., None].expand(-1, -1, student_states[0].shape[-1])
    distances = []
    for student_layer, teacher_layer in zip(student_states, teacher_states):
        target = teacher_layer.gather(1, teacher_index).to(student_layer.dtype)
        squared_error = ((student_layer - target) ** 2).sum(-1)[after_image].sum()
        distances.append(squared_error / (target**2).sum(-1)[after_image].sum().clamp(min=1e-12))
    return torch.stack(distances).mean()
