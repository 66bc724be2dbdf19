"""Peak memory of `viscpm convert chat` on a checkpoint with the real VisCPM-Chat (10B) tensor shapes.

Writes a synthetic original checkpoint (fp16, the original key layout, arbitrary values) with every tensor shape of
the released VisCPM-Chat: CPM-Bee 10B (vocab 86583, width 4096, 32 heads of 128, FFN 10240) and BEiT-3 large (24
multiway layers, width 1024, 224 px) with its unused tensors. `--llm-layers` cuts CPM-Bee's 48 layers to fit the
disk and memory of the machine building the checkpoint (the conversion itself streams). Then runs the conversion
in a child process and prints peak RSS against the checkpoint size:

    python benchmarks/conversion_memory.py --workdir /tmp/viscpm-bench --llm-layers 8

Target (issue 4): peak RSS / checkpoint size <= 0.35, and peak RSS <= 1 GB + the largest tensor.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

GB = 1024**3


def cpmbee_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    dim, heads, dim_head, dim_ff, vocab = 4096, 32, 128, 10240, 86583
    shapes = {"llm.input_embedding.weight": (vocab, dim), "llm.position_bias.relative_attention_bias": (512, heads)}
    for i in range(layers):
        prefix = f"llm.encoder.layers.{i}."
        shapes[prefix + "self_att.layernorm_before_attention.weight"] = (dim,)
        for name in ("project_q", "project_k", "project_v"):
            shapes[prefix + f"self_att.self_attention.{name}.weight"] = (heads * dim_head, dim)
        shapes[prefix + "self_att.self_attention.attention_out.weight"] = (dim, heads * dim_head)
        shapes[prefix + "ffn.layernorm_before_ffn.weight"] = (dim,)
        shapes[prefix + "ffn.ffn.w_in.w_0.weight"] = (dim_ff, dim)
        shapes[prefix + "ffn.ffn.w_in.w_1.weight"] = (dim_ff, dim)
        shapes[prefix + "ffn.ffn.w_out.weight"] = (dim, dim_ff)
    shapes["llm.encoder.output_layernorm.weight"] = (dim,)
    return shapes


def beit3_shapes(layers: int = 24) -> dict[str, tuple[int, ...]]:
    dim, ffn, patches, text_positions = 1024, 4096, (224 // 16) ** 2, 1024
    prefix = "vpm.beit3."
    shapes = {
        prefix + "text_embed.weight": (64010, dim),
        prefix + "vision_embed.mask_token": (1, 1, dim),
        prefix + "vision_embed.cls_token": (1, 1, dim),
        prefix + "vision_embed.proj.weight": (dim, 3, 16, 16),
        prefix + "vision_embed.proj.bias": (dim,),
        prefix + "encoder.embed_positions.A.weight": (patches + 3, dim),
        prefix + "encoder.embed_positions.B.weight": (text_positions, dim),
    }
    for i in range(layers):
        layer = f"{prefix}encoder.layers.{i}."
        for expert in "AB":
            for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
                shapes[layer + f"self_attn.{name}.{expert}.weight"] = (dim, dim)
                shapes[layer + f"self_attn.{name}.{expert}.bias"] = (dim,)
            for norm in ("self_attn.inner_attn_ln", "self_attn_layer_norm", "final_layer_norm"):
                shapes[layer + f"{norm}.{expert}.weight"] = (dim,)
                shapes[layer + f"{norm}.{expert}.bias"] = (dim,)
            shapes[layer + f"ffn.{expert}.fc1.weight"] = (ffn, dim)
            shapes[layer + f"ffn.{expert}.fc1.bias"] = (ffn,)
            shapes[layer + f"ffn.{expert}.fc2.weight"] = (dim, ffn)
            shapes[layer + f"ffn.{expert}.fc2.bias"] = (dim,)
            shapes[layer + f"ffn.{expert}.ffn_layernorm.weight"] = (ffn,)
            shapes[layer + f"ffn.{expert}.ffn_layernorm.bias"] = (ffn,)
    for expert in "AB":
        shapes[f"{prefix}encoder.layer_norm.{expert}.weight"] = (dim,)
        shapes[f"{prefix}encoder.layer_norm.{expert}.bias"] = (dim,)
    shapes["vpm.mim_head.weight"] = (8192, dim)
    shapes["vpm.mim_head.bias"] = (8192,)
    return shapes


def chat_shapes(llm_layers: int) -> dict[str, tuple[int, ...]]:
    shapes = {"query": (64, 1024), "mapping.0.weight": (4096, 1024), "mapping.0.bias": (4096,)}
    shapes.update({"mapping.2.weight": (4096, 4096), "mapping.2.bias": (4096,)})
    return {**shapes, **beit3_shapes(), **cpmbee_shapes(llm_layers)}


def write_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    # constant values: the benchmark measures memory and time, and constants cost nothing to generate
    state_dict = {name: torch.full(shape, 0.01, dtype=torch.float16) for name, shape in shapes.items()}
    torch.save(state_dict, path)


def print_measures(rows: list[tuple[str, str]]) -> None:
    """A two-column markdown table of (measure, value) rows."""
    width = max(len(name) for name, _ in rows)
    print(f"\n| {'measure'.ljust(width)} | value |\n|{'-' * (width + 2)}|-------|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/viscpm-conversion-bench"))
    parser.add_argument("--llm-layers", type=int, default=48, help="CPM-Bee layers to keep (48 in the release)")
    parser.add_argument(
        "--vocab", type=Path, default=Path(__file__).resolve().parents[1] / "tests/fixtures/golden/vocab/bee.txt"
    )
    parser.add_argument("--max-shard-size", default="5GB")
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    checkpoint, output = args.workdir / "viscpm_chat_synthetic.pt", args.workdir / "converted"
    shapes = chat_shapes(args.llm_layers)
    largest = max(torch.Size(shape).numel() * 2 for shape in shapes.values())
    start = time.time()
    # in a child process: a parent that held the checkpoint would lend its resident pages to every child it forks
    writer = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import conversion_memory as b; "
    writer += f"b.write_checkpoint(__import__('pathlib').Path({str(checkpoint)!r}), b.chat_shapes({args.llm_layers}))"
    subprocess.run([sys.executable, "-c", writer], check=True)
    print(f"wrote {checkpoint} ({checkpoint.stat().st_size / GB:.2f} GB) in {time.time() - start:.0f} s", flush=True)

    shutil.rmtree(output, ignore_errors=True)
    argv = ["convert", "chat", "--checkpoint", str(checkpoint), "--vocab", str(args.vocab), "--output", str(output)]
    argv += ["--max-shard-size", args.max_shard_size]
    # the conversion reports its own peak RSS (ru_maxrss of the process that ran it)
    runner = "import json, resource, sys; from viscpm.cli import main; status = main(json.loads(sys.argv[1])); "
    runner += "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(status)"
    start = time.time()
    result = subprocess.run(
        [sys.executable, "-c", runner, json.dumps(argv)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    seconds = time.time() - start
    peak = int(result.stdout.split("PEAK_RSS_KIB")[1].split()[0]) * 1024

    size = checkpoint.stat().st_size
    rows = [
        ("CPM-Bee layers", f"{args.llm_layers} of 48"),
        ("checkpoint size", f"{size / GB:.2f} GB"),
        ("largest tensor", f"{largest / GB:.3f} GB"),
        ("conversion time (incl. verification)", f"{seconds:.0f} s"),
        ("peak RSS of the conversion", f"{peak / GB:.2f} GB"),
        ("peak RSS / checkpoint size (target <= 0.35)", f"{peak / size:.3f}"),
        (
            "1 GB + largest tensor (bound)",
            f"{(GB + largest) / GB:.2f} GB -> {'met' if peak <= GB + largest else 'MISSED'}",
        ),
    ]
    print_measures(rows)


if __name__ == "__main__":
    main()
