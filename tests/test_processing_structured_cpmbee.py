"""Tests of CPM-Bee's structured input format: parity with the original (golden fixtures) and its own contract."""

import copy
import random

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_tensor_equal, golden_cases, json_array, load_json
from tiny_models import tiny_vocab, write_vocab
from viscpm.modeling.structured_cpmbee import (
    CpmBeeCollator,
    build_generation_batch,
    encode_structured,
    rel_to_bucket,
)
from viscpm.modeling.tokenization_cpmbee import CpmBeeTokenizer

# A cut-down vocabulary: the id of a token is its index in this list.
TINY_VOCAB = tiny_vocab("<", ">", "a", "b", "c", "q", "x", "y", "image")
ID = {token: index for index, token in enumerate(TINY_VOCAB)}
BOS, EOS, UNK, ANS, ROOT = ID["<s>"], ID["</s>"], ID["<unk>"], ID["<ans>"], ID["<root>"]
IGNORED = -100

PER_TOKEN_ARRAYS = ("input_ids", "input_id_subs", "context", "segment_ids")


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    return CpmBeeTokenizer(vocab_file=str(write_vocab(tmp_path_factory.mktemp("vocab"), TINY_VOCAB)))


@pytest.fixture(scope="session")
def tokenizer(golden_vocab_file):
    return CpmBeeTokenizer(vocab_file=str(golden_vocab_file))


def file_cases(relative_path, key=None):
    """`golden_cases` for a fixture file: its list of cases, or its dict as (name, case) pairs."""

    def load(folder):
        cases = load_json(folder / relative_path)
        cases = cases[key] if key else cases
        return list(cases.items()) if isinstance(cases, dict) else cases

    return golden_cases("case", load, ids=lambda case: case[0] if isinstance(case, tuple) else case["name"])


def expected_error(message):
    """`"ValueError: message"` -> (ValueError, message)."""
    kind, _, text = message.partition(": ")
    return {"ValueError": ValueError, "TypeError": TypeError, "KeyError": KeyError}[kind], text


def table_states_as_pairs(ext_states):
    """Our ext states in the fixtures' layout: dicts with int keys as `[key, value]` pairs, in insertion order."""
    return {
        "ext_table": [[key, value] for key, value in ext_states.ext_table.items()],
        "token_id_table": [
            [base, [[key, sub] for key, sub in subs.items()]] for base, subs in ext_states.token_id_table.items()
        ],
    }


def assert_segments_equal(segments, expected, name):
    for key in PER_TOKEN_ARRAYS + ("segment_rel",):
        assert_tensor_equal(getattr(segments, key), json_array(expected[key]), f"{name}: {key}")
    assert segments.num_segments == expected["n_segments"], name
    # The original's `np.array([])` has shape (0,) when there is no image; ours is always (num_images, 2).
    assert_tensor_equal(
        segments.image_bound, json_array(expected["image_bound"]).reshape(-1, 2), f"{name}: image_bound"
    )


# --- Parity with the original ---------------------------------------------------------------------------------


@pytest.mark.golden
@file_cases("tokenizer/structured_cases.json", "cases")
def test_structured_cases(tokenizer, golden_dir, case):
    name = case["name"]
    if "error" in case:
        error_type, message = expected_error(case["error"])
        with pytest.raises(error_type) as raised:
            encode_structured(tokenizer, copy.deepcopy(case["data"]))
        assert message in str(raised.value), name
        return
    if isinstance(case["data"], list):
        # A chain: each input continues from the states of the previous one. The fixture recorded the states of
        # every step after the whole chain ran, so the in-place updates of shared tables show in earlier steps.
        results, states = [], None
        for data in case["data"]:
            results.append(encode_structured(tokenizer, copy.deepcopy(data), ext_states=states))
            states = results[-1].ext_states
        expected_results = case["result"]
    else:
        results, expected_results = [encode_structured(tokenizer, copy.deepcopy(case["data"]))], [case["result"]]
    for step, (segments, expected) in enumerate(zip(results, expected_results, strict=True)):
        assert_segments_equal(segments, expected, f"{name} step {step}")
        assert table_states_as_pairs(segments.ext_states) == expected["table_states"], f"{name} step {step}"


@pytest.mark.golden
@file_cases("tokenizer/process_list.json")
def test_generation_batch(tokenizer, golden_dir, case):
    name, case = case
    expected = {
        key.removeprefix(f"{name}."): value
        for key, value in load_file(golden_dir / "tokenizer" / "process_list.safetensors").items()
        if key.startswith(f"{name}.")
    }
    prompts = copy.deepcopy(case["data_list_in"])
    result = build_generation_batch(tokenizer, prompts, start_answer=False)
    inputs = result.model_inputs

    assert prompts == case["data_list_in"], "the prompts must not be modified (the original fills them in place)"
    assert result.prompts == case["data_list_after"]
    other_info = [
        {
            "predict_segments": [list(p) for p in predict],
            "answer_placeholders": paths,
            "ext_table": list(map(list, table.items())),
        }
        for predict, paths, table in zip(result.predict_segments, result.answer_placeholders, result.ext_tables)
    ]
    assert other_info == case["other_info"]

    renamed = {"sample_ids": "sample_idx"}
    for key in PER_TOKEN_ARRAYS + ("num_segments", "segment_rel_offset", "segment_rel", "sample_ids"):
        assert_tensor_equal(inputs[key], expected[renamed.get(key, key)], f"{name}: {key}")
    assert_tensor_equal(inputs["attention_mask"], expected["num_segments"] != 0, f"{name}: attention_mask")
    for row in range(len(prompts)):
        assert_tensor_equal(inputs["ext_table_ids"][row], expected["batch_ext_table_ids"], f"{name}: ext_table_ids")
        assert_tensor_equal(inputs["ext_table_sub"][row], expected["batch_ext_table_sub"], f"{name}: ext_table_sub")

    # The model derives positions from the token index: that is right if the original's positions are consecutive
    # within each segment (only differences within a segment are used).
    positions, segment_ids, real = expected["input_pos"], expected["segment_ids"], expected["num_segments"] != 0
    same_segment = (segment_ids[:, 1:] == segment_ids[:, :-1]) & real[:, 1:] & real[:, :-1]
    assert torch.all((positions[:, 1:] - positions[:, :-1])[same_segment] == 1), f"{name}: input_pos"

    # QUIRK of the original: `image_bound` is the last sample's, in its unpadded positions. Ours is per sample, in
    # padded positions: the last row, moved back by its left padding, is the original's.
    last_padding = int((inputs["attention_mask"][-1] == 0).sum())
    assert_tensor_equal(inputs["image_bound"][-1:] - last_padding, expected["image_bound"], f"{name}: image_bound")
    if all(length == inputs["input_ids"].shape[1] for length in inputs["attention_mask"].sum(1).tolist()):
        assert_tensor_equal(inputs["image_bound"], expected["image_bound"].expand_as(inputs["image_bound"]), name)

    # What the original's beam search masks per sample: <unk> unless the sample's ext table has it, and the batch
    # ext-table columns the sample's table lacks.
    vocab_size, batch_ext_size = tokenizer.vocab_size, expected["batch_ext_table_ids"].shape[0]
    for row, info in enumerate(case["other_info"]):
        own = {token_id for token_id, _ in info["ext_table"]}
        expected_suppressed = [tokenizer.unk_token_id] if tokenizer.unk_token_id not in own else []
        expected_suppressed += [i for i in range(vocab_size, vocab_size + batch_ext_size) if i not in own]
        suppressed = [i for i in inputs["suppress_token_ids"][row].tolist() if i >= 0]
        assert suppressed == expected_suppressed, f"{name}: suppress_token_ids[{row}]"

    # For generate(), each prompt also gets its answer's <s> (an answer token of the predicted segment).
    started = build_generation_batch(tokenizer, prompts).model_inputs
    for row, info in enumerate(case["other_info"]):
        ((answer_segment, _),) = info["predict_segments"]
        assert started["input_ids"][row, -1] == tokenizer.bos_token_id and not started["context"][row, -1]
        assert started["segment_ids"][row, -1] == answer_segment
        real = started["attention_mask"][row].bool()
        assert torch.equal(
            started["input_ids"][row][real][:-1], inputs["input_ids"][row][inputs["attention_mask"][row].bool()]
        )


@pytest.mark.golden
def test_training_collator(tokenizer, golden_dir):
    fixture = load_json(golden_dir / "tokenizer" / "collated_batch.json")
    # The training Dataset keeps the first round of each conversation.
    samples = [entry["items"][0] for entry in load_json(golden_dir / "chat" / "train_items.json")["items"]]
    batch = CpmBeeCollator(tokenizer, max_length=fixture["max_len"])(samples)

    for key, array in fixture["batch"].items():
        expected = torch.as_tensor(json_array(array))
        if key in ("ext_table_ids", "ext_table_sub"):
            for row in batch[key]:
                assert_tensor_equal(row, expected, key)
        else:
            assert_tensor_equal(batch["labels" if key == "target" else key], expected, key)
    assert batch["context"].dtype == torch.bool
    lengths = torch.as_tensor(json_array(fixture["batch"]["length"]))
    assert_tensor_equal(batch["attention_mask"], torch.arange(fixture["max_len"]) < lengths[:, None], "attention_mask")


@pytest.mark.golden
@file_cases("chat/forward_teacher_forcing.json")
def test_training_sample_from_structured_input(tokenizer, golden_dir, case):
    """encode_structured -> to_sample -> collator, as the original item builder and collater made them."""
    expected = load_file(golden_dir / "chat" / "forward_teacher_forcing.safetensors")
    name = case["name"]
    data = {**case["data"], "<ans>": tokenizer.escape(case["data"]["<ans>"])}
    length = expected[f"{name}.in.input_ids"].shape[1]
    batch = CpmBeeCollator(tokenizer, max_length=length)([encode_structured(tokenizer, data).to_sample()])
    for key in ("input_ids", "input_id_subs", "context", "segment_ids", "segment_rel", "num_segments", "sample_ids"):
        assert_tensor_equal(batch[key], expected[f"{name}.in.{key}"], key)
    for key in ("segment_rel_offset", "length", "span", "image_bound"):
        assert_tensor_equal(batch[key], expected[f"{name}.in.{key}"], key)
    for key in ("ext_table_ids", "ext_table_sub"):
        assert_tensor_equal(batch[key][0], expected[f"{name}.in.{key}"], key)
    assert_tensor_equal(batch["labels"], expected[f"{name}.target"], "labels")


# --- The format's own contract (cut-down vocabulary) ----------------------------------------------------------


def test_rel_to_bucket():
    max_depth = 8
    buckets = [rel_to_bucket(up, down, max_depth) for up in range(max_depth) for down in range(max_depth)]
    assert buckets[0] == 0, "a segment and itself"
    assert 1 not in buckets, "bucket 1 is reserved for pairs from different in-context samples"
    assert len(set(buckets)) == len(buckets)
    assert rel_to_bucket(0, 1) == 2 and rel_to_bucket(1, 0) == max_depth + 1


def test_segments_by_hand(tiny_tokenizer):
    # root: <s> <root> </s> | key "q": <s> q </s> | value: <s> a b </s> | key "<ans>": <s> <ans> </s> | answer: <s> c
    segments = encode_structured(tiny_tokenizer, {"q": "ab", "<ans>": "c"})
    assert segments.input_ids.tolist() == [
        BOS,
        ROOT,
        EOS,
        BOS,
        ID["q"],
        EOS,
        BOS,
        ID["a"],
        ID["b"],
        EOS,
        BOS,
        ANS,
        EOS,
        BOS,
        ID["c"],
    ]
    assert segments.segment_ids.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 4, 4]
    assert segments.context.tolist() == [True] * 13 + [False] * 2
    assert segments.num_segments == 5
    # Depths: root 0, keys 1, values 2. `q` and `<ans>` are siblings (1 up, 1 down); "ab" and "c" cousins (2, 2).
    rel = segments.segment_rel.reshape(5, 5)
    assert rel[0, 2] == rel_to_bucket(0, 2) and rel[2, 0] == rel_to_bucket(2, 0)
    assert rel[1, 3] == rel_to_bucket(1, 1) and rel[2, 4] == rel_to_bucket(2, 2) and rel[2, 1] == rel_to_bucket(1, 0)
    assert torch.all(rel.diagonal() == 0)
    assert segments.image_bound.shape == (0, 2)


def test_sub_indices_and_ext_states(tiny_tokenizer):
    vocab_size = len(TINY_VOCAB)
    first = encode_structured(tiny_tokenizer, {"q": "é<option_2>éü<option_7>"})
    # Each text of a base token gets the next sub-index; the first one gets 0.
    value = first.segment_ids == 2
    assert first.input_ids[value].tolist() == [BOS, UNK, ID["<option>"], UNK, ID["<option>"], EOS]
    assert first.input_id_subs[value].tolist() == [0, 0, 0, 1, 1, 0]
    assert first.ext_states.ext_table == {
        vocab_size: "é",
        vocab_size + 1: "<option_2>",
        vocab_size + 2: "éü",
        vocab_size + 3: "<option_7>",
    }

    ext_table_before = dict(first.ext_states.ext_table)
    # "éü" is known (sub 1), "ñ" is new (sub 2).
    second = encode_structured(tiny_tokenizer, {"q": "éü ñ"}, ext_states=first.ext_states)
    assert second.input_id_subs[second.segment_ids == 2].tolist() == [0, 1, 0, 2, 0]
    # As in the original: the token id table is shared and updated, the ext table is copied.
    assert second.ext_states.token_id_table is first.ext_states.token_id_table
    assert first.ext_states.token_id_table["<unk>"] == {vocab_size: 0, vocab_size + 2: 1, vocab_size + 4: 2}
    assert first.ext_states.ext_table == ext_table_before
    assert second.ext_states.ext_table == {**ext_table_before, vocab_size + 4: "ñ"}


def test_image_and_answer_flags_only_at_top_level(tiny_tokenizer):
    segments = encode_structured(tiny_tokenizer, {"x": {"image": "<unk>", "<ans>": "a"}, "image": {"y": "<unk><unk>"}})
    # The nested `image` and `<ans>` keys are plain keys; everything under the top-level `image` is an image value.
    assert segments.context.all()
    assert segments.image_bound.tolist() == [[len(segments.input_ids) - 3, len(segments.input_ids) - 1]]
    start, end = segments.image_bound[0].tolist()
    assert segments.input_ids[start:end].tolist() == [UNK, UNK]


def test_shuffle_answer(tiny_tokenizer):
    answer = {"a": "a", "b": "b", "c": {"x": "x", "y": "y"}}
    data = {"q": {"a": "a", "b": "b", "c": "c"}, "<ans>": answer}
    shuffled = encode_structured(tiny_tokenizer, data, shuffle_answer=random.Random(2))
    # The same draws, applied by hand: the top-level answer dict first, then the nested one.
    rng = random.Random(2)
    top, nested = list(answer.items()), list(answer["c"].items())
    rng.shuffle(top)
    rng.shuffle(nested)
    assert top != list(answer.items()) and nested != list(answer["c"].items()), "pick a seed that changes the order"
    by_hand = {key: (dict(nested) if key == "c" else value) for key, value in top}
    expected = encode_structured(tiny_tokenizer, {"q": data["q"], "<ans>": by_hand})
    assert torch.equal(shuffled.input_ids, expected.input_ids)
    assert torch.equal(shuffled.segment_rel, expected.segment_rel)


def test_bad_structured_input(tiny_tokenizer):
    with pytest.raises(TypeError, match=r"data\['q'\]\['n'\] is a int .*str"):
        encode_structured(tiny_tokenizer, {"q": {"n": 3}})
    with pytest.raises(TypeError, match="keys must be str"):
        encode_structured(tiny_tokenizer, {1: "a"})
    with pytest.raises(ValueError, match=r"Invalid token <b>.*<<"):
        encode_structured(tiny_tokenizer, {"q": "<b>"})
    with pytest.raises(ValueError, match="Unexpected end of text"):
        encode_structured(tiny_tokenizer, {"q": "a<b"})


def test_generation_batch_by_hand(tiny_tokenizer):
    long_prompt = {"image": "<unk><unk>", "q": "abc", "<ans>": {"x": "", "y": {"a": "ignored"}}}
    short_prompt = {"<ans>": "", "image": "<unk>"}
    prompts = copy.deepcopy([long_prompt, short_prompt])
    with pytest.raises(ValueError, match="one answer per prompt"):
        build_generation_batch(tiny_tokenizer, prompts)
    batch = build_generation_batch(tiny_tokenizer, prompts, start_answer=False)
    inputs = batch.model_inputs
    assert prompts == [long_prompt, short_prompt], "prompts must not be modified"

    # Pre-order segments of the long prompt: 0 root, 1 image, 2 <unk><unk>, 3 q, 4 abc, 5 <ans>, 6 x, 7 answer 1,
    # 8 y, 9 a, 10 answer 2. Answer segments lose their `<s> <ans>`.
    assert batch.predict_segments == [[(7, 1), (10, 2)], [(2, 1)]]
    assert batch.answer_placeholders == [[["x"], ["y", "a"]], [[]]]
    assert batch.prompts[0]["<ans>"] == {"x": "<ans_1>", "y": {"a": "<ans_2>"}}
    lengths = inputs["attention_mask"].sum(1).tolist()
    assert lengths == [3 + 3 + 4 + 3 + 5 + 3 + 3 + 3 + 3, 3 + 3 + 3 + 3]
    assert inputs["input_ids"].shape == (2, max(lengths))
    # Left padding with 0.
    padding = max(lengths) - lengths[1]
    assert inputs["input_ids"][1, :padding].tolist() == [0] * padding
    assert inputs["input_ids"][1, padding:].tolist() == [
        BOS,
        ROOT,
        EOS,
        BOS,
        ANS,
        EOS,
        BOS,
        ID["image"],
        EOS,
        BOS,
        UNK,
        EOS,
    ]
    assert torch.equal(inputs["context"], inputs["attention_mask"].bool())
    assert inputs["num_segments"][:, -1].tolist() == [11, 5]
    assert inputs["segment_rel"].shape == (2, 11 * 11)
    # image_bound is in padded positions of each row, even when the image comes after a removed answer.
    for row, count in enumerate([2, 1]):
        ((start, end),) = inputs["image_bound"][row].tolist()
        assert inputs["input_ids"][row, start:end].tolist() == [UNK] * count
    assert inputs["ext_table_ids"].shape == (2, 0)


def test_generation_batch_ext_tables(tiny_tokenizer):
    vocab_size = len(TINY_VOCAB)
    batch = build_generation_batch(tiny_tokenizer, [{"q": "é a ü", "<ans>": ""}, {"q": "ñ é", "<ans>": ""}])
    # Sub 0 is the plain base id; the other subs get batch ext ids, shared by equal (base, sub) pairs.
    assert batch.ext_tables == [{UNK: "é", vocab_size: "ü"}, {UNK: "ñ", vocab_size: "é"}]
    assert batch.model_inputs["ext_table_ids"].tolist() == [[UNK], [UNK]]
    assert batch.model_inputs["ext_table_sub"].tolist() == [[1], [1]]
    generated = [UNK, vocab_size, ID["a"]]
    assert tiny_tokenizer.decode(generated, ext_table=batch.ext_tables[1]) == "ñéa"


def test_bad_prompts(tiny_tokenizer):
    with pytest.raises(ValueError, match="'<ans>'"):
        build_generation_batch(tiny_tokenizer, [{"q": "a"}])
    with pytest.raises(ValueError, match="Nothing to predict"):
        build_generation_batch(tiny_tokenizer, [{"q": "a", "<ans>": {}}])
    with pytest.raises(ValueError, match="at least one"):
        build_generation_batch(tiny_tokenizer, [])


def test_training_labels_by_hand(tiny_tokenizer):
    # 0-2 root | 3-5 <ans> key | 6-8 key x | 9-10 answer "a" (open) | 11-13 key y | 14-16 answer "bé" (open)
    segments = encode_structured(tiny_tokenizer, {"<ans>": {"x": "a", "y": "bé"}, "q": "é ü"})
    item = segments.to_sample()
    item["pixel_values"] = torch.ones(3, 2, 2)
    batch = CpmBeeCollator(tiny_tokenizer, max_length=32)([item, item])
    labels = batch["labels"][0].tolist()
    vocab_size = len(TINY_VOCAB)
    expected = [IGNORED] * 32
    # At each answer token: the next token; where the next segment's `<s>` follows, the answer ends with `</s>`.
    expected[9], expected[10] = ID["a"], EOS
    expected[14], expected[15], expected[16] = ID["b"], UNK, EOS
    assert labels == expected
    # "ü" of "q" is the second <unk> text (sub 1): the batch ext table holds it, though no label uses it.
    assert batch["ext_table_ids"].tolist() == [[UNK], [UNK]] and batch["ext_table_sub"].tolist() == [[1], [1]]
    assert batch["pixel_values"].shape == (2, 3, 2, 2)
    assert batch["attention_mask"][0].tolist() == [1] * len(segments.input_ids) + [0] * (32 - len(segments.input_ids))
    assert batch["segment_rel"].shape == (2, max(32, segments.num_segments**2))

    with_ext_label = encode_structured(tiny_tokenizer, {"q": "é", "<ans>": "ü é ñ"}).to_sample()
    labels = CpmBeeCollator(tiny_tokenizer, max_length=24)([with_ext_label])["labels"][0]
    # "ü" and "ñ" are <unk> subs 1 and 2 (batch ext ids), "é" is sub 0 (the plain <unk> id).
    space = ID["</_>"]
    assert labels[labels != IGNORED].tolist() == [vocab_size, space, UNK, space, vocab_size + 1, EOS]


def test_padding_to_the_longest_sample_is_the_fixed_width_batch_cut_short(tiny_tokenizer):
    short = encode_structured(tiny_tokenizer, {"q": "a", "<ans>": "b"}).to_sample()
    long = encode_structured(tiny_tokenizer, {"<ans>": {"x": "a", "y": "bé"}, "q": "é ü"}).to_sample()
    width = len(long["input_ids"])
    fixed = CpmBeeCollator(tiny_tokenizer, max_length=32)([short, long])
    longest = CpmBeeCollator(tiny_tokenizer, max_length=32, pad_to_longest=True)([short, long])
    assert width < 32 and longest["input_ids"].shape == (2, width)
    for key, value in fixed.items():
        if value.dim() == 2 and value.shape[1] == 32 and key != "segment_rel":
            assert torch.equal(longest[key], value[:, :width]), key
            assert not value[:, width:].any() or key == "labels" and (value[:, width:] == IGNORED).all(), key
        elif key != "segment_rel":
            assert torch.equal(longest[key], value), key
    # the relation tables keep their own width, padded to the longer of it and the batch's
    rel_width = max(width, *(torch.as_tensor(item["segment_rel"]).numel() for item in (short, long)))
    assert torch.equal(longest["segment_rel"], fixed["segment_rel"][:, :rel_width])
    with pytest.raises(ValueError, match="more than max_length=8"):
        CpmBeeCollator(tiny_tokenizer, max_length=8, pad_to_longest=True)([short, long])


def test_training_collator_errors(tiny_tokenizer):
    item = encode_structured(tiny_tokenizer, {"q": "abc", "<ans>": "a"}).to_sample()
    with pytest.raises(ValueError, match="more than max_length=4"):
        CpmBeeCollator(tiny_tokenizer, max_length=4)([item])
    with pytest.raises(KeyError, match="segment_rel"):
        CpmBeeCollator(tiny_tokenizer, max_length=32)([{k: v for k, v in item.items() if k != "segment_rel"}])
    empty_table = CpmBeeCollator(tiny_tokenizer, max_length=32)([item])
    # No ext token: one dummy entry keeps the ext logits non-empty, as in the original.
    assert empty_table["ext_table_ids"].tolist() == [[0]] and empty_table["ext_table_sub"].tolist() == [[1]]
