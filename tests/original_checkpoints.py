"""Loading original checkpoints straight into the models, key by key: the tests' reference path, beside the converters
(which write a Hub folder instead)."""

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from viscpm.conversion.beit3 import BEIT3_PREFIX, beit3_key
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
