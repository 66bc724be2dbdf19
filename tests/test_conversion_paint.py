"""`convert_paint`: the original VisCPM-Paint checkpoint to a diffusers folder that loads with and without viscpm,
clear errors, and the way back to the original layout.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from conftest import load_json
from original_checkpoints import read_original_checkpoint
from paint_support import only_checkpoint, paint_generate_cases
from viscpm.conversion.checkpoint import CheckpointError
from viscpm.conversion.paint import convert_paint
from viscpm.modeling.modeling_viscpm_paint import VisCPMPaintTextEncoder


@pytest.mark.golden
def test_converted_folder_layout(converted_paint, paint_pipeline, golden_dir):
    config = load_json(golden_dir / "paint" / "config.json")
    index = json.loads((converted_paint / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_viscpm_paint", "VisCPMPaintPipeline"]
    assert index["text_encoder"] == ["modeling_viscpm_paint", "VisCPMPaintTextEncoder"]
    assert index["tokenizer"] == ["tokenization_cpmbee", "CpmBeeTokenizer"]
    assert (converted_paint / "pipeline_viscpm_paint.py").is_file()
    assert (converted_paint / "text_encoder" / "modeling_viscpm_paint.py").is_file()
    assert (
        type(paint_pipeline.text_encoder) is VisCPMPaintTextEncoder and type(paint_pipeline.scheduler) is DDPMScheduler
    )
    text_encoder_config = json.loads((converted_paint / "text_encoder" / "config.json").read_text())
    assert text_encoder_config["model_type"] == "viscpm_paint_text_encoder"  # not the whole model's `viscpm_paint`
    text_config = paint_pipeline.text_encoder.config.text_config
    for key in ("vocab_size", "dim_model", "num_heads", "dim_head", "dim_ff", "num_layers"):
        assert getattr(text_config, key) == config["cpmbee"][key], key
    golden_unet = load_json(golden_dir / "paint" / "unet" / "config.json")
    assert {key: paint_pipeline.unet.config[key] for key in golden_unet if not key.startswith("_")} == {
        key: value for key, value in golden_unet.items() if not key.startswith("_")
    }
    assert paint_pipeline.text_encoder.config.bridge_eps == config["trans_block"]["eps"]
    for key, value in config["scheduler"].items():
        assert paint_pipeline.scheduler.config[key] == value, key
    # the weights are the checkpoint's, bit for bit (fp16 upcast to fp32)
    original = read_original_checkpoint(only_checkpoint(golden_dir / "paint"))
    weights = {
        **paint_pipeline.text_encoder.state_dict(),
        **{f"unet.{k}": v for k, v in paint_pipeline.unet.state_dict().items()},
    }
    assert set(weights) == set(original)
    assert all(torch.equal(weights[key], tensor.float()) for key, tensor in original.items())


@pytest.mark.slow
@pytest.mark.golden
def test_remote_code_folder_loads_without_viscpm(converted_paint, paint_pipeline, golden_dir, tmp_path):
    """`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` in a fresh process that never imports viscpm
    gives the same image."""
    (case, *_) = paint_generate_cases(golden_dir)
    script = f"""
import sys, numpy, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained({str(converted_paint)!r}, trust_remote_code=True, torch_dtype=torch.float32)
pipe.set_progress_bar_config(disable=True)
image = pipe({case["prompt"]!r}, height={case["height"]}, width={case["width"]}, num_inference_steps=2,
             generator=torch.Generator().manual_seed(0), output_type="np").images
assert "viscpm" not in sys.modules, "the folder's own code must be enough"
numpy.save({str(tmp_path / "image.npy")!r}, image)
"""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = paint_pipeline(
        case["prompt"],
        height=case["height"],
        width=case["width"],
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    np.testing.assert_allclose(np.load(tmp_path / "image.npy"), expected, rtol=0, atol=1e-5)


@pytest.mark.golden
def test_conversion_errors_are_clear(golden_dir, tmp_path):
    paint, vocab = golden_dir / "paint", golden_dir / "vocab" / "bee.txt"
    checkpoint = only_checkpoint(paint)
    with pytest.raises(CheckpointError, match="VisCPM-Paint checkpoint"):
        convert_paint(only_checkpoint(golden_dir / "chat"), vocab, paint / "vae", tmp_path / "out")
    not_a_vae = tmp_path / "empty"
    not_a_vae.mkdir()
    with pytest.raises(CheckpointError, match="AutoencoderKL"):
        convert_paint(checkpoint, vocab, not_a_vae, tmp_path / "out")
    small_vocab = tmp_path / "vocab.txt"
    small_vocab.write_text("\n".join(["<pad>", "<unk>", "<mask>", "<s>", "</s>"]), encoding="utf-8")
    with pytest.raises(CheckpointError, match="vocabulary"):
        convert_paint(checkpoint, small_vocab, paint / "vae", tmp_path / "out", config=paint / "config.json")
    with pytest.raises(CheckpointError, match="attention_head_dim lists 4 values"):
        convert_paint(checkpoint, vocab, paint / "vae", tmp_path / "out")  # SD-2.1-base's heads for a 2-block UNet
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_paint(checkpoint, vocab, paint / "vae", tmp_path / "taken", config=paint / "config.json")
    assert not any(path.name.startswith(".out") for path in tmp_path.iterdir()), "no half-written folder is left"


@pytest.mark.golden
def test_round_trip_to_the_original_layout_and_verification(golden_dir, tmp_path):
    from viscpm.conversion.paint import paint_to_original

    paint = golden_dir / "paint"
    original = torch.load(only_checkpoint(paint), weights_only=True)
    folder = convert_paint(
        only_checkpoint(paint),
        golden_dir / "vocab" / "bee.txt",
        paint / "vae",
        tmp_path / "hub",
        config=paint / "config.json",
        dtype="fp32",
    )
    back = torch.load(paint_to_original(folder, tmp_path / "back.pt"), weights_only=True)
    assert list(back) == list(original)
    assert all(back[key].dtype == value.dtype and torch.equal(back[key], value) for key, value in original.items())
