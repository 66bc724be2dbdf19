"""The CPM-Bee language model of an original VisCPM checkpoint: its config and its keys.

Both VisCPM-Chat and VisCPM-Paint keep CPM-Bee under ``llm.``, with the module tree of `CpmBeeModel`; the original
JSON config's ``cpmbee`` section holds `CpmBeeConfig`'s fields (and ``half``, a dtype choice).
"""

import re
from collections.abc import Mapping

import torch

from ..modeling.configuration_cpmbee import CpmBeeConfig
from .checkpoint import CheckpointError, layer_indices, require_tensor

# The CPM-Bee language model sits under `llm.` in VisCPM-Chat and VisCPM-Paint checkpoints.
CPMBEE_PREFIX = "llm."


def cpmbee_config_from_original(original: Mapping) -> CpmBeeConfig:
    """A `CpmBeeConfig` from an original CPM-Bee JSON config (``half`` is a dtype choice, not a dimension)."""
    fields = {key: value for key, value in original.items() if key != "half"}
    return CpmBeeConfig(**fields)


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
