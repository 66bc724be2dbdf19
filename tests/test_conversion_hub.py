"""Hub-ready conversion: shards, dtypes, remote code, model card, verification, atomicity, the way back."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoProcessor

from conftest import chat_as_remote_code
from viscpm.conversion.chat import chat_to_original, convert_chat
from viscpm.conversion.checkpoint import CheckpointError, CheckpointMismatchError
from viscpm.conversion.export import EXTRAS_FILE, WEIGHTS_INDEX, verify_weights, weight_files

pytestmark = pytest.mark.golden


@pytest.fixture(scope="module")
def golden_chat(golden_dir):
    (checkpoint,) = sorted((golden_dir / "chat").glob("*.pt"))
    return dict(
        checkpoint=checkpoint, vocab=golden_dir / "vocab" / "bee.txt", config=golden_dir / "chat" / "config.json"
    )


@pytest.fixture(scope="module")
def sharded(golden_chat, tmp_path_factory):
    output = tmp_path_factory.mktemp("hub") / "sharded"
    convert_chat(**golden_chat, output=output, max_shard_size="4MB")
    return output


def test_weights_are_sharded_with_an_index(sharded, golden_chat):
    index = json.loads((sharded / WEIGHTS_INDEX).read_text())
    files = weight_files(sharded)
    assert len(files) > 1 and all(path.is_file() for path in files)
    original = torch.load(golden_chat["checkpoint"], weights_only=True)
    for path in files:
        assert path.stat().st_size <= 4 * 10**6 or len(load_file(path)) == 1  # a single tensor may exceed a shard
    assert index["metadata"]["total_size"] == sum(
        tensor.numel() * tensor.element_size() for key, tensor in load_all(sharded).items()
    )
    # every tensor of the original is either a weight or an original-only extra, in the checkpoint's dtype
    with safe_open(sharded / EXTRAS_FILE, framework="pt") as extras:
        extra_keys = set(extras.keys())
    assert len(index["weight_map"]) + len(extra_keys) == len(original)
    assert {tensor.dtype for tensor in load_all(sharded).values()} == {torch.float16}


def load_all(folder: Path) -> dict:
    return {key: value for path in weight_files(folder) for key, value in load_file(path).items()}


@pytest.mark.parametrize("dtype, torch_dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_dtype_option(golden_chat, tmp_path, dtype, torch_dtype):
    output = convert_chat(**golden_chat, output=tmp_path / dtype, dtype=dtype)
    assert {tensor.dtype for tensor in load_all(output).values()} == {torch_dtype}
    assert json.loads((output / "config.json").read_text())["dtype"] == str(torch_dtype).removeprefix("torch.")


@pytest.mark.slow
def test_remote_code_loads_in_a_fresh_process_without_viscpm(sharded, golden_dir, tmp_path):
    """trust_remote_code=True, offline, viscpm never imported: the same answers and logits as the native path."""
    image = sorted((golden_dir / "chat" / "images").iterdir())[0]
    script = f"""
import json, sys, torch
from PIL import Image
from transformers import AutoModel, AutoProcessor
model = AutoModel.from_pretrained({str(sharded)!r}, trust_remote_code=True, dtype=torch.float32).eval()
processor = AutoProcessor.from_pretrained({str(sharded)!r}, trust_remote_code=True)
answer, _, states, ids = model.chat(Image.open({str(image)!r}), "What is in the image?", processor,
                                    max_new_tokens=8, return_token_ids=True)
assert "viscpm" not in sys.modules, "viscpm was imported"
print(json.dumps({{"answer": answer, "ids": ids, "states": states.flatten().tolist(),
                  "model": type(model).__module__}}))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    assert remote["model"].startswith("transformers_modules.")

    # the native path (importing viscpm.conversion registered the classes)
    model = AutoModel.from_pretrained(sharded, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(sharded)
    answer, _, states, ids = model.chat(
        Image.open(image), "What is in the image?", processor, max_new_tokens=8, return_token_ids=True
    )
    assert (remote["answer"], remote["ids"]) == (answer, ids)
    torch.testing.assert_close(torch.tensor(remote["states"]), states.flatten(), rtol=0, atol=0)


@pytest.mark.slow
def test_a_natively_loaded_and_saved_model_keeps_its_remote_code(sharded, golden_dir, tmp_path):
    """save_pretrained after a native load (viscpm imported) writes the model files and every auto_map entry:
    the folder still loads where viscpm cannot be imported, and answers the same."""
    image = sorted((golden_dir / "chat" / "images").iterdir())[0]
    model = AutoModel.from_pretrained(sharded, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(sharded)
    model.save_pretrained(tmp_path / "saved")
    processor.save_pretrained(tmp_path / "saved")
    answer, _, _, ids = model.chat(
        Image.open(image), "What is in the image?", processor, num_beams=1, max_new_tokens=6, return_token_ids=True
    )
    remote = chat_as_remote_code(tmp_path / "saved", image, "What is in the image?", tmp_path)
    assert (remote["answer"], remote["ids"]) == (answer, ids)
    assert all(module.startswith("transformers_modules.") for module in remote["modules"]), remote["modules"]


def test_model_card(sharded):
    card = (sharded / "README.md").read_text(encoding="utf-8")
    header = card.split("---")[1]
    for field in (
        "license:",
        "language:",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        "base_model:",
        "tags:",
    ):
        assert field in header, field
    for section in ("trust_remote_code=True", "load_in_4bit=True", "LoraConfig", "VisCPM-Chat-balance"):
        assert section in card, section
    assert "{{" not in card


def test_model_card_sections_fill_the_template_and_refuse_strays(tmp_path):
    from viscpm.conversion.export import CHAT_CARD, PAINT_CARD, model_card_sections, render_model_card

    for card, library in ((CHAT_CARD, "transformers"), (PAINT_CARD, "diffusers")):
        text = render_model_card(card, "me/model")
        assert f"library_name: {library}" in text and 'from_pretrained("me/model"' in text and "{{" not in text
    stray = tmp_path / "stray.md"
    stray.write_text("a line before any section\n<!-- description -->\ntext\n", encoding="utf-8")
    with pytest.raises(ValueError, match="before its first"):
        model_card_sections(stray)
    unknown = tmp_path / "unknown.md"
    unknown.write_text((CHAT_CARD.read_text(encoding="utf-8")) + "<!-- licence -->\nGML\n", encoding="utf-8")
    with pytest.raises(KeyError, match="no placeholder"):
        render_model_card(unknown, "me/model")


def test_written_weights_are_verified(golden_chat, tmp_path):
    """A tensor changed after writing is caught by the verification."""
    from original_checkpoints import read_original_checkpoint
    from viscpm.conversion.chat import chat_key

    output = convert_chat(**golden_chat, output=tmp_path / "tampered", verify=False)
    (path,) = weight_files(output)
    weights = load_file(path)
    name = next(iter(weights))
    weights[name] = weights[name] + 1
    save_file(weights, path, metadata={"format": "pt"})
    original = read_original_checkpoint(golden_chat["checkpoint"])
    mapped = {chat_key(key): tensor for key, tensor in original.items() if chat_key(key) is not None}
    with pytest.raises(CheckpointError, match="verification failed"):
        verify_weights(output, mapped, torch.float16, release=False)


def test_round_trip_to_the_original_layout_is_bit_exact(golden_chat, tmp_path):
    original = torch.load(golden_chat["checkpoint"], weights_only=True)
    for dtype in (None, "fp32"):  # through fp32 and back is exact for fp16 weights
        folder = convert_chat(**golden_chat, output=tmp_path / f"hub-{dtype}", dtype=dtype)
        back = torch.load(chat_to_original(folder, tmp_path / f"back-{dtype}.pt"), weights_only=True)
        assert list(back) == list(original)
        for key, tensor in original.items():
            assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key


def test_legacy_checkpoint_format_converts_the_same(golden_chat, tmp_path):
    """Checkpoints saved without the zip format cannot be memory-mapped; they convert all the same."""
    legacy = tmp_path / "legacy.pt"
    torch.save(torch.load(golden_chat["checkpoint"], weights_only=True), legacy, _use_new_zipfile_serialization=False)
    reference = load_all(convert_chat(**golden_chat, output=tmp_path / "reference"))
    converted = load_all(convert_chat(**{**golden_chat, "checkpoint": legacy}, output=tmp_path / "legacy"))
    assert reference.keys() == converted.keys()
    assert all(torch.equal(reference[key], converted[key]) for key in reference)


def test_bad_checkpoints_leave_no_output(golden_chat, tmp_path):
    original = torch.load(golden_chat["checkpoint"], weights_only=True)
    broken = dict(original)
    del broken["mapping.2.bias"]
    broken["llm.encoder.layers.0.self_att.self_attention.project_v.weight"] = torch.zeros(3, 3, dtype=torch.float16)
    broken["vpm.beit3.unknown.weight"] = torch.zeros(1, dtype=torch.float16)
    path = tmp_path / "broken.pt"
    torch.save(broken, path)
    with pytest.raises(CheckpointMismatchError) as error:
        convert_chat(**{**golden_chat, "checkpoint": path}, output=tmp_path / "out")
    message = str(error.value)
    assert "missing key(s): mapping.2.bias" in message
    assert "mis-shaped key(s): llm.encoder.layers.0.self_att.self_attention.project_v.weight (3, 3)" in message
    assert "unexpected key(s): vpm.beit3.unknown.weight" in message
    assert not (tmp_path / "out").exists() and not any(p.name.startswith(".out.") for p in tmp_path.iterdir())


def test_existing_output_needs_overwrite(golden_chat, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_chat(**golden_chat, output=output)
    assert (output / "keep.txt").read_text() == "mine"
    convert_chat(**golden_chat, output=output, overwrite=True)
    assert not (output / "keep.txt").exists() and (output / "config.json").is_file()


def test_command_line_both_ways(golden_chat, tmp_path, capsys):
    from viscpm.cli import main

    folder = tmp_path / "hub"
    argv = ["convert", "chat", "--checkpoint", str(golden_chat["checkpoint"]), "--vocab", str(golden_chat["vocab"])]
    argv += ["--config", str(golden_chat["config"]), "--output", str(folder), "--dtype", "fp32"]
    argv += ["--max-shard-size", "2MB", "--no-verify"]
    assert main(argv) == 0
    assert len(weight_files(folder)) > 1
    back = tmp_path / "back.pt"
    assert main(["convert", "chat", "--to-original", str(folder), "--output", str(back)]) == 0
    original = torch.load(golden_chat["checkpoint"], weights_only=True)
    restored = torch.load(back, weights_only=True)
    assert all(
        restored[key].dtype == value.dtype and torch.equal(restored[key], value) for key, value in original.items()
    )
    assert main(["convert", "chat", "--to-original", str(folder), "--output", str(back)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["convert", "chat", "--to-original", str(tmp_path / "nope"), "--output", str(back)]) == 2
