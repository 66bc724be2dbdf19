"""Reading original checkpoints: safe loading and clear errors."""

import os
import pickle

import pytest
import torch

from original_checkpoints import load_original_cpmbee, read_original_checkpoint
from tiny_models import tiny_cpmbee_config
from viscpm import CpmBeeModel
from viscpm.conversion.checkpoint import CheckpointError, CheckpointMismatchError
from viscpm.conversion.cpmbee import cpmbee_config_from_original


def original_state_dict(model: CpmBeeModel) -> dict:
    """The original VisCPM layout: the language model under `llm.`, stored in fp16."""
    return {f"llm.{key}": value.half() for key, value in model.state_dict().items()}


def test_original_weights_load_into_the_same_tree(tmp_path):
    torch.manual_seed(0)
    source = CpmBeeModel(tiny_cpmbee_config(50))
    path = tmp_path / "original.pt"
    torch.save({**original_state_dict(source), "vpm.other": torch.zeros(2)}, path)
    target = CpmBeeModel(tiny_cpmbee_config(50))
    load_original_cpmbee(target, read_original_checkpoint(path))
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value.half().float()), key


def test_mismatched_checkpoint_lists_every_offending_key():
    model = CpmBeeModel(tiny_cpmbee_config(50))
    width = model.config.dim_model
    state = original_state_dict(model)
    del state["llm.encoder.layers.0.ffn.ffn.w_out.weight"]
    state["llm.encoder.layers.7.self_att.self_attention.project_q.weight"] = torch.zeros(width, width)
    state["llm.input_embedding.weight"] = torch.zeros(51, width)
    before = model.input_embedding.weight.clone()
    with pytest.raises(CheckpointMismatchError) as error:
        load_original_cpmbee(model, state)
    message = str(error.value)
    assert "1 missing key(s): encoder.layers.0.ffn.ffn.w_out.weight" in message
    assert "1 unexpected key(s): llm.encoder.layers.7.self_att.self_attention.project_q.weight" in message
    assert f"1 mis-shaped key(s): llm.input_embedding.weight (51, {width}) != (50, {width})" in message
    assert torch.equal(model.input_embedding.weight, before), "nothing may be copied from a mismatched checkpoint"


class CarriesCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_carrying_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"llm.x": torch.zeros(1), "payload": CarriesCode()}, path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        read_original_checkpoint(path)


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "truncated.pt"
    torch.save(original_state_dict(CpmBeeModel(tiny_cpmbee_config(50))), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_original_checkpoint(path)


def test_missing_file_and_non_state_dict(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_original_checkpoint(tmp_path / "nope.pt")
    path = tmp_path / "list.pt"
    with open(path, "wb") as f:
        pickle.dump([1, 2], f, protocol=2)  # torch.save's own protocol: only the content is wrong
    with pytest.raises(CheckpointError):
        read_original_checkpoint(path)


def test_original_json_config_drops_the_dtype_flag():
    # the `cpmbee` section of an original config.json, in its own field names (no transformers bookkeeping)
    original = {
        "vocab_size": 50,
        "dim_model": 16,
        "dim_ff": 24,
        "num_layers": 2,
        "num_heads": 2,
        "dim_head": 8,
        "dropout_p": 0.0,
        "position_bias_num_buckets": 16,
        "position_bias_num_segment_buckets": 16,
        "position_bias_max_distance": 32,
        "eps": 1e-6,
        "half": True,
    }
    config = cpmbee_config_from_original(original)
    assert all(getattr(config, key) == value for key, value in original.items() if key != "half")
    assert not hasattr(config, "half")
