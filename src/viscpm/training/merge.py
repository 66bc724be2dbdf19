"""Merging a LoRA adapter into its base model (`viscpm merge-lora`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel  # at import time: `viscpm merge-lora` without the train extra names it (cli._needs_extra)
from transformers import AutoModel, AutoProcessor

from ..conversion.export import staged_output


def merge_lora(adapter: Path, output: Path, base: Path | None = None, overwrite: bool = False) -> Path:
    """The base model in full precision with the adapter merged in, saved (with the base's processor) to `output`.

    Written to a temporary folder beside `output` and moved into place when complete (`staged_output`).
    """
    adapter, output = Path(adapter), Path(output)
    adapter_config = adapter / "adapter_config.json"
    if not adapter_config.is_file():
        raise FileNotFoundError(f"{adapter} has no adapter_config.json: not a LoRA adapter folder")
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists: pass --overwrite to replace it")
    if base is None:
        named = json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path")
        if not named:
            raise ValueError(f"{adapter_config} names no base model: pass --base")
        base = Path(named)
    if not (Path(base) / "config.json").is_file():
        raise FileNotFoundError(f"base model {base} not found (no config.json): pass --base")
    # full precision whatever the adapter was trained on: merging into 4-bit weights would round the update away
    model = AutoModel.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    with staged_output(output, overwrite) as staging:
        merged.save_pretrained(staging)
        AutoProcessor.from_pretrained(base).save_pretrained(staging)
    return output
