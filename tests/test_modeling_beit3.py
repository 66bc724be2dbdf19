"""The BEiT-3 vision tower of VisCPM-Chat: golden parity with the original, and tiny random configs.

Golden tests load the original tiny checkpoint through the conversion code users run
(`viscpm.conversion.beit3`) and compare with the original's outputs in `chat/vision.safetensors`
(manifest tolerance fp32 rtol=1e-4, atol=1e-5). Every dimension comes from the golden folder.
"""

import pytest
import torch
from torch import nn

from original_checkpoints import golden_vision_tower, read_golden_chat
from tiny_models import TINY_VISION, tiny_vision_tower
from viscpm.modeling.modeling_beit3 import Beit3Multiway, Beit3VisionModel

RTOL, ATOL = 1e-4, 1e-5
ATTENTION = ["eager", "sdpa"]


def assert_close(actual, expected, name, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.golden
@pytest.mark.parametrize("attn_implementation", ATTENTION)
def test_golden_vision_tower_parity(golden_dir, attn_implementation):
    golden_chat = read_golden_chat(golden_dir)
    model = golden_vision_tower(golden_dir, attn_implementation)
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


# 5 image tokens + 4 queries: torch's own compiled FlexAttention returns NaN or wrong values on some CPUs for
# sequences of 8, 24, 40, ... tokens (measured: AMD EPYC, torch 2.13; docs/viscpm-chat.md), whatever the model
NUM_QUERIES = 4


def tiny_inputs(batch=2, seed=1):
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch, 3, TINY_VISION["image_size"], TINY_VISION["image_size"], generator=generator)
    queries = torch.randn(NUM_QUERIES, TINY_VISION["hidden_size"], generator=generator)
    return pixel_values, queries


def run(model, pixel_values, queries=None):
    with torch.no_grad():
        return model(pixel_values, query_embeds=queries, output_hidden_states=True)


def test_output_layout():
    model = tiny_vision_tower()
    pixel_values, queries = tiny_inputs()
    outputs = run(model, pixel_values, queries)
    num_image_tokens = (TINY_VISION["image_size"] // TINY_VISION["patch_size"]) ** 2 + 1
    assert model.num_image_tokens == num_image_tokens
    assert outputs.last_hidden_state.shape == (2, num_image_tokens + NUM_QUERIES, TINY_VISION["hidden_size"])
    assert len(outputs.hidden_states) == TINY_VISION["num_hidden_layers"] + 1
    assert torch.equal(outputs.query_hidden_states, outputs.last_hidden_state[:, num_image_tokens:])
    # the final LayerNorm comes after the last hidden state
    assert not torch.allclose(outputs.hidden_states[-1], outputs.last_hidden_state)
    without_queries = run(model, pixel_values)
    assert without_queries.query_hidden_states is None
    assert without_queries.last_hidden_state.shape == (2, num_image_tokens, TINY_VISION["hidden_size"])
    as_tuple = model(pixel_values, query_embeds=queries, return_dict=False)
    assert torch.equal(as_tuple[1], outputs.query_hidden_states)


def test_save_and_reload_gives_identical_outputs(tmp_path):
    model = tiny_vision_tower()
    pixel_values, queries = tiny_inputs()
    model.save_pretrained(tmp_path)
    reloaded = Beit3VisionModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    for field in TINY_VISION:
        assert getattr(reloaded.config, field) == getattr(model.config, field), field
    expected = run(model, pixel_values, queries)
    actual = run(reloaded, pixel_values, queries)
    torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state, rtol=0, atol=0)


def test_sdpa_equals_eager():
    pixel_values, queries = tiny_inputs()
    eager = run(tiny_vision_tower("eager"), pixel_values, queries)
    sdpa = run(tiny_vision_tower("sdpa"), pixel_values, queries)
    for layer, (a, b) in enumerate(zip(sdpa.hidden_states, eager.hidden_states, strict=True)):
        assert_close(a, b, f"hidden_states[{layer}]")
    assert_close(sdpa.last_hidden_state, eager.last_hidden_state, "last_hidden_state")


def test_batch_equals_one_at_a_time():
    model = tiny_vision_tower()
    pixel_values, queries = tiny_inputs(batch=2)
    batched = run(model, pixel_values, queries).last_hidden_state
    for row in range(2):
        single = run(model, pixel_values[row : row + 1], queries).last_hidden_state
        assert_close(batched[row : row + 1], single, f"row {row}")


def test_shared_and_per_image_queries_agree():
    model = tiny_vision_tower()
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
    reference = run(tiny_vision_tower(), pixel_values, queries)
    num_image_tokens = tiny_vision_tower().num_image_tokens
    is_image = torch.arange(num_image_tokens + NUM_QUERIES) < num_image_tokens
    last = TINY_VISION["num_hidden_layers"] - 1
    for expert, expected in (("image", is_image), ("text", ~is_image)):
        # the last layer's FFN output bias moves exactly the tokens of that expert in the last layer's output
        model = perturbed(tiny_vision_tower(), f"encoder.layers.{last}.ffn.{expert}.fc2.bias")
        changed = token_changes(reference.hidden_states[-1], run(model, pixel_values, queries).hidden_states[-1])
        assert torch.equal(changed, expected), (expert, changed)
        # so does the final LayerNorm's bias in the final output
        model = perturbed(tiny_vision_tower(), f"encoder.layer_norm.{expert}.bias")
        changed = token_changes(reference.last_hidden_state, run(model, pixel_values, queries).last_hidden_state)
        assert torch.equal(changed, expected), (expert, changed)
        # and the first layer's query projection (attention mixes tokens, but each query row is its own expert's)
        model = perturbed(tiny_vision_tower(), f"encoder.layers.0.self_attn.q_proj.{expert}.bias", delta=0.5)
        changed = token_changes(reference.hidden_states[1], run(model, pixel_values, queries).hidden_states[1])
        assert torch.equal(changed, expected), (expert, changed)


def test_without_queries_the_text_expert_is_unused():
    pixel_values, _ = tiny_inputs()
    model = tiny_vision_tower()
    reference = run(model, pixel_values).last_hidden_state
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".text." in name or name.startswith("embeddings.text_"):
                parameter.add_(1.0)
    torch.testing.assert_close(run(model, pixel_values).last_hidden_state, reference, rtol=0, atol=0)


def test_position_tables_start_at_two_and_restart_for_the_queries():
    pixel_values, queries = tiny_inputs()
    reference = run(tiny_vision_tower(), pixel_values, queries).hidden_states[0]
    num_image_tokens = tiny_vision_tower().num_image_tokens
    # rows 0 and 1 of both tables are never read
    for table in ("image_position_embedding", "text_position_embedding"):
        model = perturbed(tiny_vision_tower(), f"embeddings.{table}.weight", rows=slice(0, 2))
        torch.testing.assert_close(run(model, pixel_values, queries).hidden_states[0], reference, rtol=0, atol=0)
    # image table row 2 is the [cls] token's, text table row 2 the first query's
    for table, token in (("image_position_embedding", 0), ("text_position_embedding", num_image_tokens)):
        model = perturbed(tiny_vision_tower(), f"embeddings.{table}.weight", rows=2)
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

    model = tiny_vision_tower()
    pixel_values, queries = tiny_inputs()
    expected = run(model, pixel_values, queries).last_hidden_state
    projections = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    # q, k, v, out, fc1, fc2 per expert and layer
    assert len(projections) == 6 * 2 * TINY_VISION["num_hidden_layers"]
    assert all(type(module) is nn.Linear for _, module in projections)
    for name, module in projections:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, ForeignLinear(module))
    assert_close(run(model, pixel_values, queries).last_hidden_state, expected, "foreign linears")


def test_activation_checkpointing_gives_the_same_gradients():
    pixel_values, queries = tiny_inputs()
    grads = []
    for checkpointing in (False, True):
        model = tiny_vision_tower().train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(pixel_values, query_embeds=queries).query_hidden_states.square().sum().backward()
        grads.append(model.embeddings.patch_embedding.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0])


def test_input_errors():
    model = tiny_vision_tower()
    pixel_values, queries = tiny_inputs()
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        model(pixel_values[:, :, :16])
    with pytest.raises(ValueError, match="query_embeds must have shape"):
        model(pixel_values, query_embeds=queries[None].repeat(3, 1, 1))
    with pytest.raises(ValueError, match="do not fit the text position table"):
        model(
            pixel_values, query_embeds=torch.zeros(TINY_VISION["max_source_positions"] - 1, TINY_VISION["hidden_size"])
        )


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
    eager, flex = tiny_vision_tower("eager"), tiny_vision_tower("flex_attention")
    pixel_values, queries = tiny_inputs()
    torch.testing.assert_close(
        flex(pixel_values, query_embeds=queries).last_hidden_state,
        eager(pixel_values, query_embeds=queries).last_hidden_state,
        rtol=1e-5,
        atol=1e-5,
    )
