"""Peak RSS of loading VisCPM-Chat at its real size (CPM-Bee 10B + BEiT-3 large) on a machine with less memory than
the model, against the size of its fp16 checkpoint (issue 18).

1. Writes a converted (Hub-layout) folder with synthetic weights: every tensor the model holds, at the released
   shapes (`VisCPMChatConfig()`'s defaults), in fp16 safetensors shards, with constant values as
   `conversion_memory.py` writes them (the benchmark measures memory, and constants cost nothing to generate). The
   names and shapes come from the model itself, built on the meta device, so the folder loads with no missing or
   unexpected key (checked). About 21 GB of disk for 48 layers; `--llm-layers` keeps fewer.
2. Loads it in a child process, the way that needs the least memory:
   `AutoModel.from_pretrained(folder, dtype=torch.float16, device_map="auto", max_memory={"cpu": BUDGET})`.
   What fits the budget is read into memory; every other weight stays where it is, in the folder's own safetensors
   files (transformers indexes them for accelerate's disk offload instead of copying them), and is read for its
   module's forward only.
3. Prints the child's peak RSS (`ru_maxrss`, which counts the pages of the files it maps as well) against the
   checkpoint's size, the bytes held in memory and where the modules went. Goal (issue 18): at most 0.25x.

`--forward` also runs one chat prompt through the loaded model (every offloaded block read once from disk, in fp16
on CPU: minutes at full size) and reports the peak RSS after it.

    python benchmarks/loading_memory.py --workdir /tmp/viscpm-loading
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
from conversion_memory import print_measures

GB = 1024**3
SHARD_BYTES = 2 * GB
HERE = str(Path(__file__).resolve().parent)


def write_synthetic_folder(folder: Path, llm_layers: int) -> None:
    """A VisCPM-Chat folder with the released shapes (CPM-Bee cut to `llm_layers`) and constant fp16 weights,
    written shard by shard (one shard in memory at a time)."""
    from safetensors.torch import save_file

    from viscpm.modeling.configuration_viscpm_chat import VisCPMChatConfig
    from viscpm.modeling.modeling_viscpm_chat import VisCPMChatForConditionalGeneration

    config = VisCPMChatConfig(text_config={"num_hidden_layers": llm_layers})

    with torch.device("meta"):
        model = VisCPMChatForConditionalGeneration(config)
    tied = set(getattr(model, "all_tied_weights_keys", {}))  # saved once, under the name they are tied to
    tensors = [(name, meta) for name, meta in model.state_dict().items() if name not in tied]
    del model

    folder.mkdir(parents=True)
    weight_map, shard, shard_bytes, total = {}, {}, 0, 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard, shard_bytes = {}, 0

    for name, meta in tensors:
        dtype = torch.float16 if meta.dtype.is_floating_point else meta.dtype
        tensor = torch.full(meta.shape, 0.01 if dtype.is_floating_point else 0, dtype=dtype)
        if shard and shard_bytes + tensor.nbytes > SHARD_BYTES:
            flush()
        shard[name] = tensor
        shard_bytes += tensor.nbytes
        total += tensor.nbytes
    flush()
    shards = sorted(set(weight_map.values()))
    renamed = {old: f"model-{index:05d}-of-{len(shards):05d}.safetensors" for index, old in enumerate(shards, 1)}
    for old, new in renamed.items():
        (folder / old).rename(folder / new)
    index = {"metadata": {"total_size": total}, "weight_map": {key: renamed[file] for key, file in weight_map.items()}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", "utf-8")
    config.dtype = torch.float16
    config.save_pretrained(folder)


LOADER = """
import json, resource, sys, time
from pathlib import Path
import torch
import viscpm  # registers the Auto classes
from transformers import AutoModel

folder, budget, offload, forward = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4] == "1"
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
report = {"rss_after_import": peak()}
start = time.time()
model, info = AutoModel.from_pretrained(
    folder, dtype=torch.float16, device_map="auto", max_memory={"cpu": budget}, offload_folder=offload,
    output_loading_info=True,
)
report["load_seconds"] = time.time() - start
report["peak_rss_load"] = peak()
report["loading_info"] = {key: sorted(map(str, value)) for key, value in info.items() if value}
report["resident_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")
placements = list(model.hf_device_map.values())
report["modules"] = {place: placements.count(place) for place in sorted(set(placements))}
if forward:
    sys.path.insert(0, sys.argv[5])
    from gpu_check import chat_prompt, synthetic_processor

    size = model.config.vision_config.image_size
    processor = synthetic_processor(offload, model.config.query_num, size)
    inputs = chat_prompt(processor, 128, "cpu")
    start = time.time()
    with torch.no_grad():
        logits = model(**inputs, pixel_values=torch.zeros(1, 3, size, size, dtype=torch.float16)).logits
    report["forward_seconds"] = time.time() - start
    report["forward_finite"] = bool(torch.isfinite(logits).all())
    report["peak_rss_forward"] = peak()
print("REPORT" + json.dumps(report))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/viscpm-loading-bench"))
    parser.add_argument("--llm-layers", type=int, default=48, help="CPM-Bee layers (48 in the release)")
    parser.add_argument(
        "--budget", type=float, default=0.1, help="max_memory for the CPU, as a fraction of the checkpoint (0.1)"
    )
    parser.add_argument("--forward", action="store_true", help="also run one chat prompt through the loaded model")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic folder (reused by the next run)")
    args = parser.parse_args()

    folder = args.workdir / f"viscpm-chat-{args.llm_layers}-layers"
    if not (folder / "config.json").exists():
        shutil.rmtree(folder, ignore_errors=True)
        start = time.time()
        # in a child process, as the loader: neither inherits the other's pages
        writer = "import sys, pathlib; sys.path.insert(0, sys.argv[1]); import loading_memory as b; "
        writer += "b.write_synthetic_folder(pathlib.Path(sys.argv[2]), int(sys.argv[3]))"
        subprocess.run([sys.executable, "-c", writer, HERE, str(folder), str(args.llm_layers)], check=True)
        print(f"wrote {folder} in {time.time() - start:.0f} s", flush=True)
    size = json.loads((folder / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    budget = int(args.budget * size)

    offload = args.workdir / "offload"
    shutil.rmtree(offload, ignore_errors=True)
    result = subprocess.run(
        [sys.executable, "-c", LOADER, str(folder), str(budget), str(offload), "1" if args.forward else "0", HERE],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    report = json.loads(result.stdout.split("REPORT", 1)[1])
    resaved = sum(file.stat().st_size for file in offload.rglob("*.safetensors")) if offload.exists() else 0
    if not args.keep:
        shutil.rmtree(folder)

    rows = [
        ("CPM-Bee layers", f"{args.llm_layers} of 48"),
        ("fp16 checkpoint", f"{size / GB:.2f} GB"),
        ("max_memory cpu", f"{budget / GB:.2f} GB ({args.budget:.2f}x)"),
        ("weights held in memory", f"{report['resident_bytes'] / GB:.2f} GB"),
        ("modules placed", ", ".join(f"{place}: {count}" for place, count in report["modules"].items())),
        ("weights re-saved to offload_folder", f"{resaved / GB:.2f} GB"),
        ("load time", f"{report['load_seconds']:.0f} s"),
        ("RSS after imports", f"{report['rss_after_import'] / GB:.2f} GB"),
        ("peak RSS of the load", f"{report['peak_rss_load'] / GB:.2f} GB"),
        ("peak RSS / checkpoint (goal <= 0.25)", f"{report['peak_rss_load'] / size:.3f}"),
        ("missing / unexpected keys", json.dumps(report["loading_info"]) if report["loading_info"] else "none"),
    ]
    if args.forward:
        rows += [
            ("one forward (finite logits)", f"{report['forward_seconds']:.0f} s ({report['forward_finite']})"),
            ("peak RSS after the forward", f"{report['peak_rss_forward'] / GB:.2f} GB"),
            ("  / checkpoint", f"{report['peak_rss_forward'] / size:.3f}"),
        ]
    print_measures(rows)


if __name__ == "__main__":
    main()
