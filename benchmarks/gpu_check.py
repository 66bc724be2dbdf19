"""VisCPM-Chat at its REAL size (CPM-Bee 10B + BEiT-3 large, 224 px) on one CUDA GPU, with random weights.

One command, under 8 minutes on one H100 (80 GB):

    python benchmarks/gpu_check.py

1. Builds the model in fp16 directly on the GPU (`AutoModel.from_config` under `torch.device("cuda")`, the model's
   own init; no fp32 copy of the weights exists anywhere), checks that the logits of a chat prompt are finite in
   fp16, converts it to bf16 in place and checks again, then writes it with `save_pretrained` (about 21 GB of fp16
   safetensors) to a temporary folder (`--workdir`, on a disk with room for it).
2. Loads that folder with `from_pretrained(..., quantization_config=BitsAndBytesConfig(...), device_map="cuda")`
   in nf4 and in int8: bitsandbytes quantizes tensor by tensor while loading, so neither the fp32 nor the fp16
   model is ever materialised on the GPU.
3. For each, and for each attention implementation (sdpa, flex_attention, and, when `flash_attn` is installed,
   `{"vision_config": "flash_attention_2", "text_config": "flex_attention"}`), runs the chat decoding (3 beams, the
   model's generation defaults) on an L-token prompt (64 image slots included) and reports the time to first token,
   decode steps/s (each step gives one answer token), and peak GPU memory (`torch.cuda.max_memory_allocated`).

4. With the nf4 model, measures the memory one prefill forward adds above the weights (logits of the last position
   only) at several prompt lengths, for sdpa (which builds the dense L x L bias CPM-Bee needs) and flex_attention
   (bias computed inside the fused kernel, mask as a block mask): the issue's target is linear growth with flex.

A first call per attention implementation is not timed: FlexAttention is compiled there (once per key length,
shared by every later model of the process). Runs that would not fit in `--budget-s` are skipped and say so.

The prompt comes from a synthetic vocabulary (the real one is not needed for speed: only the prompt's length and
structure matter), built with `VisCPMChatProcessor` like a real chat turn. Without CUDA the script says so and
exits with status 1.
"""

import argparse
import gc
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import torch

NUM_BEAMS = 3
DEVICE = "cuda"
SPECIAL_TOKENS = ["<pad>", "<unk>", "<mask>", "<sep>", "</n>", "</_>", "<s>", "</s>", "<root>", "<ans>", "<option>"]
CONTEXT_CHARACTERS = [chr(0x4E00 + i) for i in range(2000)]  # one token each in the synthetic vocabulary


def real_config():
    from viscpm.modeling.configuration_viscpm_chat import VisCPMChatConfig

    return VisCPMChatConfig(attn_implementation="sdpa")  # the defaults are the released VisCPM-Chat's shapes


def synthetic_processor(folder: Path, query_num: int, image_size: int):
    from viscpm.modeling.image_processing_viscpm_chat import VisCPMChatImageProcessor
    from viscpm.modeling.processing_viscpm_chat import VisCPMChatProcessor
    from viscpm.modeling.tokenization_cpmbee import CpmBeeTokenizer

    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL_TOKENS + ["image", "context", "question"] + CONTEXT_CHARACTERS), "utf-8")
    tokenizer = CpmBeeTokenizer(vocab_file=str(vocab))
    image_processor = VisCPMChatImageProcessor(size={"height": image_size, "width": image_size})
    return VisCPMChatProcessor(image_processor, tokenizer, query_num=query_num, max_prompt_length=10**6)


def chat_prompt(processor, length: int, device) -> dict:
    """Model inputs of a chat prompt of exactly `length` tokens (the answer's <s> included)."""
    base = processor(text=["?"], context=[""])["input_ids"].shape[1]
    if length <= base:
        raise SystemExit(f"--length must exceed {base} (the 64 image slots and the prompt's structure)")
    context = "".join(CONTEXT_CHARACTERS[i % len(CONTEXT_CHARACTERS)] for i in range(length - base))
    inputs = processor(text=["?"], context=[context])
    if inputs["input_ids"].shape[1] != length:
        raise SystemExit(f"built a {inputs['input_ids'].shape[1]}-token prompt instead of {length}")
    return {key: value.to(device) for key, value in inputs.items()}


def seconds(function) -> float:
    torch.cuda.synchronize()
    begin = time.perf_counter()
    function()
    torch.cuda.synchronize()
    return time.perf_counter() - begin


def attention_variants() -> dict:
    variants = {"sdpa": "sdpa", "flex_attention": "flex_attention"}
    if importlib.util.find_spec("flash_attn") is not None:
        variants["flash_attention_2 (vision) + flex (text)"] = {
            "vision_config": "flash_attention_2",
            "text_config": "flex_attention",
        }
    return variants


def finite_logits(model, inputs: dict, pixel_values: torch.Tensor) -> dict:
    with torch.no_grad():
        logits = model(**inputs, pixel_values=pixel_values.to(model.dtype)).logits
    last = logits[0, -1].float()
    return {"finite": bool(torch.isfinite(logits).all()), "max_abs": float(logits.float().abs().max()), "last": last}


def measure_generation(model, inputs, pixel_values, new_tokens: int) -> dict:
    @torch.no_grad()
    def generate(n: int):
        return model.generate(**inputs, pixel_values=pixel_values, min_new_tokens=n, max_new_tokens=n)

    first_call = seconds(lambda: generate(new_tokens))  # compiles FlexAttention for every key length it meets
    torch.cuda.reset_peak_memory_stats()
    ttft = seconds(lambda: generate(1))
    e2e = seconds(lambda: generate(new_tokens))
    return {
        "first_call_s": first_call,
        "ttft_s": ttft,
        "e2e_s": e2e,
        "steps_per_s": (new_tokens - 1) / (e2e - ttft),
        "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
    }


def prefill_memory_gb(model, inputs, pixel_values) -> float:
    """GPU memory one prefill forward adds above what is allocated before it (weights, inputs)."""
    with torch.no_grad():
        model(**inputs, pixel_values=pixel_values, logits_to_keep=1)  # compiles FlexAttention for this length
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        model(**inputs, pixel_values=pixel_values, logits_to_keep=1)
        torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=512, help="prompt tokens, 64 image slots included (512)")
    parser.add_argument("--new-tokens", type=int, default=8, help="answer tokens per timed generate() (8)")
    parser.add_argument("--budget-s", type=float, default=450, help="skip what would not fit in this (450 s)")
    parser.add_argument(
        "--prefill-lengths",
        default="1024,2048,4096",
        help="prompt lengths of the nf4 prefill-memory sweep, comma-separated (1024,2048,4096)",
    )
    parser.add_argument("--workdir", help="folder for the 21 GB of fp16 shards (default: a temporary folder)")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print(
            "gpu_check.py needs a CUDA GPU (torch.cuda.is_available() is False on this machine): nothing measured. "
            "Run it on a machine with one 80 GB GPU (H100), with the CUDA build of torch and bitsandbytes installed.",
            file=sys.stderr,
        )
        sys.exit(1)
    if importlib.util.find_spec("bitsandbytes") is None:
        print("gpu_check.py needs bitsandbytes (pip install -e '.[quant]')", file=sys.stderr)
        sys.exit(1)

    import transformers
    from transformers import AutoModel, BitsAndBytesConfig

    import viscpm  # noqa: F401  (registers the Auto classes)

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # FlexAttention is compiled with static shapes (a graph per key length); let every decode length compile
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * args.new_tokens + 16)
    started = time.perf_counter()

    def left() -> float:
        return args.budget_s - (time.perf_counter() - started)

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", flush=True)

    device = torch.device(DEVICE)
    config = real_config()
    text, vision = config.text_config, config.vision_config
    log(
        f"{torch.cuda.get_device_name()}; torch {torch.__version__}, transformers {transformers.__version__}; "
        f"CPM-Bee {text.num_layers} layers x {text.dim_model} ({text.num_heads} x {text.dim_head} heads, FFN "
        f"{text.dim_ff}, vocab {text.vocab_size}), BEiT-3 {vision.num_hidden_layers} x {vision.hidden_size} at "
        f"{vision.image_size} px, {config.query_num} queries"
    )
    rows, checks, prefill = [], {}, {}
    prefill_lengths = [int(length) for length in args.prefill_lengths.split(",") if length]
    with tempfile.TemporaryDirectory(prefix="viscpm-gpu-check-", dir=args.workdir) as temporary:
        folder = Path(temporary)
        processor = synthetic_processor(folder, config.query_num, vision.image_size)
        inputs = chat_prompt(processor, args.length, device)
        pixel_values = torch.randn(1, 3, vision.image_size, vision.image_size, device=device)

        # 1. fp16 straight on the GPU, finite logits in fp16 and bf16, then the shards nf4 / int8 load from
        with device:
            model = AutoModel.from_config(config, dtype=torch.float16).eval()
        parameters = sum(p.numel() for p in model.parameters())
        allocated = torch.cuda.memory_allocated() / 1e9
        log(f"built in fp16 on the GPU: {parameters / 1e9:.2f} B parameters, {allocated:.1f} GB")
        checks["fp16"] = finite_logits(model, inputs, pixel_values)
        model.save_pretrained(folder / "model", max_shard_size="5GB")
        log("fp16 logits checked, shards written")
        model.to(torch.bfloat16)
        checks["bf16"] = finite_logits(model, inputs, pixel_values)
        del model
        gc.collect()
        torch.cuda.empty_cache()
        log("bf16 logits checked")

        # 2. and 3. nf4 / int8 from the shards, every attention implementation
        quantizations = {
            "nf4": BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
            ),
            "int8": BitsAndBytesConfig(load_in_8bit=True),
        }
        for name, quantization in quantizations.items():
            if left() < 90:
                rows.append((name, "-", {"skipped": "time budget"}))
                continue
            torch.cuda.reset_peak_memory_stats()
            begin = time.perf_counter()
            model = AutoModel.from_pretrained(
                folder / "model", quantization_config=quantization, dtype=torch.float16, device_map=DEVICE
            ).eval()
            weights_gb = torch.cuda.memory_allocated() / 1e9
            log(
                f"{name}: loaded in {time.perf_counter() - begin:.0f} s, {weights_gb:.1f} GB on the GPU "
                f"(peak while loading {torch.cuda.max_memory_allocated() / 1e9:.1f} GB)"
            )
            for label, implementation in attention_variants().items():
                if left() < 60:
                    rows.append((name, label, {"skipped": "time budget"}))
                    continue
                try:
                    model.set_attn_implementation(implementation)
                    result = measure_generation(model, inputs, pixel_values, args.new_tokens)
                except Exception as error:  # report and go on: one backend failing must not hide the others
                    result = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"}
                result["weights_gb"] = weights_gb
                rows.append((name, label, result))
                log(f"{name} / {label}: {result}")
            if name == "nf4":
                for label in ("sdpa", "flex_attention"):
                    model.set_attn_implementation(label)
                    for length in prefill_lengths:
                        if left() < 60:
                            prefill[label, length] = "skipped: time budget"
                            continue
                        try:
                            prompt = chat_prompt(processor, length, device)
                            prefill[label, length] = prefill_memory_gb(model, prompt, pixel_values)
                        except Exception as error:  # e.g. out of memory: report it and go on
                            prefill[label, length] = f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"
                        log(f"nf4 prefill memory / {label} / L={length}: {prefill[label, length]}")
            del model
            gc.collect()
            torch.cuda.empty_cache()

    print(
        f"\nreal-size VisCPM-Chat, random weights, prompt {args.length} tokens (64 image slots), {NUM_BEAMS} beams, "
        f"{args.new_tokens}-token answers, {torch.cuda.get_device_name()}\n"
    )
    print("| weights | attention | weights (GB) | peak (GB) | first token (s) | decode steps/s | 1st call (s) |")
    print("|---|---|---|---|---|---|---|")
    for name, label, result in rows:
        if "skipped" in result or "error" in result:
            print(f"| {name} | {label} | {result.get('skipped') or result.get('error')} | | | | |")
            continue
        print(
            f"| {name} | {label} | {result['weights_gb']:.1f} | {result['peak_gb']:.1f} | {result['ttft_s']:.3f} | "
            f"{result['steps_per_s']:.1f} | {result['first_call_s']:.1f} |"
        )
    if prefill_lengths:
        print("\nnf4 prefill: GPU memory one forward adds above the weights (GB), and its growth per length step")
        print("| prompt tokens | " + " | ".join(f"{label} | growth" for label in ("sdpa", "flex_attention")) + " |")
        print("|---|" + "---|---|" * 2)
        for index, length in enumerate(prefill_lengths):
            cells = []
            for label in ("sdpa", "flex_attention"):
                value = prefill.get((label, length), "-")
                previous = prefill.get((label, prefill_lengths[index - 1])) if index else None
                both = isinstance(value, float) and isinstance(previous, float) and previous > 0
                cells += [
                    f"{value:.2f}" if isinstance(value, float) else value,
                    f"{value / previous:.2f}x" if both else "",
                ]
            print(f"| {length} | " + " | ".join(cells) + " |")
        print("(linear growth: the growth column equals the ratio of the lengths; quadratic: its square)")
    cosine = torch.nn.functional.cosine_similarity(checks["fp16"]["last"], checks["bf16"]["last"], dim=0)
    print("\n| dtype | logits finite | max abs logit |")
    print("|---|---|---|")
    for dtype, check in checks.items():
        print(f"| {dtype} | {'yes' if check['finite'] else 'NO'} | {check['max_abs']:.1f} |")
    print(f"cosine of the last position's logits, fp16 vs bf16: {float(cosine):.4f}")
    print(f"total {time.perf_counter() - started:.0f} s")
    if not all(check["finite"] for check in checks.values()):
        sys.exit(2)


if __name__ == "__main__":
    main()
