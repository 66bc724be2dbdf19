"""VisCPM-Paint: golden parity through the converted checkpoint, and tiny-model behaviour of the pipeline.

Golden tests read every size, name and value from the fixture folder (`paint/`): the single original checkpoint
`*.pt`, the prompts of `text_hidden.json`, the generation settings of `generate.json` and, for
`viscpmpaint_generate`, the prompt index and seed its MANIFEST entry gives. Tolerances are the manifest's.
"""

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers import scheduling_ddpm
from original_checkpoints import read_original_checkpoint
from PIL import Image
from safetensors.torch import load_file

from conftest import REPO_ROOT, golden_cases, load_json
from tiny_models import TINY_UNET, tiny_pipeline
from viscpm.conversion.checkpoint import CheckpointError, map_state_dict
from viscpm.conversion.paint import convert_paint, paint_config_from_checkpoint, paint_key
from viscpm.modeling.configuration_viscpm_paint import VisCPMPaintConfig
from viscpm.modeling.modeling_viscpm_paint import VisCPMPaintModel, VisCPMPaintTextEncoder
from viscpm.modeling.pipeline_viscpm_paint import VisCPMPaintPipeline, clip_scorer

ATOL = RTOL = 1e-4
golden = pytest.mark.golden


def assert_close(actual, expected, name, atol=ATOL, rtol=RTOL):
    actual = torch.as_tensor(actual).float()
    torch.testing.assert_close(actual, expected.float(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def assert_uint8_close(actual: np.ndarray, expected: np.ndarray, name: str):
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    difference = np.abs(actual.astype(np.int16) - expected.astype(np.int16)).max()
    assert difference <= 1, f"{name}: uint8 values differ by {difference}"


# ---------------------------------------------------------------- golden parity


def only_checkpoint(folder: Path) -> Path:
    checkpoints = sorted(folder.glob("*.pt"))
    assert len(checkpoints) == 1, f"expected one original checkpoint (*.pt) in {folder}, found {checkpoints}"
    return checkpoints[0]


@pytest.fixture(scope="module")
def converted(golden_dir, tmp_path_factory):
    """The golden original checkpoint through the conversion users run."""
    folder = golden_dir / "paint"
    output = tmp_path_factory.mktemp("paint") / "converted"
    convert_paint(
        only_checkpoint(folder), golden_dir / "vocab" / "bee.txt", folder / "vae", output, config=folder / "config.json"
    )
    return output


@pytest.fixture(scope="module")
def pipe(converted):
    pipeline = VisCPMPaintPipeline.from_pretrained(converted)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def generate_cases(folder: Path) -> list[dict]:
    return load_json(folder / "paint" / "generate.json")


def text_cases(folder: Path) -> list[dict]:
    return load_json(folder / "paint" / "text_hidden.json")["inputs"]


@golden
def test_converted_folder_layout(converted, pipe, golden_dir):
    config = load_json(golden_dir / "paint" / "config.json")
    index = json.loads((converted / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_viscpm_paint", "VisCPMPaintPipeline"]
    assert index["text_encoder"] == ["modeling_viscpm_paint", "VisCPMPaintTextEncoder"]
    assert index["tokenizer"] == ["tokenization_cpmbee", "CpmBeeTokenizer"]
    assert (converted / "pipeline_viscpm_paint.py").is_file()
    assert (converted / "text_encoder" / "modeling_viscpm_paint.py").is_file()
    assert type(pipe.text_encoder) is VisCPMPaintTextEncoder and type(pipe.scheduler) is DDPMScheduler
    text_encoder_config = json.loads((converted / "text_encoder" / "config.json").read_text())
    assert text_encoder_config["model_type"] == "viscpm_paint_text_encoder"  # not the whole model's `viscpm_paint`
    text_config = pipe.text_encoder.config.text_config
    for key in ("vocab_size", "dim_model", "num_heads", "dim_head", "dim_ff", "num_layers"):
        assert getattr(text_config, key) == config["cpmbee"][key], key
    golden_unet = load_json(golden_dir / "paint" / "unet" / "config.json")
    assert {key: pipe.unet.config[key] for key in golden_unet if not key.startswith("_")} == {
        key: value for key, value in golden_unet.items() if not key.startswith("_")
    }
    assert pipe.text_encoder.config.bridge_eps == config["trans_block"]["eps"]
    for key, value in config["scheduler"].items():
        assert pipe.scheduler.config[key] == value, key
    # the weights are the checkpoint's, bit for bit (fp16 upcast to fp32)
    original = read_original_checkpoint(only_checkpoint(golden_dir / "paint"))
    weights = {**pipe.text_encoder.state_dict(), **{f"unet.{k}": v for k, v in pipe.unet.state_dict().items()}}
    assert set(weights) == set(original)
    assert all(torch.equal(weights[key], tensor.float()) for key, tensor in original.items())


@golden
@golden_cases("case", text_cases, ids=lambda case: case["key"])
def test_text_states_and_bridge_from_the_prompt(pipe, golden_dir, case):
    """Prompt -> `{'caption': prompt, 'objects': ''}` -> CPM-Bee hidden states at every position -> bridge."""
    fixture = load_file(golden_dir / "paint" / "text_hidden.safetensors")
    key = case["key"]
    batch = pipe.prepare_text_inputs([case["prompt"]])
    for name in [name.split(".in.")[1] for name in fixture if name.startswith(f"{key}.in.")]:
        actual, expected = batch[name], fixture[f"{key}.in.{name}"]
        assert torch.equal(actual.long().flatten(), expected.long().flatten()), f"{key}.in.{name}"
    with torch.no_grad():
        outputs = pipe.text_encoder(**batch)
    assert_close(outputs.text_hidden_states, fixture[f"{key}.text_hidden_states"], f"{key}.text_hidden_states")
    assert_close(outputs.encoder_hidden_states, fixture[f"{key}.trans_block_out"], f"{key}.trans_block_out")


@golden
def test_negative_prompt_pads_both_inputs_to_the_longer(pipe, golden_dir):
    spec = load_json(golden_dir / "paint" / "text_hidden.json")
    fixture = load_file(golden_dir / "paint" / "text_hidden.safetensors")
    batch = pipe.prepare_text_inputs([spec["negative_prompt"], spec["prompts"][0]])
    with torch.no_grad():
        hidden = pipe.text_encoder(**batch).text_hidden_states
    for row, which in enumerate(("uncond", "cond")):
        for name in ("input_ids", "input_id_subs", "context", "segment_ids", "num_segments", "length"):
            expected = fixture[f"negpair.{which}.in.{name}"].long().flatten()
            assert torch.equal(batch[name][row].long().flatten(), expected), f"negpair.{which}.in.{name}"
        assert_close(hidden[row : row + 1], fixture[f"negpair.{which}.text_hidden_states"], f"negpair.{which}")


@golden
def test_unet_noise_predictions(pipe, golden_dir):
    fixture = load_file(golden_dir / "paint" / "unet_vae.safetensors")
    model = VisCPMPaintModel(paint_config_from_checkpoint(original := read_original_checkpoint(
        only_checkpoint(golden_dir / "paint")), load_json(golden_dir / "paint" / "config.json"))).eval()  # fmt: skip
    model.load_state_dict({k: v.float() for k, v in map_state_dict(model.state_dict(), original, paint_key).items()})
    timesteps = sorted(int(m.group(1)) for name in fixture if (m := re.fullmatch(r"noise_pred\.t(\d+)", name)))
    assert timesteps
    for t in timesteps:
        with torch.no_grad():
            from_pipeline = pipe.unet(fixture["latents"], t, encoder_hidden_states=fixture["encoder_hidden_states"])
            from_model = model(fixture["latents"], t, encoder_hidden_states=fixture["encoder_hidden_states"])
        assert_close(from_pipeline.sample, fixture[f"noise_pred.t{t}"], f"noise_pred.t{t}", atol=1e-5)
        assert_close(from_model.sample, fixture[f"noise_pred.t{t}"], f"VisCPMPaintModel noise_pred.t{t}", atol=1e-5)


@golden
def test_vae_decode_and_encode(pipe, golden_dir):
    fixture = load_file(golden_dir / "paint" / "unet_vae.safetensors")
    with torch.no_grad():
        decoded = pipe.decode_latents(fixture["latents"]).permute(0, 2, 3, 1)
        posterior = pipe.vae.encode(fixture["vae.encode.input"]).latent_dist
    assert_close(decoded, fixture["vae.decode_latents"], "vae.decode_latents", atol=1e-5)
    assert_close(posterior.mean, fixture["vae.encode.mean"], "vae.encode.mean", atol=1e-5)
    assert_close(posterior.std, fixture["vae.encode.std"], "vae.encode.std", atol=1e-5)


class StepRecorder:
    """What the pipeline feeds the UNet and the scheduler at every step, and the noise DDPM draws."""

    def __init__(self, pipeline, monkeypatch):
        self.unet_inputs, self.unet_outputs, self.steps, self.variance_noise = [], [], [], []
        self.hook = pipeline.unet.register_forward_hook(self._unet_hook, with_kwargs=True)
        step = pipeline.scheduler.step

        @functools.wraps(step)  # keeps the signature: the pipeline passes `generator` only to steps that take it
        def recording_step(model_output, timestep, sample, **kwargs):
            output = step(model_output, timestep, sample, **kwargs)
            self.steps.append((int(timestep), sample.clone(), model_output.clone(), output[0].clone()))
            return output

        monkeypatch.setattr(pipeline.scheduler, "step", recording_step)
        draw = scheduling_ddpm.randn_tensor

        def recording_draw(*args, **kwargs):
            noise = draw(*args, **kwargs)
            self.variance_noise.append(noise.clone())
            return noise

        monkeypatch.setattr(scheduling_ddpm, "randn_tensor", recording_draw)

    def _unet_hook(self, module, args, kwargs, output):
        self.unet_inputs.append((args[0].clone(), kwargs["encoder_hidden_states"].clone()))
        self.unet_outputs.append(output[0].clone())


@golden
@golden_cases("case", generate_cases, ids=lambda case: case["key"])
def test_generation_equals_the_original_step_by_step(pipe, golden_dir, monkeypatch, case):
    """The original's CFG loop with the fixture's initial latents and generator: every step, then the image and PNG."""
    fixture = load_file(golden_dir / "paint" / "generate.safetensors")
    key = case["key"]
    recorder = StepRecorder(pipe, monkeypatch)
    kwargs = dict(
        negative_prompt=case["negative_prompt"],
        height=case["height"],
        width=case["width"],
        num_inference_steps=case["num_inference_steps"],
        guidance_scale=case["guidance_scale"],
        latents=fixture[f"{key}.initial_latents"],
    )
    try:
        images = pipe(
            case["prompt"], generator=torch.Generator().manual_seed(case["generator_seed"]), output_type="np", **kwargs
        ).images
    finally:
        recorder.hook.remove()
    assert [t for t, *_ in recorder.steps] == case["timesteps"] == fixture[f"{key}.timesteps"].tolist()
    assert_close(recorder.unet_inputs[0][1], fixture[f"{key}.encoder_hidden_states_uncond_cond"], "encoder states")
    stacked = {
        "latents_before_step": torch.stack([sample for _, sample, _, _ in recorder.steps]),
        "guided_noise_pred": torch.stack([guided for _, _, guided, _ in recorder.steps]),
        "latents_after_step": torch.stack([after for *_, after in recorder.steps]),
        "unet_out_uncond_cond": torch.stack(recorder.unet_outputs),
        "variance_noise": torch.stack(recorder.variance_noise),
    }
    for name, values in stacked.items():
        assert_close(values, fixture[f"{key}.{name}"], f"{key}.{name}")
    assert_close(images, fixture[f"{key}.image"], f"{key}.image", rtol=0)

    # the PNG the original saved: the same run as PIL (uint8, +-1 for values that are not bit-exact)
    png = pipe(case["prompt"], generator=torch.Generator().manual_seed(case["generator_seed"]), **kwargs).images[0]
    assert_uint8_close(np.asarray(png), np.asarray(Image.open(golden_dir / "paint" / f"{key}.png")), f"{key}.png")


def viscpmpaint_generate_settings(golden_dir: Path) -> tuple[str, int]:
    """Prompt and seed of `paint/viscpmpaint_generate.*`, which only its MANIFEST entry gives."""
    manifest = (golden_dir / "MANIFEST.md").read_text(encoding="utf-8")
    entry = manifest.split("### `paint/viscpmpaint_generate.safetensors`", 1)[1].split("\n### ", 1)[0]
    prompt_index = int(re.search(r"generate\(paint_prompts\[(\d+)\]", entry).group(1))
    seed = int(re.search(r"manual_seed\((\d+)\)", entry).group(1))
    return load_json(golden_dir / "paint" / "text_hidden.json")["prompts"][prompt_index], seed


@golden
def test_viscpmpaint_generate_with_the_default_50_ddpm_steps(pipe, golden_dir):
    """`VisCPMPaint.generate(prompt, image_size, generator)`: latents drawn from the generator, then 50 DDPM steps
    drawing from the same generator, guidance 7.5."""
    fixture = load_file(golden_dir / "paint" / "viscpmpaint_generate.safetensors")
    prompt, seed = viscpmpaint_generate_settings(golden_dir)
    _, height, width, _ = fixture["image_uint8"].shape
    first_unet_input = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda module, args: first_unet_input.append(args[0].clone()) if not first_unet_input else None
    )
    try:
        image = pipe(prompt, height=height, width=width, generator=torch.Generator().manual_seed(seed)).images[0]
    finally:
        hook.remove()
    initial_latents = first_unet_input[0].chunk(2)[0]  # [uncond, cond] copies of the same latents
    torch.testing.assert_close(initial_latents, fixture["initial_latents"], rtol=1e-6, atol=0)
    assert pipe.scheduler.timesteps.numel() == 50
    assert_uint8_close(np.asarray(image)[None], fixture["image_uint8"].numpy(), "image_uint8")
    png = np.asarray(Image.open(golden_dir / "paint" / "viscpmpaint_generate.png").convert("RGB"))
    assert_uint8_close(np.asarray(image), png, "viscpmpaint_generate.png")


@pytest.mark.slow
@golden
def test_remote_code_folder_loads_without_viscpm(converted, pipe, golden_dir, tmp_path):
    """`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` in a fresh process that never imports viscpm
    gives the same image."""
    (case, *_) = generate_cases(golden_dir)
    script = f"""
import sys, numpy, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained({str(converted)!r}, trust_remote_code=True, torch_dtype=torch.float32)
pipe.set_progress_bar_config(disable=True)
image = pipe({case["prompt"]!r}, height={case["height"]}, width={case["width"]}, num_inference_steps=2,
             generator=torch.Generator().manual_seed(0), output_type="np").images
assert "viscpm" not in sys.modules, "the folder's own code must be enough"
numpy.save({str(tmp_path / "image.npy")!r}, image)
"""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = pipe(
        case["prompt"],
        height=case["height"],
        width=case["width"],
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    np.testing.assert_allclose(np.load(tmp_path / "image.npy"), expected, rtol=0, atol=1e-5)


@golden
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


# ---------------------------------------------------------------- tiny random models


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def tiny(tmp_path):
    return tiny_pipeline(tmp_path)


def test_save_and_reload_pipeline(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_viscpm_paint", "VisCPMPaintPipeline"]
    reloaded = VisCPMPaintPipeline.from_pretrained(tmp_path / "saved")
    reloaded.set_progress_bar_config(disable=True)
    assert type(reloaded.text_encoder) is VisCPMPaintTextEncoder and reloaded.unet.dtype == torch.float32
    kwargs = dict(num_inference_steps=3, output_type="np")
    expected = tiny("a red cat", generator=seeded(), **kwargs).images
    np.testing.assert_array_equal(reloaded("a red cat", generator=seeded(), **kwargs).images, expected)
    swapped = VisCPMPaintPipeline.from_pretrained(
        tmp_path / "saved", scheduler=DPMSolverMultistepScheduler.from_config(tiny.scheduler.config)
    )
    assert type(swapped.scheduler) is DPMSolverMultistepScheduler
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        VisCPMPaintPipeline.from_pretrained(tmp_path)


def test_paint_model_saves_reloads_and_trains(tmp_path):
    pipeline = tiny_pipeline(tmp_path)
    model = VisCPMPaintModel(pipeline.text_encoder.config).eval()
    model.save_pretrained(tmp_path / "model")
    reloaded = VisCPMPaintModel.from_pretrained(tmp_path / "model", dtype=torch.float32).eval()
    batch = pipeline.prepare_text_inputs(["a red cat", "b"])
    latents, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    outputs = model(latents, torch.tensor([10, 500]), noise=noise, **batch)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(latents, torch.tensor([10, 500]), **batch).sample, outputs.sample)
    outputs.loss.backward()
    assert model.llm.input_embedding.weight.grad is not None and model.trans_block.w_out_res.weight.grad is not None
    torch.testing.assert_close(outputs.loss, torch.nn.functional.mse_loss(outputs.sample, noise))


def test_scheduler_swap(tiny):
    tiny.scheduler = DPMSolverMultistepScheduler.from_config(tiny.scheduler.config)
    images = tiny("a red cat", num_inference_steps=4, generator=seeded(), output_type="np").images
    assert images.shape == (1, 8, 8, 3) and np.isfinite(images).all()


def test_num_images_per_prompt_and_guidance_layout(tiny):
    seen = []
    hook = tiny.unet.register_forward_hook(
        lambda module, args, kwargs, output: seen.append(kwargs["encoder_hidden_states"]), with_kwargs=True
    )
    try:
        output = tiny(["a red cat", "b"], num_images_per_prompt=3, num_inference_steps=2, generator=seeded())
        tiny("a red cat", guidance_scale=1.0, num_inference_steps=1, output_type="latent")
    finally:
        hook.remove()
    assert len(output.images) == 6 and output.images[0].size == (8, 8)
    states = seen[0]  # [uncond p0 x3, uncond p1 x3, cond p0 x3, cond p1 x3]
    assert states.shape[0] == 12
    for group in range(4):
        assert all(torch.equal(states[group * 3], states[group * 3 + i]) for i in (1, 2))
    assert torch.equal(states[0], states[3])  # both unconditional inputs are the empty caption
    assert not torch.equal(states[6], states[9])
    # without guidance only the conditional input runs, padded as with guidance: the same states
    assert seen[-1].shape[0] == 1
    torch.testing.assert_close(seen[-1][0], states[6], rtol=1e-6, atol=1e-6)


def test_callback_on_step_end(tiny):
    calls = []

    def callback(pipeline, step, timestep, tensors):
        calls.append((step, int(timestep), tuple(tensors)))
        return {"latents": torch.zeros_like(tensors["latents"])} if step == 2 else {}

    latents = tiny("a red cat", num_inference_steps=3, output_type="latent", callback_on_step_end=callback,
                   callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"]).images  # fmt: skip
    assert [step for step, _, _ in calls] == [0, 1, 2]
    assert [t for _, t, _ in calls] == tiny.scheduler.timesteps.tolist()
    assert calls[0][2] == ("latents", "prompt_embeds")
    assert latents.abs().sum() == 0


def test_prompt_embeds_give_the_same_images(tiny):
    with torch.no_grad():  # as in the pipeline: attention may take another kernel when gradients are recorded
        prompt_embeds, negative_prompt_embeds = tiny.encode_prompt("a red cat", "cpu", 1, True, negative_prompt="dog")
    kwargs = dict(num_inference_steps=2, output_type="np")
    expected = tiny("a red cat", negative_prompt="dog", generator=seeded(), **kwargs).images
    from_embeds = tiny(
        prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, generator=seeded(), **kwargs
    ).images
    np.testing.assert_array_equal(from_embeds, expected)


def brightness_scorer(images, prompt):
    return [float(np.asarray(image).mean()) for image in images]


def test_reranking_keeps_the_best_candidate(tiny):
    latents = torch.randn(6, 4, 4, 4, generator=seeded(1))
    kwargs = dict(num_inference_steps=2, output_type="np", latents=latents)
    candidates = tiny("a red cat", num_images_per_prompt=6, generator=seeded(), **kwargs).images
    output = tiny(
        "a red cat", num_images_per_prompt=2, rerank_candidates=3, scorer=brightness_scorer, generator=seeded(),
        **kwargs,
    )  # fmt: skip
    assert output.images.shape[0] == 2
    for image, group in zip(output.images, (candidates[:3], candidates[3:])):
        scores = brightness_scorer(tiny.image_processor.numpy_to_pil(group), "")
        np.testing.assert_array_equal(image, group[int(np.argmax(scores))])
    assert output.scores == pytest.approx([max(brightness_scorer(tiny.image_processor.numpy_to_pil(g), "")) for g in
                                           (candidates[:3], candidates[3:])])  # fmt: skip


def test_safety_checker_blacks_out_flagged_images(tiny):
    seen_prompts = []

    def checker(images, prompts):
        seen_prompts.extend(prompts)
        return [index == 1 for index in range(len(images))]

    output = tiny("a red cat", num_images_per_prompt=2, num_inference_steps=2, safety_checker=checker,
                  output_type="np")  # fmt: skip
    assert output.nsfw_content_detected == [False, True]
    assert output.images[1].max() == 0 and output.images[0].max() > 0
    assert seen_prompts == ["a red cat", "a red cat"]


def test_clip_scorer_reads_the_diagonal():
    class Inputs(dict):
        def to(self, device):
            return self

    class Processor:
        def __call__(self, text, images, return_tensors, padding):
            assert text == ["a cat"] * len(images)
            return Inputs(count=len(images))

    class Model:
        device = "cpu"

        def __call__(self, count):
            logits = torch.arange(count * count, dtype=torch.float32).view(count, count)
            return type("Output", (), {"logits_per_image": logits})

    assert clip_scorer(Model(), Processor())([None, None, None], "a cat") == [0.0, 4.0, 8.0]


def test_bad_inputs_are_clear_errors(tiny, tmp_path):
    run = dict(num_inference_steps=1, output_type="latent")
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        tiny("  ", **run)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        tiny(["a", ""], **run)
    with pytest.raises(TypeError, match="`prompt` must be a str"):
        tiny(["a", 3], **run)
    with pytest.raises(ValueError, match="2 negative prompts for 1 prompts"):
        tiny("a", negative_prompt=["b", "c"], **run)
    with pytest.raises(ValueError, match="max_prompt_length=40"):
        tiny("a b " * 30, **run)
    with pytest.raises(ValueError, match="multiple of 2"):
        tiny("a", height=9, **run)
    with pytest.raises(ValueError, match="positive integer"):
        tiny("a", num_images_per_prompt=0, **run)
    with pytest.raises(ValueError, match="output_type"):
        tiny("a", num_inference_steps=1, output_type="jpeg")
    with pytest.raises(ValueError, match="needs a `scorer`"):
        tiny("a", rerank_candidates=2, num_inference_steps=1)
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        tiny("a", callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["noise"], **run)
    with pytest.raises(ValueError, match="`latents` has shape"):
        tiny("a", latents=torch.zeros(1, 4, 2, 2), **run)
    with pytest.raises(ValueError, match="generators for 2 latents"):
        tiny("a", num_images_per_prompt=2, generator=[seeded()], **run)
    with pytest.raises(ValueError, match="<<"):  # CPM-Bee markup, as in the original
        tiny("a < b", **run)
    no_vae = tiny_pipeline(tmp_path, with_vae=False)
    with pytest.raises(ValueError, match="no VAE"):
        no_vae("a red cat", num_inference_steps=1)
    assert no_vae("a red cat", num_inference_steps=1, output_type="latent").images.shape == (1, 4, 4, 4)
    with pytest.raises(ValueError, match="cross-attention"):
        VisCPMPaintPipeline(
            tiny.text_encoder,
            tiny.tokenizer,
            VisCPMPaintModel(VisCPMPaintConfig(text_config=tiny.text_encoder.config.text_config,
                                               unet_config={**TINY_UNET, "cross_attention_dim": 8})).unet,
            tiny.scheduler,
        )  # fmt: skip


def test_pipeline_file_is_self_contained():
    """The pipeline and model files import only torch, numpy, PIL, transformers, diffusers and each other (they ship
    as remote code)."""
    allowed = {"torch", "numpy", "PIL", "transformers", "diffusers", "huggingface_hub"}
    for name in ("pipeline_viscpm_paint.py", "modeling_viscpm_paint.py", "configuration_viscpm_paint.py"):
        source = (REPO_ROOT / "modeling" / name).read_text(encoding="utf-8")
        imported = set(re.findall(r"^\s*(?:from|import)\s+([A-Za-z_]\w*)", source, flags=re.MULTILINE))
        stdlib = set(sys.stdlib_module_names)
        assert imported - stdlib <= allowed, f"{name} imports {imported - stdlib - allowed}"


@golden
def test_paint_command_writes_the_golden_image(converted, golden_dir, tmp_path, capsys):
    """`viscpm paint` on the converted golden checkpoint, with the golden prompt and seed (default 50 DDPM steps)."""
    from viscpm.cli import main

    prompt, seed = viscpmpaint_generate_settings(golden_dir)
    fixture = load_file(golden_dir / "paint" / "viscpmpaint_generate.safetensors")
    _, height, width, _ = fixture["image_uint8"].shape
    output = tmp_path / "painted.png"
    argv = ["paint", prompt, "--model", str(converted), "-o", str(output), "--seed", str(seed)]
    assert main(argv + ["--height", str(height), "--width", str(width)]) == 0
    assert str(output) in capsys.readouterr().out
    assert_uint8_close(np.asarray(Image.open(output).convert("RGB"))[None], fixture["image_uint8"].numpy(), "cli")
    assert main(["paint", "  ", "--model", str(converted), "-o", str(output)]) == 2
    assert main(["paint", prompt, "--model", str(tmp_path), "-o", str(output)]) == 2
    assert "model_index.json" in capsys.readouterr().err


@golden
def test_convert_paint_command(golden_dir, tmp_path, capsys):
    from viscpm.cli import main

    paint = golden_dir / "paint"
    argv = [
        "convert",
        "paint",
        "--checkpoint",
        str(only_checkpoint(paint)),
        "--vocab",
        str(golden_dir / "vocab" / "bee.txt"),
    ]
    argv += ["--config", str(paint / "config.json"), "--output", str(tmp_path / "out")]
    assert main(argv + ["--vae", str(paint / "vae")]) == 0
    assert (tmp_path / "out" / "model_index.json").is_file()
    assert main(argv + ["--vae", str(tmp_path / "missing"), "--overwrite"]) == 2
    assert "AutoencoderKL" in capsys.readouterr().err


@golden
def test_round_trip_to_the_original_layout_and_verification(golden_dir, tmp_path):
    from viscpm.conversion.paint import paint_to_original

    paint = golden_dir / "paint"
    original = torch.load(only_checkpoint(paint), weights_only=True)
    folder = convert_paint(
        only_checkpoint(paint), golden_dir / "vocab" / "bee.txt", paint / "vae", tmp_path / "hub",
        config=paint / "config.json", dtype="fp32",
    )  # fmt: skip
    back = torch.load(paint_to_original(folder, tmp_path / "back.pt"), weights_only=True)
    assert list(back) == list(original)
    assert all(back[key].dtype == value.dtype and torch.equal(back[key], value) for key, value in original.items())


@golden
@torch.no_grad()
def test_text_encoder_in_8_bit(converted, pipe):
    """The 10B text encoder is what needs quantizing on one GPU; the UNet stays in full/half precision."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    quantized = VisCPMPaintTextEncoder.from_pretrained(
        converted, subfolder="text_encoder", quantization_config=BitsAndBytesConfig(load_in_8bit=True)
    )
    assert any(type(module).__name__ == "Linear8bitLt" for module in quantized.modules())
    inputs = pipe.prepare_text_inputs(["a red circle"])
    full = pipe.text_encoder.encode_prompt(**inputs).encoder_hidden_states
    eight_bit = quantized.encode_prompt(**inputs).encoder_hidden_states
    assert torch.nn.functional.cosine_similarity(full.flatten(), eight_bit.float().flatten(), dim=0) > 0.99
