"""`VisCPMPaintPipeline` on tiny random models: saving and reloading, schedulers, guidance, callbacks, prompt
embeddings, reranking, the safety checker and clear errors.
"""

import json
import re
import sys

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from conftest import REPO_ROOT
from tiny_models import TINY_UNET, tiny_pipeline
from viscpm.modeling.configuration_viscpm_paint import VisCPMPaintConfig
from viscpm.modeling.modeling_viscpm_paint import VisCPMPaintModel, VisCPMPaintTextEncoder
from viscpm.modeling.pipeline_viscpm_paint import VisCPMPaintPipeline, clip_scorer

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

    latents = tiny(
        "a red cat",
        num_inference_steps=3,
        output_type="latent",
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
    ).images
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
        "a red cat",
        num_images_per_prompt=2,
        rerank_candidates=3,
        scorer=brightness_scorer,
        generator=seeded(),
        **kwargs,
    )
    assert output.images.shape[0] == 2
    for image, group in zip(output.images, (candidates[:3], candidates[3:])):
        scores = brightness_scorer(tiny.image_processor.numpy_to_pil(group), "")
        np.testing.assert_array_equal(image, group[int(np.argmax(scores))])
    assert output.scores == pytest.approx(
        [max(brightness_scorer(tiny.image_processor.numpy_to_pil(g), "")) for g in (candidates[:3], candidates[3:])]
    )


def test_safety_checker_blacks_out_flagged_images(tiny):
    seen_prompts = []

    def checker(images, prompts):
        seen_prompts.extend(prompts)
        return [index == 1 for index in range(len(images))]

    output = tiny("a red cat", num_images_per_prompt=2, num_inference_steps=2, safety_checker=checker, output_type="np")
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
            VisCPMPaintModel(
                VisCPMPaintConfig(
                    text_config=tiny.text_encoder.config.text_config,
                    unet_config={**TINY_UNET, "cross_attention_dim": 8},
                )
            ).unet,
            tiny.scheduler,
        )


def test_pipeline_file_is_self_contained():
    """The pipeline and model files import only torch, numpy, PIL, transformers, diffusers and each other (they ship
    as remote code)."""
    allowed = {"torch", "numpy", "PIL", "transformers", "diffusers", "huggingface_hub"}
    for name in ("pipeline_viscpm_paint.py", "modeling_viscpm_paint.py", "configuration_viscpm_paint.py"):
        source = (REPO_ROOT / "modeling" / name).read_text(encoding="utf-8")
        imported = set(re.findall(r"^\s*(?:from|import)\s+([A-Za-z_]\w*)", source, flags=re.MULTILINE))
        stdlib = set(sys.stdlib_module_names)
        assert imported - stdlib <= allowed, f"{name} imports {imported - stdlib - allowed}"
