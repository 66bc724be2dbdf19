"""Tests of CpmBeeTokenizer: parity with the original CPM-Bee tokenizer (golden fixtures) and its own contract."""

import hashlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import golden_cases, load_json, pairs_to_dict
from viscpm.modeling.tokenization_cpmbee import CpmBeeToken, CpmBeeTokenizer

# A cut-down vocabulary: the id of a token is its index in this list.
TINY_VOCAB = [
    "<pad>",
    "<unk>",
    "<mask>",
    "<sep>",
    "</n>",
    "</_>",
    "<s>",
    "</s>",
    "<root>",
    "<ans>",
    "<option>",
    "<",
    ">",
    "a",
    "b",
    "c",
    "ab",
    "abc",
    " a",
    "s",
    "x",
    "y",
    "hello",
    " world",
]
TINY_ID = {token: index for index, token in enumerate(TINY_VOCAB)}
TINY_ID["\n"], TINY_ID[" "] = TINY_ID.pop("</n>"), TINY_ID.pop("</_>")

# Every character class, surrogates included, mixed with markup characters and vocabulary text.
ANY_TEXT = st.text(st.one_of(st.characters(exclude_categories=()), st.sampled_from("<>abc \n")), max_size=40)


def write_vocab(path, lines):
    path.write_text("\n".join(lines), encoding="utf-8", newline="")
    return path


@pytest.fixture(scope="module")
def tiny_vocab_file(tmp_path_factory):
    return write_vocab(tmp_path_factory.mktemp("vocab") / "tiny.txt", TINY_VOCAB)


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_vocab_file):
    return CpmBeeTokenizer(vocab_file=str(tiny_vocab_file))


@pytest.fixture(scope="session")
def tokenizer(golden_vocab_file):
    return CpmBeeTokenizer(vocab_file=str(golden_vocab_file))


def file_cases(relative_path, key):
    """`golden_cases` for the list `key` of a fixture file."""
    return golden_cases(
        "case", lambda folder: load_json(folder / relative_path)[key], ids=lambda case: ascii(case.get("text", ""))[:30]
    )


def expected_error(case):
    """`"ValueError: message"` -> (ValueError, message)."""
    kind, _, message = case["error"].partition(": ")
    return {"ValueError": ValueError, "TypeError": TypeError, "KeyError": KeyError}[kind], message


# --- Parity with the original tokenizer -------------------------------------------------------------------------


@pytest.mark.golden
def test_vocabulary_facts(tokenizer, golden_dir, golden_vocab_file):
    facts = load_json(golden_dir / "tokenizer" / "encode_cases.json")
    assert hashlib.sha256(golden_vocab_file.read_bytes()).hexdigest() == facts["vocab_file_sha256"]
    assert tokenizer.vocab_size == len(tokenizer) == facts["vocab_size"]
    assert tokenizer.bos_token_id == facts["bos_id"]
    assert tokenizer.eos_token_id == facts["eos_id"]
    assert tokenizer.unk_token_id == facts["unk_id"]
    assert tokenizer.mask_token_id == facts["mask_id"]
    assert tokenizer.ans_token_id == facts["ans_id"]
    assert tokenizer.convert_tokens_to_ids(["<root>", "\n", " "]) == [
        facts["root_id"],
        facts["newline_id"],
        facts["space_id"],
    ]
    specials = {
        token: token_id
        for token, token_id in tokenizer.get_vocab().items()
        if token.startswith("<") and token.endswith(">")
    }
    assert specials == pairs_to_dict(facts["special_tokens"])
    assert len(specials) == facts["num_special_tokens"]
    longest = max(len(token) for token in tokenizer.get_vocab() if token not in specials)
    assert longest == facts["max_word_len"]


@pytest.mark.golden
@file_cases("tokenizer/encode_cases.json", "encode_cases")
def test_encode_cases(tokenizer, golden_dir, case):
    text = case["text"]
    if "error" in case:
        for encode in (tokenizer.tokenize_with_details, tokenizer.encode_with_ext_table, tokenizer.encode):
            error_type, message = expected_error(case)
            with pytest.raises(error_type) as raised:
                encode(text)
            # Our message adds how to fix it.
            assert message in str(raised.value)
        return

    assert [tuple(token) for token in tokenizer.tokenize_with_details(text)] == [tuple(t) for t in case["tokenize"]]
    ids, ext_table = tokenizer.encode_with_ext_table(text)
    assert ids == case["ids"]
    assert list(ext_table.items()) == [tuple(pair) for pair in case["ext_table"]]
    assert tokenizer.decode(ids, ext_table=ext_table) == case["decoded"]
    assert (case["decoded"] == text) == case["decode_roundtrip_equal"]
    assert tokenizer.decode(ids) == case["decoded_without_ext_table"]

    # The transformers API: same tokens, and the unk id where the original has an ext id.
    assert tokenizer.tokenize(text) == [token[0] for token in case["tokenize"]]
    vocab_size = load_json(golden_dir / "tokenizer" / "encode_cases.json")["vocab_size"]
    unk_id = tokenizer.unk_token_id
    assert tokenizer.encode(text, add_special_tokens=False) == [i if i < vocab_size else unk_id for i in case["ids"]]
    assert tokenizer(text)["input_ids"] == [i if i < vocab_size else unk_id for i in case["ids"]]


@pytest.mark.golden
def test_encode_chained_past_table(tokenizer, golden_dir):
    cases = load_json(golden_dir / "tokenizer" / "encode_cases.json")["encode_chained_past_table"]
    past_table = {}
    for step, case in enumerate(cases):
        given_table = dict(past_table)
        ids, past_table = tokenizer.encode_with_ext_table(case["text"], past_table)
        assert ids == case["ids"], f"step {step}"
        assert list(past_table.items()) == [tuple(pair) for pair in case["ext_table_after"]], f"step {step}"
        assert dict(list(past_table.items())[: len(given_table)]) == given_table, "the past table must be kept"


@pytest.mark.golden
@file_cases("tokenizer/encode_cases.json", "decode_cases")
def test_decode_cases(tokenizer, golden_dir, case):
    ext_table = pairs_to_dict(case["ext_table"]) if case["ext_table"] is not None else None
    assert tokenizer.decode(case["ids"], ext_table=ext_table) == case["decoded"]
    assert tokenizer.decode(torch.tensor(case["ids"]), ext_table=ext_table) == case["decoded"]
    assert tokenizer.batch_decode([case["ids"]] * 2, ext_table=ext_table) == [case["decoded"]] * 2


@pytest.mark.golden
def test_save_pretrained_writes_the_original_vocabulary_file(tokenizer, golden_vocab_file, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    saved = tmp_path / CpmBeeTokenizer.vocab_files_names["vocab_file"]
    assert saved.read_bytes() == golden_vocab_file.read_bytes()
    reloaded = CpmBeeTokenizer.from_pretrained(tmp_path)
    assert reloaded.get_vocab() == tokenizer.get_vocab()
    assert reloaded.special_tokens_map == tokenizer.special_tokens_map


@pytest.mark.golden
@settings(max_examples=200, deadline=None)
@given(text=ANY_TEXT)
def test_round_trip_with_the_full_vocabulary(tokenizer, text):
    """See `test_round_trip_of_escaped_text` for the property and its exceptions."""
    escaped = CpmBeeTokenizer.escape(text)
    ids, ext_table = tokenizer.encode_with_ext_table(escaped)
    assert tokenizer.decode(ids, ext_table=ext_table) == escaped


# --- The tokenizer's own contract (cut-down vocabulary) ---------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(text=ANY_TEXT)
def test_round_trip_of_escaped_text(tiny_tokenizer, text):
    """
    `decode(*encode_with_ext_table(escape(s))) == escape(s)` for any text: decode writes plain tokens escaped and
    ext-table texts (out-of-vocabulary runs, unknown special tokens) as they are. Surrogates, control characters and
    out-of-vocabulary runs next to vocabulary characters are fine: tokens are slices of the text and every code point
    is kept. The exceptions:

    - Unescaped text: a `<` starts a special token, so text that is not valid markup raises ValueError (escape it
      first); valid markup round-trips without escaping (see `test_round_trip_of_markup`).
    - A vocabulary without a `<` token: a literal `<` then falls into an out-of-vocabulary run, which decodes
      unescaped (see `test_round_trip_needs_a_lt_token`).
    - `tokenizer.encode` (ids only) maps out-of-vocabulary text to `<unk>`, and `decode` without the ext table drops
      ext ids: both lose text.
    """
    escaped = CpmBeeTokenizer.escape(text)
    ids, ext_table = tiny_tokenizer.encode_with_ext_table(escaped)
    assert tiny_tokenizer.decode(ids, ext_table=ext_table) == escaped


MARKUP_PIECES = st.sampled_from(
    ["<<", "<ans>", "<ans_2>", "<b>", "<unk>", "<>x>", ">", "a", "abc", " ", "\n", "é", "😀"]
)


@settings(max_examples=200, deadline=None)
@given(pieces=st.lists(MARKUP_PIECES, max_size=12))
def test_round_trip_of_markup(tiny_tokenizer, pieces):
    markup = "".join(pieces)
    ids, ext_table = tiny_tokenizer.encode_with_ext_table(markup)
    assert tiny_tokenizer.decode(ids, ext_table=ext_table) == markup


def test_round_trip_needs_a_lt_token(tmp_path):
    no_lt = CpmBeeTokenizer(vocab_file=str(write_vocab(tmp_path / "v.txt", [t for t in TINY_VOCAB if t != "<"])))
    ids, ext_table = no_lt.encode_with_ext_table("a<<b")
    assert ext_table == {no_lt.vocab_size: "<"}
    assert no_lt.decode(ids, ext_table=ext_table) == "a<b"


def test_markup_rules(tiny_tokenizer):
    ids = TINY_ID
    details = tiny_tokenizer.tokenize_with_details("<<s><ans>xé😀y<ans_1>\n")
    assert details == [
        # Offsets count `<<` as one character.
        CpmBeeToken("<", 0, is_unk=False, is_special=False),
        CpmBeeToken("s", 1, is_unk=False, is_special=False),
        CpmBeeToken(">", 2, is_unk=False, is_special=False),
        CpmBeeToken("<ans>", 3, is_unk=False, is_special=True),
        CpmBeeToken("x", 8, is_unk=False, is_special=False),
        CpmBeeToken("é😀", 9, is_unk=True, is_special=False),
        CpmBeeToken("y", 11, is_unk=False, is_special=False),
        CpmBeeToken("<ans_1>", 12, is_unk=False, is_special=True),
        CpmBeeToken("\n", 19, is_unk=False, is_special=False),
    ]
    # transformers' special-token splitting must not run: `<<s>` is a literal `<` then `s>`, not `<` + `<s>`.
    assert tiny_tokenizer.tokenize("<<s>") == ["<", "s", ">"]
    assert tiny_tokenizer("<<s>")["input_ids"] == [ids["<"], ids["s"], ids[">"]]
    assert tiny_tokenizer.encode("<s>abc</s>", add_special_tokens=False) == [ids["<s>"], ids["abc"], ids["</s>"]]
    # Greedy longest match: "abc" beats "ab" + "c"; " a" is one token.
    assert tiny_tokenizer.tokenize("abcab a") == ["abc", "ab", " a"]
    # `<>` does not close a special token: the character after `<` is always part of the name.
    assert tiny_tokenizer.tokenize("<>x>a") == ["<>x>", "a"]


def test_ext_ids(tiny_tokenizer):
    vocab_size = len(TINY_VOCAB)
    ids, ext_table = tiny_tokenizer.encode_with_ext_table("é a<b>é<ans>")
    assert ids == [vocab_size, TINY_ID[" a"], vocab_size + 1, vocab_size, TINY_ID["<ans>"]]
    assert ext_table == {vocab_size: "é", vocab_size + 1: "<b>"}
    # transformers' encode: unknown text is `<unk>`.
    unk = TINY_ID["<unk>"]
    assert tiny_tokenizer.encode("é a<b>é<ans>") == [unk, TINY_ID[" a"], unk, unk, TINY_ID["<ans>"]]


def test_decode_rules(tiny_tokenizer):
    ids, vocab_size = TINY_ID, len(TINY_VOCAB)
    # Plain tokens are escaped, special tokens are not; negative ids and ext ids without a table are dropped.
    assert tiny_tokenizer.decode([ids["<s>"], ids["<"], -100, vocab_size, ids["a"], ids["</s>"]]) == "<s><<a</s>"
    # The ext table comes first, even for a vocabulary id.
    assert tiny_tokenizer.decode([ids["<unk>"], vocab_size], ext_table={ids["<unk>"]: "é", vocab_size: "😀"}) == "é😀"
    assert tiny_tokenizer.decode([ids["<s>"], ids["a"], ids["<pad>"], ids["</s>"]], skip_special_tokens=True) == "a"
    assert tiny_tokenizer.decode(ids["<"]) == "<<"
    assert tiny_tokenizer.convert_tokens_to_string(["<", "<ans>", "é", " a"]) == "<<<ans>é a"


def test_save_and_load(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path / "saved")
    saved = tmp_path / "saved" / CpmBeeTokenizer.vocab_files_names["vocab_file"]
    assert saved.read_text(encoding="utf-8") == "\n".join(TINY_VOCAB)
    reloaded = CpmBeeTokenizer.from_pretrained(tmp_path / "saved")
    assert reloaded.get_vocab() == tiny_tokenizer.get_vocab() == TINY_ID
    assert reloaded.special_tokens_map == tiny_tokenizer.special_tokens_map
    assert reloaded.all_special_ids == [TINY_ID[t] for t in ("<s>", "</s>", "<unk>", "<pad>", "<mask>")]
    assert reloaded.encode_with_ext_table("hello world é") == tiny_tokenizer.encode_with_ext_table("hello world é")


def test_unterminated_special_token_is_an_error(tiny_tokenizer):
    for text, problem in [("a<", "Unexpected end of text"), ("<ans", "Unexpected end of text"), ("<a<b>", "pos 2")]:
        with pytest.raises(ValueError, match=problem) as raised:
            tiny_tokenizer.encode_with_ext_table(text)
        assert "`<<`" in str(raised.value), "the error should say how to write a literal `<`"


def test_invalid_vocabularies(tmp_path):
    with pytest.raises(ValueError, match="<mask>"):
        CpmBeeTokenizer(vocab_file=str(write_vocab(tmp_path / "a.txt", [t for t in TINY_VOCAB if t != "<mask>"])))
    with pytest.raises(ValueError, match="twice"):
        CpmBeeTokenizer(vocab_file=str(write_vocab(tmp_path / "b.txt", TINY_VOCAB + ["a"])))


def test_tokens_cannot_be_added_after_the_vocabulary(tiny_vocab_file):
    tiny_tokenizer = CpmBeeTokenizer(vocab_file=str(tiny_vocab_file))
    with pytest.raises(ValueError, match="vocabulary file"):
        tiny_tokenizer.add_tokens(["<image>"])
    # Tokens already in the vocabulary can be marked special; nothing moves.
    tiny_tokenizer.add_special_tokens({"additional_special_tokens": ["<ans>"]})
    assert len(tiny_tokenizer) == len(TINY_VOCAB)
