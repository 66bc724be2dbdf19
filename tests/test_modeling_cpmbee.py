"""CPM-Bee on tiny random configs, in the manner of transformers' own model tests."""

import inspect
import math

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, DynamicCache
from transformers.cache_utils import DynamicLayer

from tiny_models import tiny_cpmbee_config
from viscpm import CpmBeeConfig, CpmBeeForCausalLM, CpmBeeModel
from viscpm.modeling.modeling_cpmbee import CPMBEE_STRUCTURE_INPUTS, FEW_ROWS, CpmBeeBeamCacheLayer, project

VOCAB = 97


def tiny_config(**overrides) -> CpmBeeConfig:
    return tiny_cpmbee_config(VOCAB, **overrides)


def tiny_model(seed=0, **overrides) -> CpmBeeForCausalLM:
    torch.manual_seed(seed)
    return CpmBeeForCausalLM(tiny_config(**overrides)).eval()


def structured_prompt(prompt_lengths=(4, 5), answer_length=3, ext_size=2, seed=0) -> dict:
    """One sample of three segments: two context segments, then an answer segment (context 0).

    The segment relations are random buckets (0 on the diagonal: same segment); the answer holds one ext-table id.
    """
    generator = torch.Generator().manual_seed(seed)
    lengths = list(prompt_lengths) + [answer_length]
    total = sum(lengths)
    segment_ids = torch.cat([torch.full((n,), index) for index, n in enumerate(lengths)])
    num_segments = len(lengths)
    relation = torch.randint(2, 30, (num_segments, num_segments), generator=generator)
    relation.fill_diagonal_(0)
    input_ids = torch.randint(0, VOCAB, (total,), generator=generator)
    input_ids[-1] = VOCAB + ext_size - 1  # an ext-table token
    return dict(
        input_ids=input_ids[None],
        input_id_subs=torch.randint(0, 3, (1, total), generator=generator),
        context=(segment_ids < len(prompt_lengths))[None].long(),
        segment_ids=segment_ids[None],
        num_segments=torch.full((1, total), num_segments),
        segment_rel_offset=torch.zeros(1, total, dtype=torch.long),
        sample_ids=torch.zeros(1, total, dtype=torch.long),
        segment_rel=relation.flatten()[None],
        ext_table_ids=torch.randint(0, VOCAB, (1, ext_size), generator=generator),
        ext_table_sub=torch.randint(1, 4, (1, ext_size), generator=generator),
    )


PER_TOKEN = ("input_id_subs", "context", "segment_ids", "num_segments", "segment_rel_offset", "sample_ids")


def test_auto_classes_resolve_cpmbee():
    config = tiny_config()
    assert isinstance(AutoConfig.for_model("cpmbee"), CpmBeeConfig)
    assert type(AutoModel.from_config(config)) is CpmBeeModel
    assert type(AutoModelForCausalLM.from_config(config)) is CpmBeeForCausalLM


def test_logits_cover_vocabulary_and_ext_table():
    model = tiny_model()
    inputs = structured_prompt(ext_size=3)
    logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], VOCAB + 3)


def test_ext_table_id_equals_its_base_id_and_sub_id():
    """An id `vocab_size + k` embeds exactly as the (base id, sub-id) pair it stands for."""
    model = tiny_model()
    inputs = structured_prompt()
    raw = model(**inputs).logits
    base = dict(inputs)
    k = inputs["input_ids"][0, -1] - VOCAB
    base["input_ids"] = inputs["input_ids"].clone()
    base["input_ids"][0, -1] = inputs["ext_table_ids"][0, k]
    base["input_id_subs"] = inputs["input_id_subs"].clone()
    base["input_id_subs"][0, -1] = inputs["ext_table_sub"][0, k]
    torch.testing.assert_close(model(**base).logits, raw)


def test_save_and_reload_gives_identical_outputs(tmp_path):
    model = tiny_model()
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
    model = tiny_model()
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
            **{k: inputs[k][:, :prompt_length] for k in PER_TOKEN},
        ).logits
    ]
    for end in range(prompt_length + 1, inputs["input_ids"].shape[1] + 1):
        steps.append(
            model(
                input_ids=inputs["input_ids"][:, end - 1 : end],
                cache=cache,
                use_cache=True,
                **shared,
                **{k: inputs[k][:, :end] for k in PER_TOKEN},
            ).logits
        )
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_the_structure_table_lists_what_the_model_reads():
    parameters = set(inspect.signature(CpmBeeModel.forward).parameters)
    not_structure = {"self", "input_ids", "inputs_embeds", "cache", "use_cache", "output_hidden_states", "kwargs"}
    assert parameters - not_structure == set(CPMBEE_STRUCTURE_INPUTS)


def test_structure_inputs_pass_through_the_head_and_generate_still_rejects_typos():
    model = tiny_model()
    inputs = structured_prompt()
    logits = model(**inputs).logits
    hidden = model.model(**inputs).last_hidden_state
    torch.testing.assert_close(logits, model.compute_logits(hidden, inputs["ext_table_ids"], inputs["ext_table_sub"]))
    with pytest.raises(ValueError, match="contxt"):
        model.generate(inputs["input_ids"], contxt=inputs["context"], max_new_tokens=1)


def test_structure_tensors_must_cover_cached_tokens():
    model = tiny_model()
    inputs = structured_prompt()
    cache = DynamicCache(config=model.config)
    model(**inputs, cache=cache, use_cache=True)
    with pytest.raises(ValueError, match="cached tokens included"):
        model(input_ids=inputs["input_ids"][:, -1:], context=inputs["context"][:, -1:], cache=cache, use_cache=True)


def test_sdpa_equals_eager():
    inputs = structured_prompt()
    eager = tiny_model(attn_implementation="eager")
    sdpa = tiny_model(attn_implementation="sdpa")
    assert sdpa.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    torch.testing.assert_close(sdpa(**inputs).logits, eager(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_left_padded_batch_equals_one_at_a_time():
    """Two samples of different lengths, left padded, give the logits each gives alone."""
    model = tiny_model()
    samples = [structured_prompt((4, 5), seed=1), structured_prompt((2, 3), answer_length=2, seed=2)]
    length = max(s["input_ids"].shape[1] for s in samples)
    rel_size = max(s["segment_rel"].shape[1] for s in samples)
    batch = {"attention_mask": torch.zeros(2, length, dtype=torch.long)}
    for name in ("input_ids",) + PER_TOKEN:
        batch[name] = torch.zeros(2, length, dtype=torch.long)
    batch["segment_rel"] = torch.zeros(2, rel_size, dtype=torch.long)
    for row, sample in enumerate(samples):
        n = sample["input_ids"].shape[1]
        batch["attention_mask"][row, length - n :] = 1
        for name in ("input_ids",) + PER_TOKEN:
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
    model = tiny_model(num_layers=1, mask_modules=[[False, True]])
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
    model = tiny_model(num_layers=3, mask_modules=[[True, False], [False, True], [False, False]])
    layers = model.model.encoder.layers
    assert layers[0].self_att is None and layers[0].ffn is not None
    assert layers[1].self_att is not None and layers[1].ffn is None
    assert model.model.first_attention_layer == 1
    inputs = structured_prompt(answer_length=3)
    full = model(**inputs).logits
    cache = DynamicCache(config=model.config)
    prefix = {k: inputs[k][:, :-1] for k in PER_TOKEN}
    shared = {k: inputs[k] for k in ("segment_rel", "ext_table_ids", "ext_table_sub")}
    first = model(input_ids=inputs["input_ids"][:, :-1], cache=cache, use_cache=True, **prefix, **shared).logits
    last = model(
        input_ids=inputs["input_ids"][:, -1:],
        cache=cache,
        use_cache=True,
        **shared,
        **{k: inputs[k] for k in PER_TOKEN},
    ).logits
    torch.testing.assert_close(torch.cat([first, last], 1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one \\(mask_attention, mask_ffn\\) pair per layer"):
        tiny_config(num_layers=2, mask_modules=[[True, False]])


def test_heads_times_dim_head_may_differ_from_dim_model():
    model = tiny_model(num_heads=3, dim_head=16)
    assert model.model.encoder.layers[0].self_att.self_attention.project_q.weight.shape == (48, 32)
    assert model(**structured_prompt()).logits.isfinite().all()


def test_labels_give_mean_cross_entropy_without_shift():
    model = tiny_model()
    inputs = structured_prompt(ext_size=2)
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[0, -3:] = torch.tensor([5, VOCAB + 1, 7])
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

    model = tiny_model()
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
    model = tiny_model()
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
        model = tiny_model().train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(**inputs, labels=labels).loss.backward()
        grads.append(model.model.position_bias.relative_attention_bias.grad.clone())
    torch.testing.assert_close(grads[1], grads[0])


def generation_prompt(seed=0):
    """A structured prompt ending with the answer segment's first token, ready for generate()."""
    inputs = structured_prompt((4, 5), answer_length=1, seed=seed)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["input_ids"][0, -1] = 3  # plays the answer's <s>
    return inputs


def extend_structure(inputs, new_tokens):
    """Structure of generated tokens: answer tokens continuing the last segment."""
    extended = dict(inputs)
    extended["input_ids"] = torch.cat([inputs["input_ids"], new_tokens], 1)
    n = new_tokens.shape[1]
    for name in PER_TOKEN + ("attention_mask",):
        last = inputs[name][:, -1:]
        fill = {"input_id_subs": 0, "context": 0, "attention_mask": 1}.get(name)
        new = last.expand(-1, n) if fill is None else torch.full_like(last.expand(-1, n), fill)
        extended[name] = torch.cat([inputs[name], new], 1)
    return extended


def test_greedy_generate_equals_argmax_loop_without_cache():
    model = tiny_model()
    inputs = generation_prompt()
    generated = model.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    new_tokens = generated[:, inputs["input_ids"].shape[1] :]
    assert new_tokens.shape[1] == 6
    expected = torch.empty(1, 0, dtype=torch.long)
    for _ in range(6):
        logits = model(**extend_structure(inputs, expected), use_cache=False).logits
        expected = torch.cat([expected, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(new_tokens, expected)
    # generated ids above vocab_size are ext-table entries fed back through the table
    assert generated.max() < VOCAB + inputs["ext_table_ids"].shape[1]


# three beams, all returned with their scores, every answer of the length asked (no end token)
THREE_BEAMS_FORCED = dict(
    num_beams=3,
    num_return_sequences=3,
    do_sample=False,
    eos_token_id=None,
    pad_token_id=0,
    output_scores=True,
    return_dict_in_generate=True,
)


def test_beam_search_scores_equal_full_forward_log_probs():
    """Beam search reorders the cache and the per-beam structure; its scores must match a fresh forward."""
    model = tiny_model()
    inputs = generation_prompt(seed=3)
    out = model.generate(**inputs, **THREE_BEAMS_FORCED, max_new_tokens=5, min_new_tokens=5, length_penalty=1.0)
    prompt_length = inputs["input_ids"].shape[1]
    for sequence, score in zip(out.sequences, out.sequences_scores):
        new_tokens = sequence[None, prompt_length:]
        logits = model(**extend_structure(inputs, new_tokens[:, :-1]), use_cache=False).logits[0, prompt_length - 1 :]
        log_probs = torch.log_softmax(logits.float(), -1).gather(1, new_tokens[0][:, None]).sum()
        torch.testing.assert_close(score * new_tokens.shape[1], log_probs, rtol=1e-4, atol=1e-4)


def test_beam_search_with_the_in_place_cache_equals_a_plain_dynamic_cache():
    """generate() prefills once into `CpmBeeBeamCacheLayer`s; a caller's `DynamicCache` takes transformers' path."""
    model = tiny_model()
    inputs = generation_prompt(seed=5)
    kwargs = dict(THREE_BEAMS_FORCED, max_new_tokens=6, min_new_tokens=6)
    in_place = model.generate(**inputs, **kwargs)
    plain = model.generate(**inputs, cache=DynamicCache(config=model.config), **kwargs)
    assert torch.equal(in_place.sequences, plain.sequences)
    torch.testing.assert_close(in_place.sequences_scores, plain.sequences_scores)


def finish_step(model, topk_log_probs, finishing, *, step, beam_scores=None, length_penalty=1.0):
    """One call of beam search's bookkeeping as transformers' loop makes it: one sentence, two beams, four
    candidates (best first), `finishing` marking the candidates that end with `</s>`; the prompt is 3 tokens."""
    num_beams, prompt_length, max_length = 2, 3, 12
    candidates = len(finishing)
    finished = beam_scores is not None
    unsatisfied = torch.ones(1, 1, dtype=torch.bool)
    sequences, beam_scores, _, is_sent_finished = model._update_finished_beams(
        sequences=torch.zeros(1, num_beams, max_length, dtype=torch.long),
        topk_running_sequences=torch.arange(candidates)[None, :, None].expand(1, candidates, max_length).clone(),
        beam_scores=torch.tensor([beam_scores if finished else [-1e9] * num_beams]),
        topk_log_probs=torch.tensor([topk_log_probs]),
        beam_indices=torch.full((1, num_beams, max_length - prompt_length), -1),
        topk_running_beam_indices=torch.full((1, candidates, max_length - prompt_length), -1),
        is_early_stop_heuristic_unsatisfied=unsatisfied,
        is_sent_finished=torch.full((1, num_beams), finished),
        next_token_hits_stopping_criteria=torch.tensor([finishing]),
        top_num_beam_mask=torch.arange(candidates) < num_beams,
        num_beams=num_beams,
        cur_len=prompt_length + step,
        decoder_prompt_len=prompt_length,
        length_penalty=length_penalty,
        early_stopping=False,
    )
    return sequences[0, :, 0].tolist(), beam_scores[0].tolist(), is_sent_finished[0].tolist(), bool(unsatisfied)


def test_beam_search_finishes_an_end_token_below_the_top_beams_as_the_original():
    """The original walks the candidates best first until `num_beams` unfinished ones run: a `</s>` at rank 2 with one
    unfinished candidate above it finishes (transformers alone finishes only within the top `num_beams` ranks)."""
    model = tiny_model()
    candidates, _, finished, _ = finish_step(model, [-1.0, -2.0, -3.0, -4.0], [True, False, True, False], step=1)
    assert candidates == [0, 2] and finished == [True, True]
    # two unfinished candidates above it fill the beams first: it does not finish
    candidates, _, finished, _ = finish_step(model, [-1.0, -2.0, -3.0, -4.0], [False, False, True, False], step=1)
    assert finished == [False, False]


def test_beam_search_stops_a_sentence_by_the_original_test():
    """Once `num_beams` hypotheses are finished, the original stops at step i (0-based) when the worst of them is
    at least the step's best candidate score / i ** length_penalty; then nothing more finishes."""
    model = tiny_model()
    finished_scores = [-0.5, -0.9]
    # step 2: best candidate -2.0 / 2 = -1.0 <= -0.9: done, and its </s>, better than the worst (-2.0 / 3 > -0.9),
    # is not taken
    _, scores, _, unsatisfied = finish_step(model, [-2.0, -4.0, -5.0, -6.0], [True, False, False, False], step=2,
                                            beam_scores=finished_scores)  # fmt: skip
    assert not unsatisfied and scores == pytest.approx(finished_scores)
    # step 2, best candidate -1.6 / 2 = -0.8 > -0.9: not done, and the better </s> (-1.6 / 3) replaces the worst
    _, scores, _, unsatisfied = finish_step(model, [-1.6, -4.0, -5.0, -6.0], [True, False, False, False], step=2,
                                            beam_scores=finished_scores)  # fmt: skip
    assert unsatisfied
    assert scores == pytest.approx([-0.5, -1.6 / 3])


def test_beam_cache_layer_follows_dynamic_layer_through_every_operation():
    generator = torch.Generator().manual_seed(0)
    ours, reference = CpmBeeBeamCacheLayer(), DynamicLayer()

    def states(batch, length):
        return [torch.randn(batch, 2, length, 4, generator=generator) for _ in range(2)]

    def check():
        assert ours.get_seq_length() == reference.get_seq_length()
        assert torch.equal(ours.keys, reference.keys) and torch.equal(ours.values, reference.values)

    for layer in (ours, reference):
        assert layer.get_seq_length() == 0
    prompt = states(1, 70)
    for layer in (ours, reference):
        layer.update(*prompt)
        layer.batch_repeat_interleave(3)
    check()
    for beam_idx in ([0, 1, 2], [2, 0, 0], [1, 1, 2], [0, 2, 1]):
        step = states(3, 1)
        for layer in (ours, reference):
            layer.update(*step)
            layer.reorder_cache(torch.tensor(beam_idx))
        check()
    many = states(3, 90)  # beyond the headroom: the buffer grows
    for layer in (ours, reference):
        layer.update(*many)
        layer.crop(-5)
        layer.batch_select_indices(torch.tensor([2, 0]))
    check()
    step = states(2, 1)
    for layer in (ours, reference):
        layer.update(*step)
    check()


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


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    model = tiny_model()
    inputs = generation_prompt(seed=4)
    kwargs = dict(max_new_tokens=5, eos_token_id=None, pad_token_id=0)
    greedy = model.generate(**inputs, do_sample=False, **kwargs)
    torch.manual_seed(0)
    first = model.generate(**inputs, do_sample=True, temperature=1.5, **kwargs)
    torch.manual_seed(0)
    second = model.generate(**inputs, do_sample=True, temperature=1.5, **kwargs)
    assert torch.equal(first, second)
    assert torch.equal(model.generate(**inputs, do_sample=True, top_k=1, **kwargs), greedy)


def test_plain_text_generation_without_structure():
    """Without structured inputs CPM-Bee is a plain causal LM over one segment."""
    model = tiny_model()
    input_ids = torch.tensor([[5, 6, 7, 8]])
    out = model.generate(input_ids, max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0)
    logits = model(out[:, :-1]).logits
    assert torch.equal(out[0, 4:], logits[0, 3:].argmax(-1))


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_fully_masked_queries_stay_finite_in_half_precision(attn_implementation):
    """In fp16 a masked score (finfo.min plus a score below -16) overflows to -inf: a padding row would be all -inf
    and softmax would give NaN. Queries that see no key must still produce finite (zero) attention output.

    Every token embeds to the same vector and keys are minus the queries, so every score is a large negative number.
    """
    model = tiny_model(attn_implementation=attn_implementation, num_layers=1)
    attention = model.model.encoder.layers[0].self_att.self_attention
    with torch.no_grad():
        model.model.input_embedding.weight.copy_(torch.randn(1, 32).expand(VOCAB, -1) * 10)
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
    model = tiny_model()
    with pytest.raises(ValueError, match="no ext table was given"):
        model(input_ids=torch.tensor([[1, VOCAB + 2]]))


def test_answer_logits_processor_follows_the_original_order():
    """Suppress, then CTRL penalty on raw logits over the answer (ext ids as their base id), then temperature."""
    from viscpm.modeling.modeling_cpmbee import CpmBeeAnswerLogitsProcessor

    vocab = 6
    scores = torch.tensor([[2.0, -2.0, 4.0, -4.0, 1.0, 3.0, 5.0, 7.0]])  # 6 vocab columns + 2 ext columns
    # prompt [0, 1], answer starts at index 2: <s>=4 then ext id 7 (= base id 3) and token 2
    input_ids = torch.tensor([[0, 1, 4, 7, 2]])
    processor = CpmBeeAnswerLogitsProcessor(
        answer_start=torch.tensor([2]),
        vocab_size=vocab,
        suppress_token_ids=torch.tensor([[6, -1]]),
        ext_table_ids=torch.tensor([[5, 3]]),
        repetition_penalty=2.0,
        temperature=0.5,
    )
    expected = torch.tensor([[2.0, -2.0, 2.0, -8.0, 0.5, 3.0, -10000.0, 7.0]]) / 0.5
    torch.testing.assert_close(processor(input_ids, scores), expected)
    # beams: each sample's rows are consecutive; row 1 belongs to the same sample
    doubled = processor(input_ids.repeat(2, 1), scores.repeat(2, 1))
    torch.testing.assert_close(doubled, expected.repeat(2, 1))


def test_generate_applies_penalty_and_temperature_once():
    """generate()'s repetition_penalty / temperature are CPM-Bee's, applied once on raw logits of the answer."""
    model = tiny_model()
    inputs = generation_prompt(seed=5)
    out = model.generate(
        **inputs,
        max_new_tokens=4,
        do_sample=False,
        repetition_penalty=3.0,
        eos_token_id=None,
        pad_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    prompt_length = inputs["input_ids"].shape[1]
    raw = model(**extend_structure(inputs, out.sequences[:, prompt_length:-1])).logits[0, prompt_length - 1 :]
    for step, logits in enumerate(out.scores):
        answer = out.sequences[0, prompt_length - 1 : prompt_length + step].unique()
        expected = raw[step].clone()
        seen = expected[answer]
        expected[answer] = torch.where(seen < 0, seen * 3.0, seen / 3.0)
        torch.testing.assert_close(logits[0], expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # CPU: eager flex on purpose
def test_flex_attention_equals_eager_without_a_dense_bias():
    """FlexAttention computes the bucketed bias inside its score function and the mask as a block mask (inference
    only on CPU: FlexAttention has no CPU backward). Same outputs as eager, with padding and a cache."""
    eager = tiny_model(attn_implementation="eager")
    flex = tiny_model(attn_implementation="flex_attention")
    inputs = structured_prompt(answer_length=3)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["attention_mask"][0, :2] = 0  # left padding
    expected = eager(**inputs).logits
    torch.testing.assert_close(flex(**inputs).logits, expected, rtol=1e-5, atol=1e-5)

    prompt_length = inputs["input_ids"].shape[1] - 2
    cache = DynamicCache(config=flex.config)
    shared = {k: inputs[k] for k in ("segment_rel", "ext_table_ids", "ext_table_sub")}
    per_token = PER_TOKEN + ("attention_mask",)
    first = flex(input_ids=inputs["input_ids"][:, :prompt_length], cache=cache, use_cache=True, **shared,
                 **{k: inputs[k][:, :prompt_length] for k in per_token}).logits  # fmt: skip
    rest = flex(input_ids=inputs["input_ids"][:, prompt_length:], cache=cache, use_cache=True, **shared,
                **{k: inputs[k] for k in per_token}).logits  # fmt: skip
    torch.testing.assert_close(torch.cat([first, rest], 1), expected, rtol=1e-5, atol=1e-5)


def test_flex_attention_never_builds_the_dense_bias(monkeypatch):
    model = tiny_model(attn_implementation="flex_attention")

    def refuse(*args, **kwargs):
        raise AssertionError("the dense L x L bias was built")

    monkeypatch.setattr(model.model, "attention_bias", refuse)
    with torch.no_grad():
        assert model(**structured_prompt()).logits.isfinite().all()
