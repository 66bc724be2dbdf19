"""Reading original VisCPM checkpoints and loading them into this repository's models.

The original releases are ``torch.save``-d state dicts (``.pt`` / ``.bin``, fp16). They are read with
``weights_only=True`` (a pickle that carries code is refused) and memory-mapped where the file format
allows it, then copied key by key through a plain key map.
"""

import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from ..modeling.configuration_cpmbee import CpmBeeConfig
from ..modeling.modeling_cpmbee import CpmBeeModel

# The CPM-Bee language model sits under `llm.` in VisCPM-Chat and VisCPM-Paint checkpoints.
CPMBEE_PREFIX = "llm."


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


def read_original_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """`open_original_checkpoint` without the memory-mapping flag."""
    return open_original_checkpoint(path)[0]


def cpmbee_config_from_original(original: Mapping) -> CpmBeeConfig:
    """A `CpmBeeConfig` from an original CPM-Bee JSON config (``half`` is a dtype choice, not a dimension)."""
    fields = {key: value for key, value in original.items() if key != "half"}
    return CpmBeeConfig(**fields)


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


def require_tensor(state_dict: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state_dict:
        raise CheckpointError(
            f"the checkpoint has no `{key}`: is it the right kind? (`viscpm convert chat` is for VisCPM-Chat "
            "checkpoints, `viscpm convert paint` for VisCPM-Paint checkpoints)"
        )
    return state_dict[key]


def layer_indices(state_dict: Mapping, pattern: str) -> list[int]:
    return sorted({int(match.group(1)) for key in state_dict if (match := re.match(pattern, key))})


def cpmbee_config_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], original: Mapping | None = None, prefix: str = CPMBEE_PREFIX
) -> CpmBeeConfig:
    """CPM-Bee's config: dimensions from the ``<prefix>*`` tensors' shapes, the rest from ``original`` (the
    ``cpmbee`` section of an original config)."""
    embedding = require_tensor(state_dict, f"{prefix}input_embedding.weight")
    bias_table = require_tensor(state_dict, f"{prefix}position_bias.relative_attention_bias")
    num_layers = len(layer_indices(state_dict, re.escape(prefix) + r"encoder\.layers\.(\d+)\."))

    def q_projection(i):
        return f"{prefix}encoder.layers.{i}.self_att.self_attention.project_q.weight"

    def ffn_output(i):
        return f"{prefix}encoder.layers.{i}.ffn.ffn.w_out.weight"

    attention_layer = next((i for i in range(num_layers) if q_projection(i) in state_dict), None)
    ffn_layer = next((i for i in range(num_layers) if ffn_output(i) in state_dict), None)
    if attention_layer is None or ffn_layer is None:
        raise CheckpointError(f"the checkpoint's CPM-Bee ({prefix}*) has no attention or no feed-forward layer")
    num_heads = bias_table.shape[1]
    fields = {
        **(original or {}),
        "vocab_size": embedding.shape[0],
        "dim_model": embedding.shape[1],
        "num_layers": num_layers,
        "num_heads": num_heads,
        "dim_head": state_dict[q_projection(attention_layer)].shape[0] // num_heads,
        "dim_ff": state_dict[ffn_output(ffn_layer)].shape[1],
    }
    mask_modules = [[q_projection(i) not in state_dict, ffn_output(i) not in state_dict] for i in range(num_layers)]
    if any(any(pair) for pair in mask_modules):
        fields["mask_modules"] = mask_modules
    config = cpmbee_config_from_original(fields)
    if config.position_bias_num_buckets + config.position_bias_num_segment_buckets != bias_table.shape[0]:
        raise CheckpointError(
            f"the position bias table has {bias_table.shape[0]} rows, not position_bias_num_buckets + "
            f"position_bias_num_segment_buckets = {config.position_bias_num_buckets} + "
            f"{config.position_bias_num_segment_buckets}: give the right split with --config"
        )
    return config


def cpmbee_key(original_key: str, prefix: str = CPMBEE_PREFIX) -> str | None:
    """Original ``llm.<name>`` -> `CpmBeeModel` ``<name>``: the module trees are the same."""
    return original_key[len(prefix) :] if original_key.startswith(prefix) else None


def load_original_cpmbee(model: CpmBeeModel, state_dict: Mapping[str, torch.Tensor], prefix=CPMBEE_PREFIX) -> None:
    """Load the ``llm.*`` tensors of an original VisCPM checkpoint into a `CpmBeeModel`."""
    load_mapped_state_dict(
        model,
        state_dict,
        lambda key: cpmbee_key(key, prefix),
        hint=f"expected the CPM-Bee weights under '{prefix}' with the dimensions of the config",
    )
