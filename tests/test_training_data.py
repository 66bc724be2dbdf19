"""MpM training data: raw records to the original's items, batch and loss (golden), and preparation that skips and
counts malformed records, over JSON lines, conversations and webdataset shards mixed by weight.
"""

import io
import random
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoProcessor

from conftest import load_json
from tiny_models import tiny_chat
from training_support import caption_source, colour_image, conversation_source
from viscpm.training.data import (
    DataReport,
    ImageTextCollator,
    SamplePreparer,
    SourceSpec,
    StructuredSamples,
    caption_prompts,
    conversation_prompts,
    load_records,
    png_bytes,
    prepare_source,
    training_sample,
)

# ---------------------------------------------------------------- golden: records -> items -> batch -> loss


def golden_image_paths(golden_dir: Path) -> list[Path]:
    return sorted((golden_dir / "chat" / "images").iterdir())


def golden_items(processor, max_length: int, record: dict) -> list[dict]:
    """Our item builder on one of the fixture's raw records (the original's `CPMBeeImageTextBuilder.build_item`)."""
    tokenizer = processor.tokenizer
    if record["source"] == "caption":
        rng = random.Random(record["python_random_seed"])  # the original ran `random.seed(seed)` before it
        prompts = caption_prompts(record["TEXT"], rng, processor.query_num, tokenizer)
    else:
        prompts = conversation_prompts(record["TEXT"], processor)
    return [training_sample(tokenizer, prompt, max_length) for prompt in prompts]


@pytest.mark.golden
def test_items_from_raw_records_equal_the_original_item_builder(converted_golden_chat, golden_dir):
    """Every record's first item (all the original's training Dataset used) exactly, and one item per round.

    Later rounds differ on purpose: the original builder's context holds the previous and the current question and
    never an answer (it never mattered there, as only the first round was trained); ours is the context `chat()` builds
    at inference (test_later_rounds_carry_the_context_chat_builds)."""
    processor = AutoProcessor.from_pretrained(converted_golden_chat)
    max_length = load_json(golden_dir / "tokenizer" / "collated_batch.json")["max_len"]
    records = load_json(golden_dir / "chat" / "train_items.json")["items"]
    assert records
    for record in records:
        ours = golden_items(processor, max_length, record)
        assert len(ours) == record["n_items_returned"] == len(record["items"])
        for key, value in ours[0].items():
            assert np.array_equal(np.asarray(value).reshape(-1), np.asarray(record["items"][0][key]).reshape(-1)), key


def test_later_rounds_carry_the_context_chat_builds(tmp_path):
    """Round 2 of a conversation is trained on the prompt `chat()` sends for the second turn, plus the answer."""
    _, processor = tiny_chat(tmp_path)
    conversation = [
        {"from": "human", "value": "<image>\nwhat ?"},
        {"from": "gpt", "value": "a b"},
        {"from": "human", "value": "c ?"},
        {"from": "gpt", "value": "a"},
    ]
    prompts = conversation_prompts(conversation, processor)
    inference = processor.build_prompt("c ?", context="User: what ?\nAI: a b\n")
    assert prompts[1] == {**inference, "<ans>": "a"}


@pytest.mark.golden
def test_golden_training_batch_and_loss_from_raw_records(converted_golden_chat, golden_dir):
    """Raw records and image files -> our items -> our collator (pixels included) -> our model: the original's batch
    at its fixed width, and its loss both from that batch and from the one training collates (padded to the longest
    sample). The original's training Dataset keeps the first item of each record."""
    processor = AutoProcessor.from_pretrained(converted_golden_chat)
    model = AutoModel.from_pretrained(converted_golden_chat, dtype=torch.float32).eval()
    max_length = load_json(golden_dir / "tokenizer" / "collated_batch.json")["max_len"]
    images = golden_image_paths(golden_dir)
    rows = []
    for record in load_json(golden_dir / "chat" / "train_items.json")["items"]:
        item = golden_items(processor, max_length, record)[0]
        rows.append(item | {"image": images[record["image_index"]].read_bytes()})

    def pixels(image):
        return processor.image_processor(image, return_tensors="pt")["pixel_values"][0]

    batch = ImageTextCollator(processor.tokenizer, max_length, pixels, pad_to_longest=False)(rows)
    golden = load_file(golden_dir / "chat" / "train_batch.safetensors")
    for name, expected in golden.items():
        if not name.startswith("batch.") or name == "batch.pixel_values":
            continue
        key = {"target": "labels"}.get(name[len("batch.") :], name[len("batch.") :])
        actual = batch[key][0] if key in ("ext_table_ids", "ext_table_sub") else batch[key]
        assert torch.equal(actual.long(), expected.long()), name
    torch.testing.assert_close(batch["pixel_values"], golden["batch.pixel_values"], rtol=1e-5, atol=1e-5)
    shortest = ImageTextCollator(processor.tokenizer, max_length, pixels)(rows)
    assert shortest["input_ids"].shape[1] == int(shortest["length"].max()) < max_length
    with torch.no_grad():
        for collated in (batch, shortest):
            torch.testing.assert_close(model(**collated).loss, golden["loss"], rtol=1e-4, atol=1e-5)


def test_malformed_records_are_skipped_and_counted(tmp_path):
    _, processor = tiny_chat(tmp_path)
    from viscpm.training.data import ChatPrompts

    spec = SourceSpec(path=str(caption_source(tmp_path / "data")), image_root=str(tmp_path / "data"))
    report = DataReport()
    preparer = SamplePreparer(spec, StructuredSamples(processor.tokenizer, 64), ChatPrompts("caption", processor), 16)
    kept = prepare_source(preparer, load_records(spec), report)
    assert len(kept) == 8 and report.records["captions"] == 13 and report.samples["captions"] == 8
    assert report.skipped["captions"] == {
        "missing image": 1,
        "unreadable image": 1,
        "image smaller than min_image_size=16": 1,
        "empty caption": 1,
        "over max_length=64 tokens": 1,
    }
    assert "missing image (records [8]" in report.summary()


@pytest.mark.parametrize("pivot", ["cpmbee", "qwen2"])
def test_a_caption_source_asks_with_its_own_requests(tmp_path, pivot):
    """Captions in a language the original has no requests for are asked for in that language; without
    `caption_requests`, in English, or in Chinese for a Chinese caption."""
    from tiny_models import tiny_pivot_chat
    from viscpm.training.data import CAPTION_PROMPTS_EN, CAPTION_PROMPTS_ZH, ChatPrompts

    _, processor = tiny_chat(tmp_path) if pivot == "cpmbee" else tiny_pivot_chat(pivot)
    german = ["Beschreibe das Bild kurz", "Was zeigt das Bild?"]

    def requests(prompts: ChatPrompts, caption: str) -> set[str]:
        asked = [prompts(caption, random.Random(seed))[0] for seed in range(40)]
        return {prompt["input"] if pivot == "cpmbee" else prompt.question for prompt in asked}

    assert requests(ChatPrompts("caption", processor, german), "ein roter Kreis") == set(german)
    assert requests(ChatPrompts("caption", processor), "ein roter Kreis") <= set(CAPTION_PROMPTS_EN)
    assert requests(ChatPrompts("caption", processor), "一个红色的圆形") <= set(CAPTION_PROMPTS_ZH)
    for bad in ("Beschreibe das Bild kurz", [], ["  "]):
        with pytest.raises(ValueError, match="caption_requests must be a non-empty list"):
            SourceSpec(path="captions.jsonl", caption_requests=bad)
    with pytest.raises(ValueError, match="on a conversation source"):
        SourceSpec(path="chat.json", kind="conversation", caption_requests=german)


def test_conversations_give_one_sample_per_round_and_skip_malformed_ones(tmp_path):
    _, processor = tiny_chat(tmp_path)
    from viscpm.training.data import ChatPrompts

    spec = SourceSpec(
        path=str(conversation_source(tmp_path / "data")), kind="conversation", image_root=str(tmp_path / "data")
    )
    report = DataReport()
    preparer = SamplePreparer(spec, StructuredSamples(processor.tokenizer, 80), ChatPrompts("conversation", processor))
    kept = prepare_source(preparer, load_records(spec), report)
    assert len(kept) == 2  # two rounds of the one good conversation
    assert sum(report.skipped["llava"].values()) == 2
    first, second = kept["input_ids"]
    # the second round carries the first as context: its prompt is the first's plus "User: ...\nAI: ...\n"
    assert len(second) > len(first) and set(report.skipped["llava"]) == {
        "malformed conversation (expected alternating human / gpt turns)"
    }


def test_webdataset_shards_and_mixing_by_weight(tmp_path):
    _, processor = tiny_chat(tmp_path)
    from viscpm.training.data import ChatPrompts, build_training_data

    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for index, name in enumerate(["red", "blue"] * 10):
            for suffix, payload in (("png", png_bytes(colour_image(name))), ("txt", f"a {name}".encode())):
                info = tarfile.TarInfo(f"{index:04d}.{suffix}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    captions = caption_source(tmp_path / "data", copies=1, malformed=False)
    parquet = tmp_path / "bytes.parquet"  # images as bytes in the file
    datasets.Dataset.from_dict(
        {"picture": [png_bytes(colour_image("green"))] * 2, "text": ["a green", "a green<cap_sep>green"]}
    ).to_parquet(parquet)
    specs = [
        SourceSpec(path=str(shard), weight=3.0),
        SourceSpec(path=str(captions), image_root=str(tmp_path / "data"), weight=1.0),
        SourceSpec(path=str(parquet), image_column="picture", text_column="text", weight=0.5),
    ]
    mixed, report = build_training_data(
        specs, StructuredSamples(processor.tokenizer, 64), lambda spec: ChatPrompts(spec.kind, processor)
    )
    assert report.samples == {"shard-000": 20, "captions": 4, "bytes": 2}
    # "all_exhausted" oversamples the smaller sources until every one is seen whole, drawing in a 3 : 1 : 0.5 ratio
    assert len(mixed) >= 26
