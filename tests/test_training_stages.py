"""`viscpm train`: every stage on tiny models (what trains and what stays frozen), LoRA and QLoRA adapters, Paint's
token dropout, config errors, and a killed run that resumes where it stopped.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoProcessor

from conftest import REPO_ROOT, chat_as_remote_code
from tiny_models import tiny_chat, tiny_pipeline, tiny_pivot_chat
from training_support import caption_source, chat_config, colour_image, falls, state, write_config
from viscpm.cli import main
from viscpm.training.run import ConfigError, latest_complete_checkpoint, load_config, train

# ---------------------------------------------------------------- stages on tiny models


def chat_folder(tmp_path: Path, pivot: str = "cpmbee") -> Path:
    """A tiny random VisCPM-Chat saved with its processor: on CPM-Bee, or on a tiny pivot of that kind."""
    model, processor = tiny_chat(tmp_path) if pivot == "cpmbee" else tiny_pivot_chat(pivot)
    folder = tmp_path / f"tiny-{pivot}-chat"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


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


def test_tune_patch_embedding_trains_the_patch_embedding_and_class_token_too(tmp_path):
    """For a vision encoder that starts random (mpm-mini's), where the original keeps BEiT-3's pretrained one."""
    folder = chat_folder(tmp_path)
    before = state(AutoModel.from_pretrained(folder))
    entries = chat_config(tmp_path, folder, "run", tune_patch_embedding=True)
    summary, _ = train("chat-pretrain", load_config("chat-pretrain", str(write_config(tmp_path / "c.yaml", **entries))))
    after = state(AutoModel.from_pretrained(summary["saved"]))
    embedding = [name for name in before if "patch_embedding" in name or "cls_token" in name]
    assert embedding and all(not torch.equal(before[name], after[name]) for name in embedding)
    assert all(torch.equal(before[name], after[name]) for name in before if ".image." in name or "llm." in name)


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


@pytest.mark.parametrize("pivot", ["cpmbee", "qwen2"])
def test_chat_sft_trains_the_pivot_at_its_own_learning_rate(tmp_path, pivot):
    """`llm_learning_rate` a thousandth of the rest's: Adam moves a parameter by about its learning rate a step (at
    most 3.2 times it with the default betas), so in four steps the pivot moves under 2e-4 where the rest moves by
    hundredths; it still trains (does not stay frozen)."""
    folder = chat_folder(tmp_path, pivot)
    before = state(AutoModel.from_pretrained(folder))
    entries = chat_config(tmp_path, folder, "sft", steps=4, llm_learning_rate=1e-5)
    summary, _ = train("chat-sft", load_config("chat-sft", str(write_config(tmp_path / "c.yaml", **entries))))
    after = state(AutoModel.from_pretrained(summary["saved"]))
    moved = {name: (after[name] - before[name]).abs().max().item() for name in before}
    pivot_moves = [change for name, change in moved.items() if name.startswith("llm.")]
    assert pivot_moves and 0 < max(pivot_moves) < 2e-4, max(pivot_moves)
    assert min(moved["query"], moved["mapping.0.weight"]) > 1e-3, moved


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
    config = chat_config(
        tmp_path, folder, "paint", steps=6, paint={"resolution": 16, "unfreeze": unfreeze, "caption_dropout": 0.2}
    )
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
    config = chat_config(
        tmp_path,
        folder,
        "paint",
        steps=12,
        paint={"resolution": 16, "unfreeze": unfreeze},
        training={"learning_rate": 3e-3, "activation_checkpointing": True},
    )
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
    with pytest.raises(ConfigError, match="keeps the pivot frozen"):
        load_config("chat-pretrain", None, ["model=m", "output_dir=o", "llm_learning_rate=1e-4"])
    with pytest.raises(ConfigError, match="positive number"):
        load_config("chat-sft", None, ["model=m", "output_dir=o", "llm_learning_rate=fast"])
    captions = tmp_path / "c.jsonl"
    captions.write_text("")
    with pytest.raises(ConfigError, match="Paint's prompt is the caption alone"):
        load_config(
            "paint", None, ["model=m", "output_dir=o", f"data.sources=[{{path: {captions}, caption_requests: [a]}}]"]
        )
    with pytest.raises(ConfigError, match=r"data.sources\[0\]: .*caption_requests must be a non-empty list"):
        load_config(
            "chat-pretrain", None, ["model=m", "output_dir=o", "data.sources=[{path: c.jsonl, caption_requests: []}]"]
        )
    with pytest.raises(ConfigError, match="tune_patch_embedding must be true or false"):
        load_config("chat-sft", None, ["model=m", "output_dir=o", "tune_patch_embedding=yes please"])
    with pytest.raises(ConfigError, match="modules_to_save"):
        load_config("chat-sft", None, ["model=m", "output_dir=o", "tune_patch_embedding=true", "lora.r=4"])
    with pytest.raises(ConfigError, match="Paint has no vision encoder"):
        load_config("paint", None, ["model=m", "output_dir=o", "tune_patch_embedding=true"])
    with pytest.raises(ConfigError, match="Paint keeps its pivot frozen"):
        load_config("paint", None, ["model=m", "output_dir=o", "llm_learning_rate=1e-4"])
    assert main(["train", "paint", "--config", str(tmp_path / "absent.yaml")]) == 2


@pytest.mark.parametrize(
    "sources, named",
    [
        ("[]", "data.sources must be a non-empty list"),
        ("{path: captions.jsonl}", "data.sources must be a non-empty list"),
        ("[{path: absent.jsonl}]", "data.sources[0]: data source 'absent.jsonl' does not exist"),
        ("[{path: 'shards/*.tar'}]", "data.sources[0]: data source 'shards/*.tar' matches no file"),
        ("[{path: captions.txt}]", "unknown file type '.txt'"),
    ],
)
def test_a_wrong_data_source_is_named_before_the_model_loads(sources, named, tmp_path, monkeypatch, capsys):
    """The model named does not exist either: the error is the source's, found before any loading."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "captions.txt").write_text("a red circle\n")
    overrides = ["model=absent-model", "output_dir=run", f"data.sources={sources}"]
    assert main(["train", "chat-pretrain", *(f"--set={override}" for override in overrides)]) == 2
    error = capsys.readouterr().err
    assert named in error and "absent-model" not in error and not (tmp_path / "run").exists()


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

    process = subprocess.Popen(
        [*command, "--config", str(interrupted)],
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
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

    subprocess.run(
        [*command, "--config", str(interrupted), "--resume"], check=True, env=env, capture_output=True, cwd=REPO_ROOT
    )
    summary = json.loads((tmp_path / "interrupted" / "run_summary.json").read_text())
    # it started at the checkpoint's step and ran only the remaining ones; the checkpoints it found are untouched
    assert summary["resumed_from"] == str(newest)
    ran = (summary["first_step_here"], summary["steps_run_here"], summary["global_step"])
    assert ran == (start + 1, 30 - start, 30), ran
    assert all(path.read_bytes() == content for path, content in earlier.items())
    assert len(summary["losses"]) == len(expected) == 30
    np.testing.assert_allclose(summary["losses"], expected, rtol=1e-5, atol=1e-6)
