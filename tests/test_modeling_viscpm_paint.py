"""VisCPM-Paint against the original (golden): text states and the bridge, the UNet's noise predictions, the VAE,
and whole generations step by step.

Golden tests read every size, name and value from the fixture folder (`paint/`): the single original checkpoint
`*.pt`, the prompts of `text_hidden.json`, the generation settings of `generate.json` and, for
`viscpmpaint_generate`, the prompt index and seed its MANIFEST entry gives. Tolerances are the manifest's.
"""

import functools
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.schedulers import scheduling_ddpm
from PIL import Image
from safetensors.torch import load_file

from conftest import golden_cases, load_json
from original_checkpoints import read_original_checkpoint
from paint_support import (
    assert_close,
    assert_uint8_close,
    only_checkpoint,
    paint_generate_cases,
    viscpmpaint_generate_settings,
)
from viscpm.conversion.checkpoint import map_state_dict
from viscpm.conversion.paint import paint_config_from_checkpoint, paint_key
from viscpm.modeling.modeling_viscpm_paint import VisCPMPaintModel


def text_cases(folder: Path) -> list[dict]:
    return load_json(folder / "paint" / "text_hidden.json")["inputs"]


@pytest.mark.golden
@golden_cases("case", text_cases, ids=lambda case: case["key"])
def test_text_states_and_bridge_from_the_prompt(paint_pipeline, golden_dir, case):
    """Prompt -> `{'caption': prompt, 'objects': ''}` -> CPM-Bee hidden states at every position -> bridge."""
    fixture = load_file(golden_dir / "paint" / "text_hidden.safetensors")
    key = case["key"]
    batch = paint_pipeline.prepare_text_inputs([case["prompt"]])
    for name in [name.split(".in.")[1] for name in fixture if name.startswith(f"{key}.in.")]:
        actual, expected = batch[name], fixture[f"{key}.in.{name}"]
        assert torch.equal(actual.long().flatten(), expected.long().flatten()), f"{key}.in.{name}"
    with torch.no_grad():
        outputs = paint_pipeline.text_encoder(**batch)
    assert_close(outputs.text_hidden_states, fixture[f"{key}.text_hidden_states"], f"{key}.text_hidden_states")
    assert_close(outputs.encoder_hidden_states, fixture[f"{key}.trans_block_out"], f"{key}.trans_block_out")


@pytest.mark.golden
def test_negative_prompt_pads_both_inputs_to_the_longer(paint_pipeline, golden_dir):
    spec = load_json(golden_dir / "paint" / "text_hidden.json")
    fixture = load_file(golden_dir / "paint" / "text_hidden.safetensors")
    batch = paint_pipeline.prepare_text_inputs([spec["negative_prompt"], spec["prompts"][0]])
    with torch.no_grad():
        hidden = paint_pipeline.text_encoder(**batch).text_hidden_states
    for row, which in enumerate(("uncond", "cond")):
        for name in ("input_ids", "input_id_subs", "context", "segment_ids", "num_segments", "length"):
            expected = fixture[f"negpair.{which}.in.{name}"].long().flatten()
            assert torch.equal(batch[name][row].long().flatten(), expected), f"negpair.{which}.in.{name}"
        assert_close(hidden[row : row + 1], fixture[f"negpair.{which}.text_hidden_states"], f"negpair.{which}")


@pytest.mark.golden
def test_unet_noise_predictions(paint_pipeline, golden_dir):
    fixture = load_file(golden_dir / "paint" / "unet_vae.safetensors")
    model = VisCPMPaintModel(
        paint_config_from_checkpoint(
            original := read_original_checkpoint(only_checkpoint(golden_dir / "paint")),
            load_json(golden_dir / "paint" / "config.json"),
        )
    ).eval()
    model.load_state_dict({k: v.float() for k, v in map_state_dict(model.state_dict(), original, paint_key).items()})
    timesteps = sorted(int(m.group(1)) for name in fixture if (m := re.fullmatch(r"noise_pred\.t(\d+)", name)))
    assert timesteps
    for t in timesteps:
        with torch.no_grad():
            from_pipeline = paint_pipeline.unet(
                fixture["latents"], t, encoder_hidden_states=fixture["encoder_hidden_states"]
            )
            from_model = model(fixture["latents"], t, encoder_hidden_states=fixture["encoder_hidden_states"])
        assert_close(from_pipeline.sample, fixture[f"noise_pred.t{t}"], f"noise_pred.t{t}", atol=1e-5)
        assert_close(from_model.sample, fixture[f"noise_pred.t{t}"], f"VisCPMPaintModel noise_pred.t{t}", atol=1e-5)


@pytest.mark.golden
def test_vae_decode_and_encode(paint_pipeline, golden_dir):
    fixture = load_file(golden_dir / "paint" / "unet_vae.safetensors")
    with torch.no_grad():
        decoded = paint_pipeline.decode_latents(fixture["latents"]).permute(0, 2, 3, 1)
        posterior = paint_pipeline.vae.encode(fixture["vae.encode.input"]).latent_dist
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


@pytest.mark.golden
@golden_cases("case", paint_generate_cases, ids=lambda case: case["key"])
def test_generation_equals_the_original_step_by_step(paint_pipeline, golden_dir, monkeypatch, case):
    """The original's CFG loop with the fixture's initial latents and generator: every step, then the image and PNG."""
    fixture = load_file(golden_dir / "paint" / "generate.safetensors")
    key = case["key"]
    recorder = StepRecorder(paint_pipeline, monkeypatch)
    kwargs = dict(
        negative_prompt=case["negative_prompt"],
        height=case["height"],
        width=case["width"],
        num_inference_steps=case["num_inference_steps"],
        guidance_scale=case["guidance_scale"],
        latents=fixture[f"{key}.initial_latents"],
    )
    try:
        images = paint_pipeline(
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
    png = paint_pipeline(
        case["prompt"], generator=torch.Generator().manual_seed(case["generator_seed"]), **kwargs
    ).images[0]
    assert_uint8_close(np.asarray(png), np.asarray(Image.open(golden_dir / "paint" / f"{key}.png")), f"{key}.png")


@pytest.mark.golden
def test_viscpmpaint_generate_with_the_default_50_ddpm_steps(paint_pipeline, golden_dir):
    """`VisCPMPaint.generate(prompt, image_size, generator)`: latents drawn from the generator, then 50 DDPM steps
    drawing from the same generator, guidance 7.5."""
    fixture = load_file(golden_dir / "paint" / "viscpmpaint_generate.safetensors")
    prompt, seed = viscpmpaint_generate_settings(golden_dir)
    _, height, width, _ = fixture["image_uint8"].shape
    first_unet_input = []
    hook = paint_pipeline.unet.register_forward_pre_hook(
        lambda module, args: first_unet_input.append(args[0].clone()) if not first_unet_input else None
    )
    try:
        image = paint_pipeline(
            prompt, height=height, width=width, generator=torch.Generator().manual_seed(seed)
        ).images[0]
    finally:
        hook.remove()
    initial_latents = first_unet_input[0].chunk(2)[0]  # [uncond, cond] copies of the same latents
    torch.testing.assert_close(initial_latents, fixture["initial_latents"], rtol=1e-6, atol=0)
    assert paint_pipeline.scheduler.timesteps.numel() == 50
    assert_uint8_close(np.asarray(image)[None], fixture["image_uint8"].numpy(), "image_uint8")
    png = np.asarray(Image.open(golden_dir / "paint" / "viscpmpaint_generate.png").convert("RGB"))
    assert_uint8_close(np.asarray(image), png, "viscpmpaint_generate.png")
