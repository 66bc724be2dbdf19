"""Memory footprint of the mid-size VisCPM-Chat in fp32 / fp16 / int8 / nf4 (bitsandbytes; runs on CPU).

Builds a random VisCPM-Chat (CPM-Bee width 1024, 16 heads x 64, FFN 2560, 12 layers, the full 86,583-token
vocabulary; BEiT-3 width 256, 2 layers, 224 px: the "mid" size of `chat_speed.py`), saves it with
`save_pretrained` (fp32 safetensors), loads it back four ways with `AutoModel.from_pretrained(folder, ...)` and prints
`model.get_memory_footprint()` (parameters and buffers) of each, with ratios to fp32 and the split between what
bitsandbytes quantizes (every `nn.Linear`) and what it keeps in the load dtype (the tied embedding / LM head, norms,
position bias, queries, BEiT-3's embeddings). The footprint is taken right after loading: on CPU, bitsandbytes
repacks 4-bit weights at the first forward (docs/quantization.md).

    python benchmarks/memory_footprint.py
"""

import argparse
import logging
import tempfile
from pathlib import Path

import torch
from chat_speed import SIZES, VISION, VOCAB_SIZE  # the benchmark model sizes, defined once

MB = 1e6


def build(size: str):
    from viscpm.modeling.configuration_beit3 import Beit3VisionConfig
    from viscpm.modeling.configuration_cpmbee import CpmBeeConfig
    from viscpm.modeling.configuration_viscpm_chat import VisCPMChatConfig
    from viscpm.modeling.modeling_viscpm_chat import VisCPMChatForConditionalGeneration

    config = VisCPMChatConfig(
        vision_config=Beit3VisionConfig(**VISION), text_config=CpmBeeConfig(vocab_size=VOCAB_SIZE, **SIZES[size])
    )
    torch.manual_seed(0)
    return VisCPMChatForConditionalGeneration(config).eval()


def split_bytes(model) -> tuple[int, int]:
    """(bytes of the layers bitsandbytes replaces, bytes of everything else); shared tensors counted once."""
    seen, linear, other = set(), 0, 0
    linear_modules = {
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name != "llm.lm_head"  # the tied head is the embedding
    }
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        nbytes = tensor.numel() * tensor.element_size()
        if name.rsplit(".", 1)[0] in linear_modules:
            linear += nbytes
        else:
            other += nbytes
    return linear, other


def quantization_statistics(model) -> int:
    """Bytes of bitsandbytes' per-block / per-row scales, which hang off the weights and are not parameters or
    buffers, so `get_memory_footprint()` does not count them."""
    total = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None:  # 4-bit: absmax per block of 64 (and its own statistics if double-quantized)
            for tensor in (state.absmax, getattr(state, "code", None)):
                total += 0 if tensor is None else tensor.numel() * tensor.element_size()
            if getattr(state, "state2", None) is not None:
                total += state.state2.absmax.numel() * state.state2.absmax.element_size()
        scales = getattr(weight, "SCB", None)
        if scales is not None:  # 8-bit: one scale per output row
            total += scales.numel() * scales.element_size()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="mid")
    args = parser.parse_args()

    import transformers
    from transformers import AutoModel, BitsAndBytesConfig

    import viscpm  # noqa: F401  (registers the Auto classes)

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    variants = {
        "fp32": dict(dtype=torch.float32),
        "fp16": dict(dtype=torch.float16),
        "int8": dict(dtype=torch.float32, quantization_config=BitsAndBytesConfig(load_in_8bit=True)),
        "nf4": dict(
            dtype=torch.float32,
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
            ),
        ),
    }
    # the same with everything bitsandbytes does not quantize loaded in fp16
    variants["int8, rest fp16"] = dict(variants["int8"], dtype=torch.float16)
    variants["nf4, rest fp16"] = dict(variants["nf4"], dtype=torch.float16)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="viscpm-footprint-") as folder:
        model = build(args.size)
        parameters = sum(p.numel() for p in model.parameters())
        model.save_pretrained(folder)
        del model
        for name, kwargs in variants.items():
            model = AutoModel.from_pretrained(Path(folder), **kwargs).eval()
            layers = {type(m).__name__ for m in model.llm.model.encoder.layers[0].modules()}
            linear, other = split_bytes(model)
            rows[name] = dict(
                footprint=model.get_memory_footprint(),
                linear=linear,
                other=other,
                quantized="Linear8bitLt" in layers or "Linear4bit" in layers,
                statistics=quantization_statistics(model),
            )
            del model

    dims = SIZES[args.size]
    print(
        f"VisCPM-Chat {args.size}: CPM-Bee width {dims['dim_model']}, {dims['num_heads']} heads x {dims['dim_head']}, "
        f"FFN {dims['dim_ff']}, {dims['num_layers']} layers, vocab {VOCAB_SIZE}; BEiT-3 width {VISION['hidden_size']}, "
        f"{VISION['num_hidden_layers']} layers, {VISION['image_size']} px; {parameters / 1e6:.1f} M parameters "
        f"(tied embedding counted once); torch {torch.__version__}, transformers {transformers.__version__}"
    )
    print(
        "\n| dtype | get_memory_footprint() (MB) | vs fp32 | nn.Linear layers (MB, vs fp32) | rest (MB) | "
        "+ quantization scales, not in the footprint (MB) | total vs fp32 |"
    )
    print("|---|---|---|---|---|---|---|")
    reference = rows["fp32"]
    for name, row in rows.items():
        print(
            f"| {name} | {row['footprint'] / MB:.1f} | {row['footprint'] / reference['footprint']:.3f} | "
            f"{row['linear'] / MB:.1f} ({row['linear'] / reference['linear']:.3f}) | {row['other'] / MB:.1f} | "
            f"{row['statistics'] / MB:.1f} | {(row['footprint'] + row['statistics']) / reference['footprint']:.3f} |"
        )
    print(
        "\nint8 / nf4 quantize every nn.Linear (CPM-Bee's projections, BEiT-3's, the mapping); the tied LM head and "
        "input embedding, the norms and the position bias stay in the load dtype (fp32, or fp16 in the last two rows)."
    )


if __name__ == "__main__":
    main()
