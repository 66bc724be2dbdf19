"""CPM-Bee's generation on tiny random configs: greedy and sampling against plain loops, the original's beam search
bookkeeping, the in-place beam cache, and the answer's logits processing.
"""

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from tiny_models import STRUCTURED_PER_TOKEN, TINY_VOCAB_SIZE, structured_prompt, tiny_causal_lm
from viscpm.modeling.modeling_cpmbee import CpmBeeBeamCacheLayer


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
    for name in STRUCTURED_PER_TOKEN + ("attention_mask",):
        last = inputs[name][:, -1:]
        fill = {"input_id_subs": 0, "context": 0, "attention_mask": 1}.get(name)
        new = last.expand(-1, n) if fill is None else torch.full_like(last.expand(-1, n), fill)
        extended[name] = torch.cat([inputs[name], new], 1)
    return extended


def test_greedy_generate_equals_argmax_loop_without_cache():
    model = tiny_causal_lm()
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
    assert generated.max() < TINY_VOCAB_SIZE + inputs["ext_table_ids"].shape[1]


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
    model = tiny_causal_lm()
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
    model = tiny_causal_lm()
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
    model = tiny_causal_lm()
    candidates, _, finished, _ = finish_step(model, [-1.0, -2.0, -3.0, -4.0], [True, False, True, False], step=1)
    assert candidates == [0, 2] and finished == [True, True]
    # two unfinished candidates above it fill the beams first: it does not finish
    candidates, _, finished, _ = finish_step(model, [-1.0, -2.0, -3.0, -4.0], [False, False, True, False], step=1)
    assert finished == [False, False]


def test_beam_search_stops_a_sentence_by_the_original_test():
    """Once `num_beams` hypotheses are finished, the original stops at step i (0-based) when the worst of them is
    at least the step's best candidate score / i ** length_penalty; then nothing more finishes."""
    model = tiny_causal_lm()
    finished_scores = [-0.5, -0.9]
    # step 2: best candidate -2.0 / 2 = -1.0 <= -0.9: done, and its </s>, better than the worst (-2.0 / 3 > -0.9),
    # is not taken
    _, scores, _, unsatisfied = finish_step(
        model, [-2.0, -4.0, -5.0, -6.0], [True, False, False, False], step=2, beam_scores=finished_scores
    )
    assert not unsatisfied and scores == pytest.approx(finished_scores)
    # step 2, best candidate -1.6 / 2 = -0.8 > -0.9: not done, and the better </s> (-1.6 / 3) replaces the worst
    _, scores, _, unsatisfied = finish_step(
        model, [-1.6, -4.0, -5.0, -6.0], [True, False, False, False], step=2, beam_scores=finished_scores
    )
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


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    model = tiny_causal_lm()
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
    model = tiny_causal_lm()
    input_ids = torch.tensor([[5, 6, 7, 8]])
    out = model.generate(input_ids, max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0)
    logits = model(out[:, :-1]).logits
    assert torch.equal(out[0, 4:], logits[0, 3:].argmax(-1))


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
    model = tiny_causal_lm()
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
