"""Reading original VisCPM checkpoints safely, and mapping their keys onto a model's.

The original releases are ``torch.save``-d state dicts (``.pt`` / ``.bin``, fp16). They are read with
``weights_only=True`` (a pickle that carries code is refused) and memory-mapped where the file format
allows it, then copied key by key through a plain key map.
"""

import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """An original checkpoint that cannot be read or does not fit the model."""


class CheckpointMismatchError(CheckpointError):
    def __init__(self, missing: list[str], unexpected: list[str], mismatched: list[str], hint: str = ""):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched)):
            if keys:
                shown = ", ".join(keys[:20]) + (f", ... ({len(keys) - 20} more)" if len(keys) > 20 else "")
                parts.append(f"{len(keys)} {label} key(s): {shown}")
        super().__init__("checkpoint does not fit the model: " + "; ".join(parts) + (f" ({hint})" if hint else ""))


def open_original_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], bool]:
    """Load an original ``torch.save`` state dict safely (``weights_only=True``), memory-mapped when the file format
    allows it. Returns the state dict and whether its tensors are views of the memory-mapped file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    memory_mapped = True
    try:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            # the legacy (pre-zip) torch.save format cannot be memory-mapped
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
            memory_mapped = False
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain tensor checkpoint (the pickle carries code or objects "
            f"other than tensors; weights_only=True rejected it: {error})"
        ) from error
    except (RuntimeError, EOFError, ValueError, OSError) as error:
        raise CheckpointError(f"cannot read {path}: the file is truncated or corrupt ({error})") from error
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors (got {type(state_dict).__name__})")
    return dict(state_dict), memory_mapped


def map_state_dict(
    targets: Mapping[str, torch.Tensor],
    state_dict: Mapping[str, torch.Tensor],
    key_map: Callable[[str], str | None],
    hint: str = "",
) -> dict[str, torch.Tensor]:
    """``state_dict`` renamed through ``key_map`` (original key -> model key, None = not the model's).

    ``targets`` is the model's state dict (meta tensors will do: only names and shapes are read). Raises
    `CheckpointMismatchError` naming every missing, unexpected and mis-shaped key.
    """
    mapped, unexpected, mismatched = {}, [], []
    for original_key, tensor in state_dict.items():
        key = key_map(original_key)
        if key is None:
            continue
        if key not in targets:
            unexpected.append(original_key)
        elif tensor.shape != targets[key].shape:
            mismatched.append(f"{original_key} {tuple(tensor.shape)} != {tuple(targets[key].shape)}")
        mapped[key] = tensor
    missing = sorted(set(targets) - set(mapped))
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(missing, unexpected, mismatched, hint)
    return mapped


def require_tensor(state_dict: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state_dict:
        raise CheckpointError(
            f"the checkpoint has no `{key}`: is it the right kind? (`viscpm convert chat` is for VisCPM-Chat "
            "checkpoints, `viscpm convert paint` for VisCPM-Paint checkpoints)"
        )
    return state_dict[key]


def layer_indices(state_dict: Mapping, pattern: str) -> list[int]:
    return sorted({int(match.group(1)) for key in state_dict if (match := re.match(pattern, key))})
