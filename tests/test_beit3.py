"""The BEiT-3 vision tower of VisCPM-Chat: golden parity with the original, and tiny random configs.

Golden tests load the original tiny checkpoint through the conversion code users run
(`viscpm.conversion.beit3`) and compare with the original's outputs in `chat/vision.safetensors`
(manifest tolerance fp32 rtol=1e-4, atol=1e-5). Every dimension comes from the golden folder.
"""

from pathlib import Path

import pytest
import torch
from original_checkpoints import load_original_beit3, read_original_checkpoint
from safetensors.torch import load_file
from torch import nn

from conftest import load_json
from viscpm.conversion.beit3 import (
    DROPPED_ORIGINAL_PREFIXES,
    beit3_config_from_original,
    beit3_key,
    original_beit3_key,
)
from viscpm.conversion.checkpoint import CheckpointMismatchError
from viscpm.modeling.configuration_beit3 import Beit3VisionConfig
from viscpm.modeling.modeling_beit3 import Beit3Multiway, Beit3VisionModel

RTOL, ATOL = 1e-4, 1e-5
ATTENTION = ["eager", "sdpa"]


def assert_close(actual, expected, name, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------------- golden


def only_checkpoint(folder: Path) -> Path:
    checkpoints = sorted(folder.glob("*.pt"))
    assert len(checkpoints) == 1, f"expected one original checkpoint (*.pt) in {folder}, found {checkpoints}"
    return checkpoints[0]


@pytest.fixture(scope="module")
def golden_chat(golden_dir):
    folder = golden_dir / "chat"
    return dict(
        config=load_json(folder / "config.json"),
        checkpoint=read_original_checkpoint(only_checkpoint(folder)),
        vision=load_file(folder / "vision.safetensors"),
        pixel_values=load_file(folder / "image_transform.safetensors")["pixel_values"],
    )


def golden_tower(golden_chat, attn_implementation: str) -> Beit3VisionModel:
    config = beit3_config_from_original(golden_chat["config"]["beit3"]["encoder_config"])
    config._attn_implementation = attn_implementation
    model = Beit3VisionModel(config).eval()
    assert model.config._attn_implementation == attn_implementation
    load_original_beit3(model, golden_chat["checkpoint"])
    return model


@pytest.mark.golden
def test_golden_config_and_key_map_cover_the_original_checkpoint(golden_chat):
    config = golden_chat["config"]
    model = golden_tower(golden_chat, "eager")
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


@pytest.mark.golden
@pytest.mark.parametrize("attn_implementation", ATTENTION)
def test_golden_vision_tower_parity(golden_chat, attn_implementation):
    model = golden_tower(golden_chat, attn_implementation)
    golden = golden_chat["vision"]
    query = golden_chat["checkpoint"]["query"].float()  # VisCPM's learned queries sit at the checkpoint's top level
    torch.testing.assert_close(query, golden["query"], rtol=0, atol=0)
    pixel_values = golden_chat["pixel_values"]

    with torch.no_grad():
        image_tokens = model.embeddings.embed_image(pixel_values)
        outputs = model(pixel_values, query_embeds=query, output_hidden_states=True)

    assert_close(image_tokens, golden["beit3.vision_embed_out"], "beit3.vision_embed_out")
    layer_outputs = golden["beit3.layer_outputs"]
    assert len(outputs.hidden_states) == len(layer_outputs) + 1  # the embeddings, then one per layer
    for layer, expected in enumerate(layer_outputs):
        assert_close(outputs.hidden_states[layer + 1], expected, f"beit3.layer_outputs[{layer}]")
    assert_close(outputs.last_hidden_state, golden["beit3.encoder_out_full"], "beit3.encoder_out_full")
    assert_close(outputs.query_hidden_states, golden["vpm_out_queries"], "vpm_out_queries")
    assert_close(
        outputs.last_hidden_state[:, model.num_image_tokens :], golden["vpm_out_queries"], "documented query slice"
    )


# ---------------------------------------------------------------------------------------------------- tiny

TINY = dict(
    hidden_size=32,
    num_attention_heads=4,
    intermediate_size=64,
    num_hidden_layers=2,
    image_size=32,
    patch_size=16,
    max_source_positions=16,
)
NUM_QUERIES = 3


def tiny_model(attn_implementation="eager", seed=0, **overrides) -> Beit3VisionModel:
    """A tiny tower with every parameter random (LayerNorm weights and biases too), so no expert is an identity."""
    config = Beit3VisionConfig(**{**TINY, **overrides})
    config._attn_implementation = attn_implementation
    model = Beit3VisionModel(config).eval()
    assert model.config._attn_implementation == attn_implementation
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.add_(1.0)
    return model


def tiny_inputs(batch=2, seed=1):
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch, 3, TINY["image_size"], TINY["image_size"], generator=generator)
    queries = torch.randn(NUM_QUERIES, TINY["hidden_size"], generator=generator)
    return pixel_values, queries


def run(model, pixel_values, queries=None):
    with torch.no_grad():
        return model(pixel_values, query_embeds=queries, output_hidden_states=True)


def test_output_layout():
    model = tiny_model()
    pixel_values, queries = tiny_inputs()
    outputs = run(model, pixel_values, queries)
    num_image_tokens = (TINY["image_size"] // TINY["patch_size"]) ** 2 + 1
    assert model.num_image_tokens == num_image_tokens
    assert outputs.last_hidden_state.shape == (2, num_image_tokens + NUM_QUERIES, TINY["hidden_size"])
    assert len(outputs.hidden_states) == TINY["num_hidden_layers"] + 1
    assert torch.equal(outputs.query_hidden_states, outputs.last_hidden_state[:, num_image_tokens:])
    # the final LayerNorm comes after the last hidden state
    assert not torch.allclose(outputs.hidden_states[-1], outputs.last_hidden_state)
    without_queries = run(model, pixel_values)
    assert without_queries.query_hidden_states is None
    assert without_queries.last_hidden_state.shape == (2, num_image_tokens, TINY["hidden_size"])
    as_tuple = model(pixel_values, query_embeds=queries, return_dict=False)
    assert torch.equal(as_tuple[1], outputs.query_hidden_states)


def test_save_and_reload_gives_identical_outputs(tmp_path):
    model = tiny_model()
    pixel_values, queries = tiny_inputs()
    model.save_pretrained(tmp_path)
    reloaded = Beit3VisionModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    for field in TINY:
        assert getattr(reloaded.config, field) == getattr(model.config, field), field
    expected = run(model, pixel_values, queries)
    actual = run(reloaded, pixel_values, queries)
    torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state, rtol=0, atol=0)


def test_sdpa_equals_eager():
    pixel_values, queries = tiny_inputs()
    eager = run(tiny_model("eager"), pixel_values, queries)
    sdpa = run(tiny_model("sdpa"), pixel_values, queries)
    for layer, (a, b) in enumerate(zip(sdpa.hidden_states, eager.hidden_states, strict=True)):
        assert_close(a, b, f"hidden_states[{layer}]")
    assert_close(sdpa.last_hidden_state, eager.last_hidden_state, "last_hidden_state")


def test_batch_equals_one_at_a_time():
    model = tiny_model()
    pixel_values, queries = tiny_inputs(batch=2)
    batched = run(model, pixel_values, queries).last_hidden_state
    for row in range(2):
        single = run(model, pixel_values[row : row + 1], queries).last_hidden_state
        assert_close(batched[row : row + 1], single, f"row {row}")


def test_shared_and_per_image_queries_agree():
    model = tiny_model()
    pixel_values, queries = tiny_inputs(batch=2)
    shared = run(model, pixel_values, queries).last_hidden_state
    per_image = run(model, pixel_values, queries[None].repeat(2, 1, 1)).last_hidden_state
    torch.testing.assert_close(per_image, shared, rtol=0, atol=0)
    # per-image queries really are per image
    different = queries[None].repeat(2, 1, 1)
    different[1] += torch.randn(different[1].shape, generator=torch.Generator().manual_seed(5))
    mixed = run(model, pixel_values, different).last_hidden_state
    torch.testing.assert_close(mixed[0], shared[0], rtol=0, atol=0)
    assert not torch.allclose(mixed[1], shared[1])


def perturbed(model, name, delta=1.0, rows=None):
    with torch.no_grad():
        parameter = model.get_parameter(name)
        if rows is None:
            parameter += delta
        else:
            parameter[rows] += delta
    return model


def token_changes(before, after):
    """Which tokens (by index) differ between two (batch, length, hidden) tensors."""
    return (before - after).abs().amax(dim=(0, 2)) > 0


def test_image_tokens_use_the_image_expert_and_queries_the_text_expert():
    """Would fail if the experts were swapped or the split were off by one."""
    pixel_values, queries = tiny_inputs()
    reference = run(tiny_model(), pixel_values, queries)
    num_image_tokens = tiny_model().num_image_tokens
    is_image = torch.arange(num_image_tokens + NUM_QUERIES) < num_image_tokens
    last = TINY["num_hidden_layers"] - 1
    for expert, expected in (("image", is_image), ("text", ~is_image)):
        # the last layer's FFN output bias moves exactly the tokens of that expert in the last layer's output
        model = perturbed(tiny_model(), f"encoder.layers.{last}.ffn.{expert}.fc2.bias")
        changed = token_changes(reference.hidden_states[-1], run(model, pixel_values, queries).hidden_states[-1])
        assert torch.equal(changed, expected), (expert, changed)
        # so does the final LayerNorm's bias in the final output
        model = perturbed(tiny_model(), f"encoder.layer_norm.{expert}.bias")
        changed = token_changes(reference.last_hidden_state, run(model, pixel_values, queries).last_hidden_state)
        assert torch.equal(changed, expected), (expert, changed)
        # and the first layer's query projection (attention mixes tokens, but each query row is its own expert's)
        model = perturbed(tiny_model(), f"encoder.layers.0.self_attn.q_proj.{expert}.bias", delta=0.5)
        changed = token_changes(reference.hidden_states[1], run(model, pixel_values, queries).hidden_states[1])
        assert torch.equal(changed, expected), (expert, changed)


def test_without_queries_the_text_expert_is_unused():
    pixel_values, _ = tiny_inputs()
    model = tiny_model()
    reference = run(model, pixel_values).last_hidden_state
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".text." in name or name.startswith("embeddings.text_"):
                parameter.add_(1.0)
    torch.testing.assert_close(run(model, pixel_values).last_hidden_state, reference, rtol=0, atol=0)


def test_position_tables_start_at_two_and_restart_for_the_queries():
    pixel_values, queries = tiny_inputs()
    reference = run(tiny_model(), pixel_values, queries).hidden_states[0]
    num_image_tokens = tiny_model().num_image_tokens
    # rows 0 and 1 of both tables are never read
    for table in ("image_position_embedding", "text_position_embedding"):
        model = perturbed(tiny_model(), f"embeddings.{table}.weight", rows=slice(0, 2))
        torch.testing.assert_close(run(model, pixel_values, queries).hidden_states[0], reference, rtol=0, atol=0)
    # image table row 2 is the [cls] token's, text table row 2 the first query's
    for table, token in (("image_position_embedding", 0), ("text_position_embedding", num_image_tokens)):
        model = perturbed(tiny_model(), f"embeddings.{table}.weight", rows=2)
        changed = token_changes(reference, run(model, pixel_values, queries).hidden_states[0])
        assert changed.nonzero().flatten().tolist() == [token], (table, changed)


def test_projections_are_plain_linears():
    """Swap every nn.Linear for a foreign module computing the same map, as bitsandbytes and peft do."""

    class ForeignLinear(nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.transposed = nn.Parameter(linear.weight.detach().t().clone())
            self.offset = nn.Parameter(linear.bias.detach().clone())

        def forward(self, x):
            return x @ self.transposed + self.offset

    model = tiny_model()
    pixel_values, queries = tiny_inputs()
    expected = run(model, pixel_values, queries).last_hidden_state
    projections = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    # q, k, v, out, fc1, fc2 per expert and layer
    assert len(projections) == 6 * 2 * TINY["num_hidden_layers"]
    assert all(type(module) is nn.Linear for _, module in projections)
    for name, module in projections:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, ForeignLinear(module))
    assert_close(run(model, pixel_values, queries).last_hidden_state, expected, "foreign linears")


def test_activation_checkpointing_gives_the_same_gradients():
    pixel_values, queries = tiny_inputs()
    grads = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(pixel_values, query_embeds=queries).query_hidden_states.square().sum().backward()
        grads.append(model.embeddings.patch_embedding.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0])


def test_input_errors():
    model = tiny_model()
    pixel_values, queries = tiny_inputs()
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        model(pixel_values[:, :, :16])
    with pytest.raises(ValueError, match="query_embeds must have shape"):
        model(pixel_values, query_embeds=queries[None].repeat(3, 1, 1))
    with pytest.raises(ValueError, match="do not fit the text position table"):
        model(pixel_values, query_embeds=torch.zeros(TINY["max_source_positions"] - 1, TINY["hidden_size"]))


# ---------------------------------------------------------------------------------------------------- conversion


def original_layout(model: Beit3VisionModel) -> dict:
    """`model` as an original VisCPM-Chat checkpoint (fp16), with the tensors the original has and we drop."""
    hidden = model.config.hidden_size
    state = {original_beit3_key(key): value.half() for key, value in model.state_dict().items()}
    state["vpm.beit3.text_embed.weight"] = torch.zeros(7, hidden, dtype=torch.float16)
    state["vpm.beit3.vision_embed.mask_token"] = torch.zeros(1, 1, hidden, dtype=torch.float16)
    state["vpm.mim_head.weight"] = torch.zeros(8, 4, dtype=torch.float16)
    state["vpm.mim_head.bias"] = torch.zeros(8, dtype=torch.float16)
    state["query"] = torch.zeros(NUM_QUERIES, hidden, dtype=torch.float16)
    state["llm.input_embedding.weight"] = torch.zeros(5, 4, dtype=torch.float16)
    return state


def test_key_map_round_trip_is_the_identity():
    keys = list(tiny_model().state_dict())
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
    source = tiny_model(seed=3)
    path = tmp_path / "original.pt"
    torch.save(original_layout(source), path)
    target = tiny_model(seed=4)
    load_original_beit3(target, read_original_checkpoint(path))
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value.half().float()), key


def test_mismatched_checkpoint_lists_every_offending_key():
    model = tiny_model()
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


def test_multiway_splits_on_the_token_axis():
    multiway = Beit3Multiway(lambda: nn.Identity())
    multiway.image = nn.Identity()
    multiway.text = nn.Module()
    multiway.text.forward = lambda x: -x
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    assert torch.equal(multiway(x, 2), torch.cat([x[:, :2], -x[:, 2:]], dim=1))
    assert torch.equal(multiway(x, 5), x)
    assert torch.equal(multiway(x, 0), -x)


@torch.no_grad()
def test_flex_attention_equals_eager():
    """transformers' FlexAttention path (compiled on first use: ~20 s on CPU; inference only there)."""
    eager, flex = tiny_model("eager"), tiny_model("flex_attention")
    pixel_values, queries = tiny_inputs()
    torch.testing.assert_close(
        flex(pixel_values, query_embeds=queries).last_hidden_state,
        eager(pixel_values, query_embeds=queries).last_hidden_state,
        rtol=1e-5,
        atol=1e-5,
    )
