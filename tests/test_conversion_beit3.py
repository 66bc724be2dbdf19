"""The original BEiT-3 layout (`viscpm.conversion.beit3`): the key map and its way back, the torchscale config
reader, and loading an original checkpoint (golden and tiny) with every offending key named.
"""

import pytest
import torch

from original_checkpoints import golden_vision_tower, load_original_beit3, read_golden_chat, read_original_checkpoint
from tiny_models import tiny_vision_tower
from viscpm.conversion.beit3 import (
    DROPPED_ORIGINAL_PREFIXES,
    beit3_config_from_original,
    beit3_key,
    original_beit3_key,
)
from viscpm.conversion.checkpoint import CheckpointMismatchError
from viscpm.modeling.modeling_beit3 import Beit3VisionModel


@pytest.mark.golden
def test_golden_config_and_key_map_cover_the_original_checkpoint(golden_dir):
    golden_chat = read_golden_chat(golden_dir)
    config = golden_chat["config"]
    model = golden_vision_tower(golden_dir, "eager")
    assert model.config.hidden_size == config["vision_dim"]
    if "num_img_patches_plus_cls" in config["beit3"]:
        assert model.num_image_tokens == config["beit3"]["num_img_patches_plus_cls"]
    # every tower tensor of the original is either ours or one of the documented unused ones
    original_tower = {key for key in golden_chat["checkpoint"] if key.startswith("vpm.")}
    ours_as_original = {original_beit3_key(key) for key in model.state_dict()}
    assert ours_as_original <= original_tower
    leftover = sorted(original_tower - ours_as_original)
    assert leftover and all(key.startswith(DROPPED_ORIGINAL_PREFIXES) for key in leftover), leftover
    assert all(beit3_key(key) is None for key in leftover)


# ---------------------------------------------------------------------------------------------------- conversion


def original_layout(model: Beit3VisionModel) -> dict:
    """`model` as an original VisCPM-Chat checkpoint (fp16), with the tensors the original has and we drop."""
    hidden = model.config.hidden_size
    state = {original_beit3_key(key): value.half() for key, value in model.state_dict().items()}
    state["vpm.beit3.text_embed.weight"] = torch.zeros(7, hidden, dtype=torch.float16)
    state["vpm.beit3.vision_embed.mask_token"] = torch.zeros(1, 1, hidden, dtype=torch.float16)
    state["vpm.mim_head.weight"] = torch.zeros(8, 4, dtype=torch.float16)
    state["vpm.mim_head.bias"] = torch.zeros(8, dtype=torch.float16)
    state["query"] = torch.zeros(3, hidden, dtype=torch.float16)  # the learned queries
    state["llm.input_embedding.weight"] = torch.zeros(5, 4, dtype=torch.float16)
    return state


def test_key_map_round_trip_is_the_identity():
    keys = list(tiny_vision_tower().state_dict())
    originals = [original_beit3_key(key) for key in keys]
    assert len(set(originals)) == len(keys)
    assert [beit3_key(key) for key in originals] == keys
    # the original names, spelled out (torchscale's module tree under VisCPM's `vpm.beit3.`)
    expected = {
        "embeddings.cls_token": "vpm.beit3.vision_embed.cls_token",
        "embeddings.patch_embedding.weight": "vpm.beit3.vision_embed.proj.weight",
        "embeddings.image_position_embedding.weight": "vpm.beit3.encoder.embed_positions.A.weight",
        "embeddings.text_position_embedding.weight": "vpm.beit3.encoder.embed_positions.B.weight",
        "encoder.layers.1.self_attn.q_proj.text.bias": "vpm.beit3.encoder.layers.1.self_attn.q_proj.B.bias",
        "encoder.layers.0.self_attn.inner_attn_ln.image.weight": (
            "vpm.beit3.encoder.layers.0.self_attn.inner_attn_ln.A.weight"
        ),
        "encoder.layers.0.ffn.text.ffn_layernorm.bias": "vpm.beit3.encoder.layers.0.ffn.B.ffn_layernorm.bias",
        "encoder.layers.1.final_layer_norm.image.weight": "vpm.beit3.encoder.layers.1.final_layer_norm.A.weight",
        "encoder.layer_norm.text.weight": "vpm.beit3.encoder.layer_norm.B.weight",
    }
    assert {key: original_beit3_key(key) for key in expected} == expected
    for dropped in ("vpm.mim_head.weight", "vpm.beit3.text_embed.weight", "vpm.beit3.vision_embed.mask_token"):
        assert beit3_key(dropped) is None
    assert beit3_key("query") is None and beit3_key("llm.input_embedding.weight") is None


def test_original_checkpoint_loads_into_the_model(tmp_path):
    source = tiny_vision_tower(seed=3)
    path = tmp_path / "original.pt"
    torch.save(original_layout(source), path)
    target = tiny_vision_tower(seed=4)
    load_original_beit3(target, read_original_checkpoint(path))
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value.half().float()), key


def test_mismatched_checkpoint_lists_every_offending_key():
    model = tiny_vision_tower()
    state = original_layout(model)
    del state["vpm.beit3.encoder.layers.0.ffn.B.fc2.weight"]
    state["vpm.beit3.encoder.layers.7.self_attn.q_proj.A.weight"] = torch.zeros(32, 32)
    state["vpm.beit3.encoder.embed_positions.A.weight"] = torch.zeros(3, 32)
    before = model.embeddings.cls_token.detach().clone()
    with pytest.raises(CheckpointMismatchError) as error:
        load_original_beit3(model, state)
    message = str(error.value)
    assert error.value.missing == ["encoder.layers.0.ffn.text.fc2.weight"]
    assert error.value.unexpected == ["vpm.beit3.encoder.layers.7.self_attn.q_proj.A.weight"]
    assert "1 mis-shaped key(s): vpm.beit3.encoder.embed_positions.A.weight (3, 32) != (7, 32)" in message
    assert torch.equal(model.embeddings.cls_token, before), "nothing may be copied from a mismatched checkpoint"


def test_config_from_original_reads_torchscale_fields_and_refuses_other_architectures():
    original = dict(
        encoder_embed_dim=48,
        encoder_attention_heads=6,
        encoder_ffn_embed_dim=96,
        encoder_layers=3,
        img_size=48,
        patch_size=16,
        in_chans=3,
        layernorm_eps=1e-6,
        max_source_positions=40,
        multiway=True,
        no_output_layer=True,
    )
    config = beit3_config_from_original(original)
    assert (config.hidden_size, config.num_attention_heads, config.intermediate_size) == (48, 6, 96)
    assert (config.num_hidden_layers, config.image_size, config.layer_norm_eps) == (3, 48, 1e-6)
    assert (config.max_source_positions, config.num_image_tokens) == (40, 10)
    with pytest.raises(ValueError, match="multiway"):
        beit3_config_from_original({**original, "multiway": False})
    with pytest.raises(ValueError, match="subln"):
        beit3_config_from_original({**original, "subln": False})
    # torchscale's own default for a missing key (multiway=False), not this class's
    with pytest.raises(ValueError, match="multiway"):
        beit3_config_from_original({k: v for k, v in original.items() if k != "multiway"})
