"""What the training tests share: coloured images, caption and conversation sources with malformed records among
them, and training configs for a tiny model.
"""

import json
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "black": (0, 0, 0)}


def colour_image(name: str, size: int = 40) -> Image.Image:
    return Image.new("RGB", (size, size), COLOURS[name])


def caption_source(folder: Path, copies: int = 2, malformed: bool = True) -> Path:
    """A jsonl of image paths and captions; with `malformed`, one record of each kind that must be skipped."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for name in COLOURS:
        colour_image(name).save(folder / f"{name}.png")
        records += [{"image": f"{name}.png", "caption": f"a {name}"}] * copies
    if malformed:
        (folder / "broken.png").write_bytes(b"not a png")
        colour_image("red", size=8).save(folder / "small.png")
        records += [
            {"image": "missing.png", "caption": "a red"},
            {"image": "broken.png", "caption": "a red"},
            {"image": "small.png", "caption": "a red"},
            {"image": "red.png", "caption": ""},
            {"image": "red.png", "caption": "a " * 200},
        ]
    path = folder / "captions.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def conversation_source(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    colour_image("red").save(folder / "red.png")
    good = [
        {"from": "human", "value": "<image>\nwhat ?"},
        {"from": "gpt", "value": "a red"},
        {"from": "human", "value": "a b ?"},
        {"from": "gpt", "value": "c"},
    ]
    records = [
        {"image": "red.png", "conversations": good},
        {"image": "red.png", "conversations": good[:3]},  # odd number of turns
        {"image": "red.png", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]},
    ]
    path = folder / "llava.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def write_config(path: Path, **entries) -> Path:
    path.write_text(yaml.safe_dump(entries), encoding="utf-8")
    return path


def chat_config(tmp_path: Path, model: Path, output: str, steps: int = 8, **extra) -> dict:
    data = caption_source(tmp_path / "data", malformed=False)
    training = {
        "max_steps": steps,
        "learning_rate": 1e-2,
        "per_device_train_batch_size": 8,
        "logging_steps": 1,
        "save_steps": 1000,
        "lr_scheduler_type": "constant",
        **extra.pop("training", {}),
    }
    return {
        "model": str(model),
        "output_dir": str(tmp_path / output),
        "data": {"sources": [{"path": str(data), "image_root": str(tmp_path / "data")}], "max_length": 64},
        "training": training,
        **extra,
    }


def state(model) -> dict:
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


def falls(losses: list[float]) -> bool:
    """Every step sees the whole tiny set (batch 8), so the curve is smooth: the last steps are 10% below the first."""
    return np.mean(losses[-2:]) < 0.9 * losses[0]
