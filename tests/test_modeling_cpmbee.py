"""CPM-Bee on tiny random configs, in the manner of transformers' own model tests: the forward pass, its structure
inputs, masks, attention implementations and the original's numerics.
"""

import inspect
import math

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, DynamicCache

from tiny_models import STRUCTURED_PER_TOKEN, TINY_VOCAB_SIZE, structured_prompt, tiny_causal_lm, tiny_cpmbee_config
from viscpm import CpmBeeConfig, CpmBeeForCausalLM, CpmBeeModel
from viscpm.modeling.modeling_cpmbee import CPMBEE_STRUCTURE_INPUTS, FEW_ROWS, project


def test_auto_classes_resolve_cpmbee():
    config = tiny_cpmbee_config(TINY_VOCAB_SIZE)
    assert isinstance(AutoConfig.for_model("cpmbee"), CpmBeeConfig)
    assert type(AutoModel.from_config(config)) is CpmBeeModel
    assert type(AutoModelForCausalLM.from_config(config)) is CpmBeeForCausalLM


def test_logits_cover_vocabulary_and_ext_table():
    model = tiny_causal_lm()
    inputs = structured_prompt(ext_size=3)
    logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], TINY_VOCAB_SIZE + 3)


def test_ext_table_id_equals_its_base_id_and_sub_id():
    """An id `vocab_size + k` embeds exactly as the (base id, sub-id) pair it stands for."""
    model = tiny_causal_lm()
    inputs = structured_prompt()
    raw = model(**inputs).logits
    base = dict(inputs)
    k = inputs["input_ids"][0, -1] - TINY_VOCAB_SIZE
    base["input_ids"] = inputs["input_ids"].clone()
    base["input_ids"][0, -1] = inputs["ext_table_ids"][0, k]
    base["input_id_subs"] = inputs["input_id_subs"].clone()
    base["input_id_subs"][0, -1] = inputs["ext_table_sub"][0, k]
    torch.testing.assert_close(model(**base).logits, raw)


def test_save_and_reload_gives_identical_outputs(tmp_path):
    model = tiny_causal_lm()
    inputs = structured_prompt()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is CpmBeeForCausalLM
    # the LM head is the input embedding, saved once
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.input_embedding.weight.data_ptr()
    torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def test_incremental_decoding_equals_full_forward():
    """Prefill the prompt, then feed the answer one token at a time through the cache."""
    model = tiny_causal_lm()
    inputs = structured_prompt(answer_length=5)
    full = model(**inputs).logits
    prompt_length = inputs["input_ids"].shape[1] - 5

    cache = DynamicCache(config=model.config)
    shared = {k: inputs[k] for k in ("segment_rel", "ext_table_ids", "ext_table_sub")}
    steps = [
        model(
            input_ids=inputs["input_ids"][:, :prompt_length],
            cache=cache,
            use_cache=True,
            **shared,
            **{k: inputs[k][:, :prompt_length] for k in STRUCTURED_PER_TOKEN},
        ).logits
    ]
    for end in range(prompt_length + 1, inputs["input_ids"].shape[1] + 1):
        steps.append(
            model(
                input_ids=inputs["input_ids"][:, end - 1 : end],
                cache=cache,
                use_cache=True,
                **shared,
                **{k: inputs[k][:, :end] for k in STRUCTURED_PER_TOKEN},
            ).logits
        )
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_the_structure_table_lists_what_the_model_reads():
    parameters = set(inspect.signature(CpmBeeModel.forward).parameters)
    not_structure = {"self", "input_ids", "inputs_embeds", "cache", "use_cache", "output_hidden_states", "kwargs"}
    assert parameters - not_structure == set(CPMBEE_STRUCTURE_INPUTS)


def test_structure_inputs_pass_through_the_head_and_generate_still_rejects_typos():
    model = tiny_causal_lm()
    inputs = structured_prompt()
    logits = model(**inputs).logits
    hidden = model.model(**inputs).last_hidden_state
    torch.testing.assert_close(logits, model.compute_logits(hidden, inputs["ext_table_ids"], inputs["ext_table_sub"]))
    with pytest.raises(ValueError, match="contxt"):
        model.generate(inputs["input_ids"], contxt=inputs["context"], max_new_tokens=1)


def test_structure_tensors_must_cover_cached_tokens():
    model = tiny_causal_lm()
    inputs = structured_prompt()
    cache = DynamicCache(config=model.config)
    model(**inputs, cache=cache, use_cache=True)
    with pytest.raises(ValueError, match="cached tokens included"):
        model(input_ids=inputs["input_ids"][:, -1:], context=inputs["context"][:, -1:], cache=cache, use_cache=True)


def test_sdpa_equals_eager():
    inputs = structured_prompt()
    eager = tiny_causal_lm(attn_implementation="eager")
    sdpa = tiny_causal_lm(attn_implementation="sdpa")
    assert sdpa.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    torch.testing.assert_close(sdpa(**inputs).logits, eager(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_left_padded_batch_equals_one_at_a_time():
    """Two samples of different lengths, left padded, give the logits each gives alone."""
    model = tiny_causal_lm()
    samples = [structured_prompt((4, 5), seed=1), structured_prompt((2, 3), answer_length=2, seed=2)]
    length = max(s["input_ids"].shape[1] for s in samples)
    rel_size = max(s["segment_rel"].shape[1] for s in samples)
    batch = {"attention_mask": torch.zeros(2, length, dtype=torch.long)}
    for name in ("input_ids",) + STRUCTURED_PER_TOKEN:
        batch[name] = torch.zeros(2, length, dtype=torch.long)
    batch["segment_rel"] = torch.zeros(2, rel_size, dtype=torch.long)
    for row, sample in enumerate(samples):
        n = sample["input_ids"].shape[1]
        batch["attention_mask"][row, length - n :] = 1
        for name in ("input_ids",) + STRUCTURED_PER_TOKEN:
            batch[name][row, length - n :] = sample[name][0]
        batch["segment_rel"][row, : sample["segment_rel"].shape[1]] = sample["segment_rel"][0]
    batch["ext_table_ids"] = torch.cat([s["ext_table_ids"] for s in samples])
    batch["ext_table_sub"] = torch.cat([s["ext_table_sub"] for s in samples])

    batched = model(**batch).logits
    for row, sample in enumerate(samples):
        n = sample["input_ids"].shape[1]
        torch.testing.assert_close(batched[row, length - n :], model(**sample).logits[0], rtol=1e-5, atol=1e-5)


def test_padding_queries_output_zero_attention():
    """A query that sees no key (padding) gets a zero attention output, as the original's masked softmax gives."""
    model = tiny_causal_lm(num_layers=1, mask_modules=[[False, True]])
    inputs = structured_prompt()
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["attention_mask"][0, -2:] = 0
    embeds = model.model.embed_tokens(
        inputs["input_ids"], inputs["input_id_subs"], inputs["ext_table_ids"], inputs["ext_table_sub"]
    )
    out = model.model(
        inputs_embeds=embeds, output_hidden_states=True, **{k: v for k, v in inputs.items() if k != "input_ids"}
    )
    # attention-only layer: (x + 0) / 1.05 at the padded positions
    torch.testing.assert_close(out.hidden_states[1][0, -2:], embeds[0, -2:] / 1.05)
    assert torch.isfinite(out.hidden_states[1]).all()


def test_mask_modules_drop_blocks():
    model = tiny_causal_lm(num_layers=3, mask_modules=[[True, False], [False, True], [False, False]])
    layers = model.model.encoder.layers
    assert layers[0].self_att is None and layers[0].ffn is not None
    assert layers[1].self_att is not None and layers[1].ffn is None
    assert model.model.first_attention_layer == 1
    inputs = structured_prompt(answer_length=3)
    full = model(**inputs).logits
    cache = DynamicCache(config=model.config)
    prefix = {k: inputs[k][:, :-1] for k in STRUCTURED_PER_TOKEN}
    shared = {k: inputs[k] for k in ("segment_rel", "ext_table_ids", "ext_table_sub")}
    first = model(input_ids=inputs["input_ids"][:, :-1], cache=cache, use_cache=True, **prefix, **shared).logits
    last = model(
        input_ids=inputs["input_ids"][:, -1:],
        cache=cache,
        use_cache=True,
        **shared,
        **{k: inputs[k] for k in STRUCTURED_PER_TOKEN},
    ).logits
    torch.testing.assert_close(torch.cat([first, last], 1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one \\(mask_attention, mask_ffn\\) pair per layer"):
        tiny_cpmbee_config(TINY_VOCAB_SIZE, num_layers=2, mask_modules=[[True, False]])


def test_heads_times_dim_head_may_differ_from_dim_model():
    model = tiny_causal_lm(num_heads=3, dim_head=16)
    assert model.model.encoder.layers[0].self_att.self_attention.project_q.weight.shape == (48, 32)
    assert model(**structured_prompt()).logits.isfinite().all()


def test_labels_give_mean_cross_entropy_without_shift():
    model = tiny_causal_lm()
    inputs = structured_prompt(ext_size=2)
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[0, -3:] = torch.tensor([5, TINY_VOCAB_SIZE + 1, 7])
    out = model(**inputs, labels=labels)
    expected = -torch.log_softmax(out.logits[0, -3:], -1)[torch.arange(3), labels[0, -3:]].mean()
    torch.testing.assert_close(out.loss, expected)


def test_projections_are_plain_linears_and_scales_live_outside():
    """Swap every nn.Linear for a foreign implementation of the same map, as bitsandbytes and peft do.

    If any scale lived inside a Linear's forward, or any code read `.weight` of a projection behind the module's
    back, the outputs would change.
    """

    class ForeignLinear(nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.transposed = nn.Parameter(linear.weight.detach().t().clone())

        def forward(self, x):
            return x @ self.transposed

    model = tiny_causal_lm()
    inputs = structured_prompt()
    expected = model.model(**{k: v for k, v in inputs.items()}).last_hidden_state
    projections = [(name, module) for name, module in model.model.named_modules() if isinstance(module, nn.Linear)]
    assert projections and all(type(module) is nn.Linear and module.bias is None for _, module in projections)
    for name, module in projections:
        parent, _, child = name.rpartition(".")
        setattr(model.model.get_submodule(parent), child, ForeignLinear(module))
    torch.testing.assert_close(model.model(**inputs).last_hidden_state, expected, rtol=1e-5, atol=1e-5)


def test_feed_forward_output_projection_scales_its_input_first():
    """The w_out input is divided by sqrt(dim_ff) before the matmul (fp16 range), all others after."""
    model = tiny_causal_lm()
    ffn = model.model.encoder.layers[0].ffn.ffn
    seen = {}
    ffn.w_out.register_forward_pre_hook(lambda module, args: seen.update(x=args[0]))
    x = torch.randn(1, 3, 32)
    inner = ffn.w_in(x)
    ffn(x)
    torch.testing.assert_close(seen["x"], inner / math.sqrt(model.config.dim_ff))


def test_gradient_checkpointing_gives_the_same_gradients():
    inputs = structured_prompt()
    labels = inputs["input_ids"].clone()
    grads = []
    for checkpointing in (False, True):
        model = tiny_causal_lm().train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(**inputs, labels=labels).loss.backward()
        grads.append(model.model.position_bias.relative_attention_bias.grad.clone())
    torch.testing.assert_close(grads[1], grads[0])


def test_few_row_projection_equals_the_module_and_respects_replaced_forwards():
    torch.manual_seed(0)
    linear = nn.Linear(8, 5)
    for rows in (1, FEW_ROWS, FEW_ROWS + 1):
        x = torch.randn(1, rows, 8)
        torch.testing.assert_close(project(linear, x), linear(x))

    calls = []
    linear.register_forward_hook(lambda module, args, output: calls.append("hook"))

    class Subclassed(nn.Linear):
        def forward(self, x):
            calls.append("subclass")
            return super().forward(x)

    replaced = nn.Linear(8, 5)
    replaced.forward = lambda x: calls.append("instance") or nn.Linear.forward(replaced, x)  # as accelerate does
    for module in (linear, Subclassed(8, 5), replaced):
        project(module, torch.randn(1, 2, 8))
    assert calls == ["hook", "subclass", "instance"]


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_fully_masked_queries_stay_finite_in_half_precision(attn_implementation):
    """In fp16 a masked score (finfo.min plus a score below -16) overflows to -inf: a padding row would be all -inf
    and softmax would give NaN. Queries that see no key must still produce finite (zero) attention output.

    Every token embeds to the same vector and keys are minus the queries, so every score is a large negative number.
    """
    model = tiny_causal_lm(attn_implementation=attn_implementation, num_layers=1)
    attention = model.model.encoder.layers[0].self_att.self_attention
    with torch.no_grad():
        model.model.input_embedding.weight.copy_(torch.randn(1, 32).expand(TINY_VOCAB_SIZE, -1) * 10)
        attention.project_q.weight.mul_(10)
        attention.project_k.weight.copy_(-attention.project_q.weight)
    model = model.half()
    inputs = structured_prompt()
    inputs["input_id_subs"] = torch.zeros_like(inputs["input_ids"])
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["attention_mask"][0, :3] = 0
    hidden = model.model(**inputs, output_hidden_states=True).hidden_states[1]
    assert torch.isfinite(hidden).all()
    hidden.float().sum().backward()
    assert torch.isfinite(attention.project_q.weight.grad).all()


def test_ext_id_without_ext_table_is_a_clear_error():
    model = tiny_causal_lm()
    with pytest.raises(ValueError, match="no ext table was given"):
        model(input_ids=torch.tensor([[1, TINY_VOCAB_SIZE + 2]]))


@torch.no_grad()
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # CPU: eager flex on purpose
def test_flex_attention_equals_eager_without_a_dense_bias():
    """FlexAttention computes the bucketed bias inside its score function and the mask as a block mask (inference
    only on CPU: FlexAttention has no CPU backward). Same outputs as eager, with padding and a cache."""
    eager = tiny_causal_lm(attn_implementation="eager")
    flex = tiny_causal_lm(attn_implementation="flex_attention")
    inputs = structured_prompt(answer_length=3)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["attention_mask"][0, :2] = 0  # left padding
    expected = eager(**inputs).logits
    torch.testing.assert_close(flex(**inputs).logits, expected, rtol=1e-5, atol=1e-5)

    prompt_length = inputs["input_ids"].shape[1] - 2
    cache = DynamicCache(config=flex.config)
    shared = {k: inputs[k] for k in ("segment_rel", "ext_table_ids", "ext_table_sub")}
    per_token = STRUCTURED_PER_TOKEN + ("attention_mask",)
    first = flex(
        input_ids=inputs["input_ids"][:, :prompt_length],
        cache=cache,
        use_cache=True,
        **shared,
        **{k: inputs[k][:, :prompt_length] for k in per_token},
    ).logits
    rest = flex(
        input_ids=inputs["input_ids"][:, prompt_length:],
        cache=cache,
        use_cache=True,
        **shared,
        **{k: inputs[k] for k in per_token},
    ).logits
    torch.testing.assert_close(torch.cat([first, rest], 1), expected, rtol=1e-5, atol=1e-5)


def test_flex_attention_never_builds_the_dense_bias(monkeypatch):
    model = tiny_causal_lm(attn_implementation="flex_attention")

    def refuse(*args, **kwargs):
        raise AssertionError("the dense L x L bias was built")

    monkeypatch.setattr(model.model, "attention_bias", refuse)
    with torch.no_grad():
        assert model(**structured_prompt()).logits.isfinite().all()
