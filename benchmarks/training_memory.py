"""GPU memory per device of training the real-size VisCPM-Chat (CPM-Bee 10B + BEiT-3 large), on 1 and on 8 GPUs,
for full fine-tuning (stage 2), LoRA and QLoRA: an ESTIMATE computed from the model's shapes, not a measurement.

The parameter counts come from the model itself, built on the meta device (no memory, no GPU): what each stage
trains is decided by the training code (`set_chat_trainable`, `add_lora` with the LoRA config of
configs/chat-lora.yaml), and which weights bitsandbytes quantizes by transformers' rule (every `nn.Linear` but
`get_keys_to_not_convert`). Bytes per parameter follow what `viscpm train` does (it loads fp32 weights, and the
Trainer's bf16 autocast does the mixed precision):

- without DeepSpeed (one GPU, DDP): every weight in fp32 (4); a trained one adds its fp32 gradient (4) and AdamW's
  two moments (8);
- with DeepSpeed (bf16): the engine casts the model to bf16 (2); a trained weight adds its bf16 gradient (2) and
  the optimizer's fp32 master copy and moments (12). ZeRO-2 divides gradients and optimizer states by the number
  of GPUs and keeps the weights whole on each; ZeRO-3 divides all three;
- QLoRA: nf4 weights with double-quantized block scales (0.5 + 0.127 / 8 per weight); peft's
  `prepare_model_for_kbit_training` casts every parameter left unquantized to fp32 (4).

Activations, with gradient checkpointing (every config in configs/ turns it on), for the config's micro-batch and
`data.max_length`: each layer's input kept for the backward pass (CPM-Bee's 48 and BEiT-3's 24), one layer's
working set while it is recomputed (its attention scores in fp32, with CPM-Bee's position bias, and its FFN), and
the logits in fp32 with their gradient. Not counted: the CUDA context and allocator fragmentation (add 1-3 GB), and
communication buffers.

    python benchmarks/training_memory.py
"""

import argparse

import torch
from torch import nn

GB = 1024**3
NF4_BYTES = 0.5 + 0.127 / 8  # 4 bits, plus the double-quantized absmax per block of 64
FP32_TRAINED_BYTES = 4 + 8  # fp32 gradient; AdamW's exp_avg, exp_avg_sq
DEEPSPEED_TRAINED_BYTES = 2 + 12  # bf16 gradient; fp32 master weight, exp_avg, exp_avg_sq


def meta_model():
    from viscpm.modeling.configuration_viscpm_chat import VisCPMChatConfig
    from viscpm.modeling.modeling_viscpm_chat import VisCPMChatForConditionalGeneration

    with torch.device("meta"):
        return VisCPMChatForConditionalGeneration(VisCPMChatConfig())


def parameter_counts() -> dict:
    from transformers.quantizers.base import get_keys_to_not_convert

    from viscpm.training.chat import add_lora, set_chat_trainable

    model = meta_model()
    total = sum(p.numel() for p in model.parameters())
    set_chat_trainable(model, tune_llm=True, tune_vision=True)
    full = sum(p.numel() for p in model.parameters() if p.requires_grad)
    kept = set(get_keys_to_not_convert(model))
    quantized = sum(
        module.weight.numel()
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not any(name == key or name.startswith(key + ".") for key in kept)
    )
    lora = add_lora(model, {"r": 16, "alpha": 32}, quantized=False, gradient_checkpointing=True)
    adapters = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    return {
        "config": lora.base_model.model.config,
        "total": total,
        "full": full,
        "quantized": quantized,
        "lora": adapters,
    }


def activation_bytes(config, micro_batch: int, length: int, hidden_bytes: int) -> float:
    """`hidden_bytes`: 4 under autocast with fp32 weights (the residual stream stays fp32), 2 in a bf16 model."""
    text, vision = config.text_config, config.vision_config
    tokens = micro_batch * length
    patches = micro_batch * ((vision.image_size // vision.patch_size) ** 2 + 1)
    queries = micro_batch * config.query_num
    kept_inputs = hidden_bytes * text.num_hidden_layers * tokens * text.hidden_size
    kept_inputs += hidden_bytes * vision.num_hidden_layers * (patches + queries) * vision.hidden_size
    attention = 4 * 3 * micro_batch * text.num_attention_heads * length**2  # scores, bias, softmax in fp32
    ffn = hidden_bytes * 4 * tokens * text.intermediate_size
    logits = 4 * 2 * tokens * text.vocab_size
    return kept_inputs + attention + ffn + logits


def table(counts: dict, sft_batch: int, lora_batch: int, length: int) -> list[tuple]:
    total, full, quantized, lora = counts["total"], counts["full"], counts["quantized"], counts["lora"]
    config = counts["config"]
    sft_activations = {hidden: activation_bytes(config, sft_batch, length, hidden) for hidden in (2, 4)}
    lora_activations = {hidden: activation_bytes(config, lora_batch, length, hidden) for hidden in (2, 4)}
    qlora_weights = quantized * NF4_BYTES + (total - quantized) * 4

    def row(method, engine, gpus, weights, states, activations):
        return (
            method,
            engine,
            gpus,
            weights / GB,
            states / GB,
            activations / GB,
            (weights + states + activations) / GB,
        )

    rows = [
        row("full (stage 2)", "one GPU", 1, 4 * total, FP32_TRAINED_BYTES * full, sft_activations[4]),
        row("full (stage 2)", "ZeRO-2", 8, 2 * total, DEEPSPEED_TRAINED_BYTES * full / 8, sft_activations[2]),
        row("full (stage 2)", "ZeRO-3", 8, 2 * total / 8, DEEPSPEED_TRAINED_BYTES * full / 8, sft_activations[2]),
        row("LoRA r=16", "one GPU", 1, 4 * total, FP32_TRAINED_BYTES * lora, lora_activations[4]),
        row("LoRA r=16", "DDP", 8, 4 * total, FP32_TRAINED_BYTES * lora, lora_activations[4]),
        row("LoRA r=16", "ZeRO-3", 8, 2 * total / 8, DEEPSPEED_TRAINED_BYTES * lora / 8, lora_activations[2]),
        row("QLoRA nf4 r=16", "one GPU", 1, qlora_weights, FP32_TRAINED_BYTES * lora, lora_activations[4]),
        row("QLoRA nf4 r=16", "DDP", 8, qlora_weights, FP32_TRAINED_BYTES * lora, lora_activations[4]),
    ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft-batch", type=int, default=1, help="micro-batch of full fine-tuning (chat-sft.yaml: 1)")
    parser.add_argument("--lora-batch", type=int, default=4, help="micro-batch of LoRA (chat-lora.yaml: 4)")
    parser.add_argument("--length", type=int, default=512, help="tokens per sample (data.max_length: 512)")
    args = parser.parse_args()

    counts = parameter_counts()
    billions = {key: counts[key] / 1e9 for key in ("total", "full", "quantized")}
    print(
        f"parameters: {billions['total']:.2f} B; trained in stage 2: {billions['full']:.2f} B; quantized by "
        f"bitsandbytes: {billions['quantized']:.2f} B; LoRA r=16: {counts['lora'] / 1e6:.1f} M"
    )
    print(
        f"micro-batch {args.sft_batch} (full) / {args.lora_batch} (LoRA), {args.length} tokens, gradient "
        "checkpointing; ESTIMATE, GB per GPU, without the CUDA context and fragmentation\n"
    )
    header = ("method", "engine", "GPUs", "weights", "grads + AdamW", "activations", "total per GPU")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for method, engine, gpus, weights, states, activations, total in table(
        counts, args.sft_batch, args.lora_batch, args.length
    ):
        print(f"| {method} | {engine} | {gpus} | {weights:.1f} | {states:.1f} | {activations:.1f} | {total:.1f} |")


if __name__ == "__main__":
    main()
