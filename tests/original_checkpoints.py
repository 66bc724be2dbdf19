"""Loading original checkpoints straight into the models, key by key: the tests' reference path, beside the converters
(which write a Hub folder instead)."""

import functools
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from conftest import load_json, only_checkpoint
from viscpm.conversion.beit3 import BEIT3_PREFIX, beit3_config_from_original, beit3_key
from viscpm.conversion.checkpoint import map_state_dict, open_original_checkpoint
from viscpm.conversion.cpmbee import CPMBEE_PREFIX, cpmbee_key
from viscpm.modeling.modeling_beit3 import Beit3VisionModel
from viscpm.modeling.modeling_cpmbee import CpmBeeModel


def read_original_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """`open_original_checkpoint` without the memory-mapping flag."""
    return open_original_checkpoint(path)[0]


def load_mapped_state_dict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    key_map: Callable[[str], str | None],
    hint: str = "",
) -> None:
    """Copy ``state_dict`` into ``module`` through ``key_map``; nothing is copied if any key does not fit."""
    targets = module.state_dict()
    mapped = map_state_dict(targets, state_dict, key_map, hint)
    with torch.no_grad():
        for key, tensor in mapped.items():
            targets[key].copy_(tensor)


def load_original_cpmbee(model: CpmBeeModel, state_dict: Mapping[str, torch.Tensor], prefix=CPMBEE_PREFIX) -> None:
    """Load the ``llm.*`` tensors of an original VisCPM checkpoint into a `CpmBeeModel`."""
    load_mapped_state_dict(
        model,
        state_dict,
        lambda key: cpmbee_key(key, prefix),
        hint=f"expected the CPM-Bee weights under '{prefix}' with the dimensions of the config",
    )


def load_original_beit3(
    model: Beit3VisionModel, state_dict: Mapping[str, torch.Tensor], prefix: str = BEIT3_PREFIX
) -> None:
    """Load the ``vpm.beit3.*`` tensors of an original VisCPM-Chat checkpoint into a `Beit3VisionModel`.

    Raises `CheckpointMismatchError` (nothing copied) when keys are missing, unknown or mis-shaped.
    """
    load_mapped_state_dict(
        model,
        state_dict,
        lambda key: beit3_key(key, prefix),
        hint=f"expected the BEiT-3 weights under '{prefix}' with the dimensions of the config",
    )


@functools.cache
def read_golden_chat(golden_dir: Path) -> dict:
    """A golden folder's original VisCPM-Chat: its config, checkpoint, vision outputs and pixel values."""
    folder = golden_dir / "chat"
    return dict(
        config=load_json(folder / "config.json"),
        checkpoint=read_original_checkpoint(only_checkpoint(folder)),
        vision=load_file(folder / "vision.safetensors"),
        pixel_values=load_file(folder / "image_transform.safetensors")["pixel_values"],
    )


def golden_vision_tower(golden_dir: Path, attn_implementation: str) -> Beit3VisionModel:
    """The golden folder's original BEiT-3 tower, loaded key by key."""
    golden_chat = read_golden_chat(golden_dir)
    config = beit3_config_from_original(golden_chat["config"]["beit3"]["encoder_config"])
    config._attn_implementation = attn_implementation
    model = Beit3VisionModel(config).eval()
    assert model.config._attn_implementation == attn_implementation
    load_original_beit3(model, golden_chat["checkpoint"])
    return model
