"""MpM training: data preparation (golden items, batch and loss), every stage on tiny models, LoRA, resume."""

import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModel, AutoProcessor

from conftest import REPO_ROOT, chat_as_remote_code, load_json
from tiny_models import tiny_chat, tiny_pipeline
from viscpm.cli import main
from viscpm.training.data import (
    DataReport,
    ImageTextCollator,
    SamplePreparer,
    SourceSpec,
    StructuredSamples,
    caption_prompts,
    conversation_prompts,
    load_records,
    prepare_source,
    training_sample,
)
from viscpm.training.run import ConfigError, latest_complete_checkpoint, load_config, train

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "black": (0, 0, 0)}


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
    and loss (the original's training Dataset keeps the first item of each record)."""
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

    batch = ImageTextCollator(processor.tokenizer, max_length, pixels)(rows)
    golden = load_file(golden_dir / "chat" / "train_batch.safetensors")
    for name, expected in golden.items():
        if not name.startswith("batch.") or name == "batch.pixel_values":
            continue
        key = {"target": "labels"}.get(name[len("batch.") :], name[len("batch.") :])
        actual = batch[key][0] if key in ("ext_table_ids", "ext_table_sub") else batch[key]
        assert torch.equal(actual.long(), expected.long()), name
    torch.testing.assert_close(batch["pixel_values"], golden["batch.pixel_values"], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        loss = model(**batch).loss
    torch.testing.assert_close(loss, golden["loss"], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- data preparation


def colour_image(name: str, size: int = 40) -> Image.Image:
    return Image.new("RGB", (size, size), COLOURS[name])


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def caption_source(folder: Path, copies: int = 2, malformed: bool = True) -> Path:
    """A jsonl of image paths and captions; with `malformed`, one record of each kind that must be skipped."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for name in COLOURS:
        colour_image(name).save(folder / f"{name}.png")
        records += [{"image": f"{name}.png", "caption": f"a {name}"}] * copies
    if malformed:
        (folder / "broken.png").write_bytes(b"not a png")
        colour_image("red", size=8).save(folder / "small.png")
        records += [
            {"image": "missing.png", "caption": "a red"},
            {"image": "broken.png", "caption": "a red"},
            {"image": "small.png", "caption": "a red"},
            {"image": "red.png", "caption": ""},
            {"image": "red.png", "caption": "a " * 200},
        ]
    path = folder / "captions.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def conversation_source(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    colour_image("red").save(folder / "red.png")
    good = [
        {"from": "human", "value": "<image>\nwhat ?"},
        {"from": "gpt", "value": "a red"},
        {"from": "human", "value": "a b ?"},
        {"from": "gpt", "value": "c"},
    ]
    records = [
        {"image": "red.png", "conversations": good},
        {"image": "red.png", "conversations": good[:3]},  # odd number of turns
        {"image": "red.png", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]},
    ]
    path = folder / "llava.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


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


def test_conversations_give_one_sample_per_round_and_skip_malformed_ones(tmp_path):
    _, processor = tiny_chat(tmp_path)
    from viscpm.training.data import ChatPrompts

    spec = SourceSpec(path=str(conversation_source(tmp_path / "data")), kind="conversation",
                      image_root=str(tmp_path / "data"))  # fmt: skip
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


# ---------------------------------------------------------------- stages on tiny models


def write_config(path: Path, **entries) -> Path:
    path.write_text(yaml.safe_dump(entries), encoding="utf-8")
    return path


def chat_folder(tmp_path: Path) -> Path:
    model, processor = tiny_chat(tmp_path)
    folder = tmp_path / "tiny-chat"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def chat_config(tmp_path: Path, model: Path, output: str, steps: int = 8, **extra) -> dict:
    data = caption_source(tmp_path / "data", malformed=False)
    training = {
        "max_steps": steps,
        "learning_rate": 1e-2,
        "per_device_train_batch_size": 8,
        "logging_steps": 1,
        "save_steps": 1000,
        "lr_scheduler_type": "constant",
        **extra.pop("training", {}),
    }
    return {
        "model": str(model),
        "output_dir": str(tmp_path / output),
        "data": {"sources": [{"path": str(data), "image_root": str(tmp_path / "data")}], "max_length": 64},
        "training": training,
        **extra,
    }


def state(model) -> dict:
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


def falls(losses: list[float]) -> bool:
    """Every step sees the whole tiny set (batch 8), so the curve is smooth: the last steps are 10% below the first."""
    return np.mean(losses[-2:]) < 0.9 * losses[0]


def assert_answers_alike_as_remote_code(folder: Path, tmp_path: Path) -> None:
    """A saved folder (final, merged) loads where viscpm cannot be imported, and answers as it does natively."""
    image = tmp_path / "red.png"
    colour_image("red").save(image)
    model, processor = AutoModel.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)
    answer, _, _, ids = model.chat(
        str(image), "what ?", processor, num_beams=1, max_new_tokens=4, return_token_ids=True
    )
    remote = chat_as_remote_code(folder, image, "what ?", tmp_path, max_new_tokens=4)
    assert (remote["answer"], remote["ids"]) == (answer, ids)


def test_chat_pretrain_trains_the_queries_and_language_experts_only(tmp_path):
    folder = chat_folder(tmp_path)
    before = state(AutoModel.from_pretrained(folder))
    config = load_config(
        "chat-pretrain", str(write_config(tmp_path / "c.yaml", **chat_config(tmp_path, folder, "run")))
    )
    summary, _ = train("chat-pretrain", config)
    assert falls(summary["losses"]), summary["losses"]
    after = state(AutoModel.from_pretrained(summary["saved"]))
    frozen = [n for n in before if n.startswith("llm.") or ".image." in n or "patch_embedding" in n or "cls_token" in n]
    trained = ["query", "mapping.0.weight", "vpm.encoder.layers.0.ffn.text.fc1.weight"]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    assert all(not torch.equal(before[n], after[n]) for n in trained)
    processor = AutoProcessor.from_pretrained(summary["saved"])
    assert processor.query_num == 4
    assert_answers_alike_as_remote_code(Path(summary["saved"]), tmp_path)


def test_chat_sft_trains_everything_but_the_patch_embedding(tmp_path):
    folder = chat_folder(tmp_path)
    before = state(AutoModel.from_pretrained(folder))
    entries = chat_config(tmp_path, folder, "sft", training={"activation_checkpointing": True})
    config = load_config("chat-sft", None, [f"{key}={json.dumps(value)}" for key, value in entries.items()])
    summary, _ = train("chat-sft", config)
    assert falls(summary["losses"]), summary["losses"]
    after = state(AutoModel.from_pretrained(summary["saved"]))
    frozen = [name for name in before if "patch_embedding" in name or "cls_token" in name]
    assert frozen and all(torch.equal(before[name], after[name]) for name in frozen)
    trained = ["query", "mapping.0.weight", "vpm.encoder.layers.0.self_attn.q_proj.image.weight"]
    trained += [name for name in before if name.startswith("llm.model.encoder.")]
    assert all(not torch.equal(before[name], after[name]) for name in trained)


@pytest.mark.parametrize("quantization", [None, "nf4"])
def test_lora_adapter_saves_reloads_and_merges(tmp_path, quantization):
    from peft import PeftModel

    folder = chat_folder(tmp_path)
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "quantization": quantization}
    config = chat_config(tmp_path, folder, "lora", lora=lora, training={"learning_rate": 5e-2})
    summary, _ = train("chat-sft", load_config("chat-sft", str(write_config(tmp_path / "c.yaml", **config))))
    assert falls(summary["losses"]), summary["losses"]
    adapter = Path(summary["saved"])
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "model.safetensors").exists()

    _, processor = tiny_chat(tmp_path)
    inputs = processor(images=[colour_image("red")], text=["what ?"])
    base = AutoModel.from_pretrained(folder).eval()
    base_logits = base(**inputs).logits
    with torch.no_grad():
        adapted_logits = PeftModel.from_pretrained(base, adapter).eval()(**inputs).logits
    assert not torch.allclose(adapted_logits, base_logits)
    assert main(["merge-lora", str(adapter), "--output", str(tmp_path / "merged")]) == 0
    merged = AutoModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, adapted_logits, rtol=1e-4, atol=1e-4)
    assert AutoProcessor.from_pretrained(tmp_path / "merged").query_num == 4
    if quantization is None:
        assert_answers_alike_as_remote_code(tmp_path / "merged", tmp_path)


def paint_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny-paint"
    tiny_pipeline(tmp_path).save_pretrained(folder)
    return folder


def test_paint_trains_bridge_then_cross_attention_with_the_llm_frozen(tmp_path):
    from viscpm.modeling.pipeline_viscpm_paint import VisCPMPaintPipeline

    folder = paint_folder(tmp_path)
    before = VisCPMPaintPipeline.from_pretrained(folder)
    unfreeze = [{"step": 0, "train": ["bridge"]}, {"step": 3, "train": ["bridge", "unet_cross_attention"]}]
    config = chat_config(tmp_path, folder, "paint", steps=6, paint={"resolution": 16, "unfreeze": unfreeze,
                                                                   "caption_dropout": 0.2})  # fmt: skip
    summary, _ = train("paint", load_config("paint", str(write_config(tmp_path / "c.yaml", **config))))
    after = VisCPMPaintPipeline.from_pretrained(summary["saved"])
    assert all(np.isfinite(summary["losses"]))
    for name, value in before.text_encoder.state_dict().items():
        assert torch.equal(value, after.text_encoder.state_dict()[name]) == name.startswith("llm."), name
    for name, value in before.unet.state_dict().items():
        assert torch.equal(value, after.unet.state_dict()[name]) == (".attn2." not in name), name


def test_paint_loss_falls(tmp_path):
    folder = paint_folder(tmp_path)
    unfreeze = [{"step": 0, "train": ["bridge", "unet"]}]
    config = chat_config(tmp_path, folder, "paint", steps=12, paint={"resolution": 16, "unfreeze": unfreeze},
                         training={"learning_rate": 3e-3, "activation_checkpointing": True})  # fmt: skip
    summary, _ = train("paint", load_config("paint", str(write_config(tmp_path / "c.yaml", **config))))
    assert falls(summary["losses"]), summary["losses"]


def test_paint_token_dropout_hides_prompt_tokens_from_the_unet_and_never_padding(tmp_path):
    from viscpm.training.paint import PaintCollator

    tokenizer = tiny_pipeline(tmp_path).tokenizer
    lengths = torch.randint(1, 24, (4000,))
    tokens = (torch.arange(32)[None] < lengths[:, None]).long()
    torch.manual_seed(0)
    keep = PaintCollator(tokenizer, 32, 16, token_dropout=0.3).text_keep(tokens)
    assert torch.all(keep[tokens == 0] == 1)  # padding stays readable, as at inference
    assert torch.all((keep * tokens).sum(dim=1) >= 1)  # every prompt keeps a token
    assert abs(1 - keep[tokens == 1].float().mean().item() - 0.3) < 0.02
    everything = PaintCollator(tokenizer, 32, 16, token_dropout=1.0).text_keep(tokens)
    assert torch.equal(everything * tokens, torch.nn.functional.one_hot(torch.zeros(4000).long(), 32) * tokens)


def test_paint_token_dropout_reaches_the_unet(tmp_path):
    """Runs that draw alike and differ only in the mask the UNet gets: the losses differ."""
    folder = paint_folder(tmp_path)
    losses = []
    for dropout in (1e-9, 0.9):
        paint = {"resolution": 16, "unfreeze": [{"step": 0, "train": ["bridge", "unet"]}], "token_dropout": dropout}
        config = chat_config(tmp_path, folder, f"dropout-{dropout}", steps=3, paint=paint)
        summary, _ = train("paint", load_config("paint", str(write_config(tmp_path / "c.yaml", **config))))
        losses.append(summary["losses"])
    assert all(np.isfinite(losses[1])) and losses[0][0] != losses[1][0], losses


def test_the_command_line_run_lists_skipped_records(tmp_path, capsys):
    folder = chat_folder(tmp_path)
    config = chat_config(tmp_path, folder, "cli", steps=2)
    config["data"]["sources"][0]["path"] = str(caption_source(tmp_path / "data", malformed=True))
    config["data"]["min_image_size"] = 16
    config["training"]["save_steps"] = 1
    assert main(["train", "chat-pretrain", "--config", str(write_config(tmp_path / "c.yaml", **config))]) == 0
    printed = capsys.readouterr().out
    assert "captions: 13 records -> 8 samples, 5 records skipped" in printed
    assert "1 x unreadable image" in printed and f"saved: {tmp_path / 'cli' / 'final'}" in printed
    summary = json.loads((tmp_path / "cli" / "data_summary.json").read_text())
    assert summary["skipped"]["captions"]["missing image"] == 1
    assert main(["train", "chat-pretrain", "--config", str(tmp_path / "c.yaml")]) == 2  # checkpoints, no --resume


def test_config_errors_name_the_entry(tmp_path):
    with pytest.raises(ConfigError, match="'data.sourcez'"):
        load_config("chat-sft", None, ["model=m", "output_dir=o", "data.sourcez=[]"])
    with pytest.raises(ConfigError, match="needs `model`"):
        load_config("chat-sft", None, ["output_dir=o"])
    with pytest.raises(ConfigError, match="chat-sft only"):
        load_config("chat-pretrain", None, ["model=m", "output_dir=o", "lora.r=4"])
    assert main(["train", "paint", "--config", str(tmp_path / "absent.yaml")]) == 2


@pytest.mark.slow
def test_killed_run_resumes_on_the_same_loss_curve(tmp_path):
    """SIGKILL mid-run, then --resume: the resumed process starts at the newest complete checkpoint's step and runs
    only the remaining steps (the losses alone cannot tell a resumed run from one that started over), leaves the
    checkpoints it found untouched, and its losses continue those of an uninterrupted run with the same seed."""
    folder = chat_folder(tmp_path)
    base = chat_config(tmp_path, folder, "reference", steps=30, training={"save_steps": 5, "learning_rate": 3e-3})
    reference = write_config(tmp_path / "reference.yaml", **base)
    interrupted = write_config(tmp_path / "interrupted.yaml", **{**base, "output_dir": str(tmp_path / "interrupted")})
    command = [sys.executable, "-m", "viscpm", "train", "chat-pretrain"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}

    subprocess.run([*command, "--config", str(reference)], check=True, env=env, capture_output=True, cwd=REPO_ROOT)
    expected = json.loads((tmp_path / "reference" / "run_summary.json").read_text())["losses"]

    process = subprocess.Popen([*command, "--config", str(interrupted)], env=env, cwd=REPO_ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    checkpoint = tmp_path / "interrupted" / "checkpoint-10" / "trainer_state.json"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoint.exists() and not (tmp_path / "interrupted" / "final").exists(), "the run was not interrupted"
    newest = latest_complete_checkpoint(tmp_path / "interrupted")
    start = int(newest.name.split("-")[-1])
    complete = [path for path in newest.parent.glob("checkpoint-*") if int(path.name.split("-")[-1]) <= start]
    earlier = {file: file.read_bytes() for path in complete for file in path.rglob("*") if file.is_file()}

    subprocess.run([*command, "--config", str(interrupted), "--resume"], check=True, env=env, capture_output=True,
                   cwd=REPO_ROOT)  # fmt: skip
    summary = json.loads((tmp_path / "interrupted" / "run_summary.json").read_text())
    # it started at the checkpoint's step and ran only the remaining ones; the checkpoints it found are untouched
    assert summary["resumed_from"] == str(newest)
    ran = (summary["first_step_here"], summary["steps_run_here"], summary["global_step"])
    assert ran == (start + 1, 30 - start, 30), ran
    assert all(path.read_bytes() == content for path, content in earlier.items())
    assert len(summary["losses"]) == len(expected) == 30
    np.testing.assert_allclose(summary["losses"], expected, rtol=1e-5, atol=1e-6)
