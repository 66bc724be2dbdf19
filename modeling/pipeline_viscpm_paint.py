# Copyright 2026 The viscpm authors. Licensed under the Apache License, Version 2.0.
"""VisCPM-Paint text-to-image pipeline: CPM-Bee reads the prompt (Chinese or English), a Stable Diffusion UNet draws.

The steps are the original's (`VisCPMPaint.generate` -> `VLG_CPMBee.generate` -> `SDWrapper.generate`, OpenBMB/VisCPM):

* The prompt is the structured input `{'caption': prompt, 'objects': ''}`, the unconditional input the same with
  caption `negative_prompt` (or ''). Every input is collated on its own and right-padded (id 0) to the longest of the
  two; the text encoder's states at the padded positions are fed to the UNet, unmasked, so the padding length is part
  of the result (here a batch of prompts is padded to its longest input).
* Classifier-free guidance over `cat([uncond, cond])`: `uncond + guidance_scale * (cond - uncond)`.
* The scheduler's step receives the generator (DDPM draws its variance noise from it).
* Latents are decoded as `vae.decode(1 / scaling_factor * latents)`, then `(x / 2 + 0.5).clamp(0, 1)` and rounded to
  uint8 for PIL.

The prompt is CPM-Bee markup, not escaped, as in the original: write a literal `<` as `<<`.

Optional and off by default, both callables the caller supplies (nothing is downloaded here): a safety checker
(the original's image safety checker blacks out flagged images) and a scorer that reranks candidates (the original
draws 4 images per image asked and keeps the one Chinese-CLIP scores best; [`clip_scorer`] wraps such a model).
"""

import inspect
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import diffusers
import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import PreTrainedModel, PreTrainedTokenizer

# diffusers copies a local folder's remote code one relative import deep, so the pipeline imports every module that
# its own imports need (the configurations and CPM-Bee), not only the ones it uses.
from .configuration_cpmbee import CpmBeeConfig  # noqa: F401
from .configuration_viscpm_paint import VisCPMPaintConfig  # noqa: F401
from .modeling_cpmbee import CpmBeeModel  # noqa: F401
from .modeling_viscpm_paint import VisCPMPaintTextEncoder
from .structured_cpmbee import CpmBeeCollator, encode_structured
from .tokenization_cpmbee import CpmBeeTokenizer

# Latent downsampling of Stable Diffusion's VAE: only used when the pipeline has no VAE (latent output).
DEFAULT_VAE_SCALE_FACTOR = 8
OUTPUT_TYPES = ("pil", "np", "pt", "latent")

# Remote code of a saved folder: the file layout `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`
# reads (the pipeline at the root, each custom component's module in its subfolder), and model_index.json's entries.
PIPELINE_MODULE = "pipeline_viscpm_paint"
PIPELINE_FILES = (
    f"{PIPELINE_MODULE}.py",
    "configuration_cpmbee.py",
    "configuration_viscpm_paint.py",
    "modeling_cpmbee.py",
    "modeling_viscpm_paint.py",
    "structured_cpmbee.py",
    "tokenization_cpmbee.py",
)
COMPONENT_FILES = {
    "text_encoder": (
        ("modeling_viscpm_paint", "VisCPMPaintTextEncoder"),
        ("modeling_viscpm_paint.py", "configuration_viscpm_paint.py", "modeling_cpmbee.py", "configuration_cpmbee.py"),
    ),
    "tokenizer": (("tokenization_cpmbee", "CpmBeeTokenizer"), ("tokenization_cpmbee.py",)),
}


def paint_prompt(caption: str) -> dict:
    """The original's structured input of a caption."""
    return {"caption": caption, "objects": ""}


def clip_scorer(model, processor) -> Callable[[list[PIL.Image.Image], str], list[float]]:
    """A `scorer` for [`VisCPMPaintPipeline`] from a CLIP-like model and processor the caller has loaded (the original
    ranks with `OFA-Sys/chinese-clip-vit-base-patch16`): each image's `logits_per_image` with its prompt."""

    def score(images: list[PIL.Image.Image], prompt: str) -> list[float]:
        inputs = processor(text=[prompt] * len(images), images=images, return_tensors="pt", padding=True)
        inputs = inputs.to(model.device)
        with torch.no_grad():
            logits = model(**inputs).logits_per_image
        return torch.diagonal(logits).tolist()

    return score


@dataclass
class VisCPMPaintPipelineOutput(BaseOutput):
    """
    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
            The images (`(batch, height, width, 3)` floats in [0, 1] for `np`, `(batch, 3, height, width)` for `pt`) or,
            for `output_type="latent"`, the final latents.
        nsfw_content_detected (`list[bool]`, *optional*):
            Per image, whether the safety checker flagged it (it is then black); None without a safety checker.
        scores (`list[float]`, *optional*):
            Per image, the scorer's score of the candidate kept; None without reranking.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nsfw_content_detected: list[bool] | None = None
    scores: list[float] | None = None


class VisCPMPaintPipeline(DiffusionPipeline):
    r"""
    Text-to-image generation with VisCPM-Paint.

    Args:
        text_encoder ([`VisCPMPaintTextEncoder`]): CPM-Bee and the bridge to the UNet's cross-attention width.
        tokenizer ([`CpmBeeTokenizer`]): CPM-Bee's tokenizer.
        unet ([`~diffusers.UNet2DConditionModel`]): the denoiser (Stable Diffusion 2.1 base's architecture).
        scheduler ([`~diffusers.SchedulerMixin`]): any diffusers scheduler; the original's is `DDPMScheduler`.
        vae ([`~diffusers.AutoencoderKL`], *optional*): Stable Diffusion's VAE; only `output_type="latent"` works
            without it.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["vae"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        # base classes: a folder loaded as remote code gives each component its own copy of these classes
        text_encoder: PreTrainedModel,
        tokenizer: PreTrainedTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        vae: AutoencoderKL | None = None,
    ):
        super().__init__()
        if text_encoder is not None and unet is not None:
            bridge_width = text_encoder.config.cross_attention_dim
            if bridge_width != unet.config.cross_attention_dim:
                raise ValueError(
                    f"the text encoder's bridge outputs {bridge_width} features but the UNet's cross-attention takes "
                    f"{unet.config.cross_attention_dim}: the two do not come from the same VisCPM-Paint checkpoint"
                )
        self.register_modules(text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler, vae=vae)
        self.vae_scale_factor = (
            2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else DEFAULT_VAE_SCALE_FACTOR
        )
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    # ------------------------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a folder written by `save_pretrained` (or `viscpm convert paint`) with this installation's classes.

        Components load in float32 unless `dtype` (or `torch_dtype`) says otherwise; any component may be passed
        instead (`scheduler=DPMSolverMultistepScheduler.from_config(...)`). A Hub id is downloaded first. With
        `trust_remote_code=True` (or `custom_pipeline`) diffusers' own loading runs instead, on the code shipped in
        the folder, as `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` does without viscpm.
        """
        if kwargs.get("trust_remote_code") or kwargs.get("custom_pipeline"):
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        folder = Path(pretrained_model_name_or_path)
        hub_kwargs = {
            key: kwargs.pop(key)
            for key in ("cache_dir", "revision", "token", "local_files_only", "force_download")
            if key in kwargs
        }
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(str(pretrained_model_name_or_path), **hub_kwargs))
        index_file = folder / "model_index.json"
        if not index_file.is_file():
            raise FileNotFoundError(
                f"{folder} has no model_index.json: not a VisCPM-Paint pipeline folder (convert the original "
                "checkpoint with `viscpm convert paint`)"
            )
        index = json.loads(index_file.read_text(encoding="utf-8"))
        dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None) or torch.float32
        components = {}
        for name in ("text_encoder", "tokenizer", "unet", "scheduler", "vae"):
            if name in kwargs:
                components[name] = kwargs.pop(name)
                continue
            library, class_name = index.get(name) or (None, None)
            if class_name is None:
                components[name] = None
            elif name == "text_encoder":
                components[name] = VisCPMPaintTextEncoder.from_pretrained(folder / name, dtype=dtype)
            elif name == "tokenizer":
                components[name] = CpmBeeTokenizer.from_pretrained(folder / name)
            elif library != "diffusers" or not hasattr(diffusers, class_name):
                raise ValueError(
                    f"{folder}: model_index.json gives {name} as {[library, class_name]}, not a diffusers class: pass "
                    f"{name}=... to from_pretrained"
                )
            elif name == "scheduler":
                components[name] = getattr(diffusers, class_name).from_pretrained(folder / name)
            else:
                components[name] = getattr(diffusers, class_name).from_pretrained(folder / name, torch_dtype=dtype)
        if kwargs:
            raise TypeError(f"VisCPMPaintPipeline.from_pretrained got unexpected arguments {sorted(kwargs)}")
        return cls(**components)

    def save_pretrained(self, save_directory, remote_code: bool = True, **kwargs):
        """diffusers' `save_pretrained`, plus (unless `remote_code=False`: a folder only viscpm loads, such as the
        package's shipped default) the model files, so that the folder also loads without viscpm:
        `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`."""
        if kwargs.get("push_to_hub"):
            # diffusers would upload before the code is added
            raise ValueError("save first, then upload the folder (`huggingface_hub.upload_folder`)")
        if not remote_code:
            # a component whose class viscpm registered for an Auto class (the tokenizer) would write its code too,
            # and one loaded from a folder with code keeps that folder's `auto_map`, naming files this one lacks
            registered = [
                component for component in self.components.values() if getattr(component, "_auto_class", None)
            ]
            auto_maps = {
                name: component.init_kwargs.pop("auto_map")
                for name, component in self.components.items()
                if "auto_map" in getattr(component, "init_kwargs", {})
            }
            for part in registered:
                part._auto_class = None
            try:
                super().save_pretrained(save_directory, **kwargs)
            finally:
                for part in registered:
                    del part._auto_class
                for name, auto_map in auto_maps.items():
                    self.components[name].init_kwargs["auto_map"] = auto_map
            return
        super().save_pretrained(save_directory, **kwargs)
        folder = Path(save_directory)
        code = Path(__file__).resolve().parent
        for filename in PIPELINE_FILES:
            shutil.copy2(code / filename, folder / filename)
        index_file = folder / "model_index.json"
        index = json.loads(index_file.read_text(encoding="utf-8"))
        index["_class_name"] = [PIPELINE_MODULE, type(self).__name__]
        for name, (entry, filenames) in COMPONENT_FILES.items():
            if getattr(self, name, None) is None:
                continue
            index[name] = list(entry)
            for filename in filenames:
                shutil.copy2(code / filename, folder / name / filename)
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    # ---------------------------------------------------------------------------------------------- properties

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    # --------------------------------------------------------------------------------------------------- steps

    @staticmethod
    def check_prompts(prompt, negative_prompt) -> None:
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"`prompt` must be a str or a non-empty list of str, got {prompt!r}")
        for index, text in enumerate(prompts):
            if not text.strip():
                raise ValueError(
                    f"prompt {index} is empty: VisCPM-Paint draws what the caption describes (the original encodes "
                    "an empty caption only as the unconditional input; say what to avoid with `negative_prompt`)"
                )
        if negative_prompt is not None:
            negatives = [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt
            if not isinstance(negatives, list) or not all(isinstance(n, str) for n in negatives):
                raise TypeError(f"`negative_prompt` must be a str or a list of str, got {negative_prompt!r}")
            if not isinstance(negative_prompt, str) and len(negatives) != len(prompts):
                raise ValueError(
                    f"{len(negatives)} negative prompts for {len(prompts)} prompts: give one per prompt, or one str"
                )

    def check_prompt_embeds(self, prompt_embeds, negative_prompt_embeds, negative_prompt) -> None:
        if negative_prompt is not None:
            raise ValueError("with `prompt_embeds`, pass `negative_prompt_embeds` instead of `negative_prompt`")
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[-1] != self.unet.config.cross_attention_dim:
            raise ValueError(
                f"`prompt_embeds` must be (batch, length, {self.unet.config.cross_attention_dim}), got "
                f"{tuple(prompt_embeds.shape)}"
            )
        if self.do_classifier_free_guidance and negative_prompt_embeds is None:
            raise ValueError(
                "with `prompt_embeds` and guidance_scale > 1, pass `negative_prompt_embeds` too (both from "
                "`encode_prompt`, padded to the same length)"
            )
        if negative_prompt_embeds is not None and negative_prompt_embeds.shape != prompt_embeds.shape:
            raise ValueError(
                f"`prompt_embeds` {tuple(prompt_embeds.shape)} and `negative_prompt_embeds` "
                f"{tuple(negative_prompt_embeds.shape)} must have the same shape"
            )

    def check_inputs(
        self,
        prompt,
        negative_prompt,
        height,
        width,
        num_inference_steps,
        num_images_per_prompt,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        output_type="pil",
        callback_on_step_end_tensor_inputs=None,
        rerank_candidates=1,
        scorer=None,
        safety_checker=None,
    ):
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of `prompt` or `prompt_embeds`")
        if prompt is not None:
            self.check_prompts(prompt, negative_prompt)
        else:
            self.check_prompt_embeds(prompt_embeds, negative_prompt_embeds, negative_prompt)
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % self.vae_scale_factor:
                raise ValueError(
                    f"`{name}` must be a positive multiple of {self.vae_scale_factor} (the VAE's downsampling), got "
                    f"{value!r}"
                )
        for name, value in (
            ("num_inference_steps", num_inference_steps),
            ("num_images_per_prompt", num_images_per_prompt),
            ("rerank_candidates", rerank_candidates),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if output_type != "latent" and self.vae is None:
            raise ValueError(
                "this pipeline has no VAE to decode the latents: pass one (`vae=AutoencoderKL.from_pretrained("
                "'stabilityai/stable-diffusion-2-1-base', subfolder='vae')`) or ask for output_type='latent'"
            )
        if rerank_candidates > 1 and scorer is None:
            raise ValueError("`rerank_candidates` > 1 needs a `scorer` (e.g. `clip_scorer(model, processor)`)")
        if (rerank_candidates > 1 or safety_checker is not None) and output_type == "latent":
            raise ValueError("reranking and the safety checker look at images: not available with output_type='latent'")
        if rerank_candidates > 1 and prompt is None:
            raise ValueError("reranking scores images against their prompt: pass `prompt`, not `prompt_embeds`")
        for name, function in (("scorer", scorer), ("safety_checker", safety_checker)):
            if function is not None and not callable(function):
                raise TypeError(f"`{name}` must be callable, got {function!r}")
        unknown = [k for k in callback_on_step_end_tensor_inputs or () if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} not in {self._callback_tensor_inputs}")

    def prepare_text_inputs(self, captions: Sequence[str], padding_captions: Sequence[str] = ()) -> dict:
        """The CPM-Bee batch of `{'caption': c, 'objects': ''}` for every caption, right-padded (id 0) to the longest
        of `captions` and `padding_captions`: the original's `build_input`, which collates each input alone but pads
        it to the longer of a prompt and its unconditional twin."""
        limit = self.text_encoder.config.max_prompt_length
        samples = []
        for caption in [*captions, *padding_captions]:
            sample = encode_structured(self.tokenizer, paint_prompt(caption)).to_sample()
            if len(sample["input_ids"]) > limit:
                raise ValueError(
                    f"the prompt {caption[:40]!r}... encodes to {len(sample['input_ids'])} tokens, more than "
                    f"max_prompt_length={limit}: shorten it"
                )
            samples.append(sample)
        length = max(len(sample["input_ids"]) for sample in samples)
        return CpmBeeCollator(self.tokenizer, max_length=length)(samples[: len(captions)])

    def encode_prompt(
        self,
        prompt: str | list[str],
        device: torch.device,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        negative_prompt: str | list[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The UNet's conditional and unconditional `encoder_hidden_states`, each `(batch * num_images_per_prompt,
        length, cross_attention_dim)` with a prompt's copies next to each other; the second is None without guidance.

        Every input is padded to the longest prompt or negative prompt, also without guidance, so that a prompt's
        states do not depend on the guidance scale.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if negative_prompt is None or isinstance(negative_prompt, str):
            negatives = [negative_prompt or ""] * len(prompts)
        else:
            negatives = list(negative_prompt)
        if do_classifier_free_guidance:
            batch = self.prepare_text_inputs(negatives + prompts)
        else:
            batch = self.prepare_text_inputs(prompts, padding_captions=negatives)
        batch = {key: value.to(device) for key, value in batch.items()}
        states = self.text_encoder(**batch).encoder_hidden_states
        states = states.to(self.unet.dtype).repeat_interleave(num_images_per_prompt, dim=0)
        if not do_classifier_free_guidance:
            return states, None
        negative_states, states = states.chunk(2)
        return states, negative_states

    def prepare_latents(self, batch_size, num_channels_latents, height, width, dtype, device, generator, latents=None):
        shape = (batch_size, num_channels_latents, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"{len(generator)} generators for {batch_size} latents (prompts x num_images_per_prompt x "
                "rerank_candidates): pass one generator, or one per latent"
            )
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"`latents` has shape {tuple(latents.shape)}, expected {shape}")
        else:
            latents = latents.to(device=device, dtype=dtype)
        # the original scales given latents too
        return latents * self.scheduler.init_noise_sigma

    def prepare_extra_step_kwargs(self, generator, eta):
        """`generator` (and DDIM's `eta`) for the schedulers whose `step` takes them."""
        parameters = set(inspect.signature(self.scheduler.step).parameters)
        extra_step_kwargs = {}
        if "eta" in parameters:
            extra_step_kwargs["eta"] = eta
        if "generator" in parameters:
            extra_step_kwargs["generator"] = generator
        return extra_step_kwargs

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], `(batch, 3, height, width)`, float32: the original's `SDWrapper.decode_latents`."""
        if self.vae is None:
            raise ValueError("this pipeline has no VAE to decode latents with: pass `vae=` when building it")
        # `1 / scaling_factor * latents`, as the original writes it (not `latents / scaling_factor`: not bit-equal)
        latents = 1 / self.vae.config.scaling_factor * latents.to(self.vae.dtype)
        image = self.vae.decode(latents, return_dict=False)[0]
        return self.image_processor.postprocess(image, output_type="pt").float()

    def _to_pil(self, images: torch.Tensor) -> list[PIL.Image.Image]:
        return self.image_processor.numpy_to_pil(self.image_processor.pt_to_numpy(images))

    # ---------------------------------------------------------------------------------------------------- call

    def denoise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None,
        extra_step_kwargs: dict,
        callback_on_step_end: Callable | None,
        callback_on_step_end_tensor_inputs: Sequence[str],
    ) -> torch.Tensor:
        """The denoising loop with classifier-free guidance: the final latents."""
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                if self.do_classifier_free_guidance:
                    encoder_hidden_states = torch.cat([negative_prompt_embeds, prompt_embeds])
                    latent_model_input = torch.cat([latents] * 2)
                else:
                    encoder_hidden_states, latent_model_input = prompt_embeds, latents
                if hasattr(self.scheduler, "scale_model_input"):
                    latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)
                noise_pred = self.unet(
                    latent_model_input, t, encoder_hidden_states=encoder_hidden_states, return_dict=False
                )[0]
                if self.do_classifier_free_guidance:
                    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                    noise_pred = noise_pred_uncond + self.guidance_scale * (noise_pred_text - noise_pred_uncond)
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    available = {
                        "latents": latents,
                        "prompt_embeds": prompt_embeds,
                        "negative_prompt_embeds": negative_prompt_embeds,
                    }
                    tensors = {name: available[name] for name in callback_on_step_end_tensor_inputs}
                    outputs = callback_on_step_end(self, i, t, tensors) or {}
                    latents = outputs.pop("latents", latents)
                    prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                progress_bar.update()
        return latents

    def blank_flagged_images(
        self, images: torch.Tensor, prompts: list[str | None], safety_checker: Callable
    ) -> tuple[torch.Tensor, list[bool]]:
        """The images with those `safety_checker` flags made black (as the original), and the flags."""
        flags = [bool(flag) for flag in safety_checker(self._to_pil(images), prompts)]
        if len(flags) != len(images):
            raise ValueError(f"the safety checker returned {len(flags)} flags for {len(images)} images")
        flagged = torch.tensor(flags, device=images.device)
        return images.masked_fill(flagged[:, None, None, None], 0.0), flags

    def best_candidates(
        self,
        images: torch.Tensor,
        prompts: list[str],
        num_images_per_prompt: int,
        rerank_candidates: int,
        scorer: Callable,
    ) -> tuple[list[int], list[float]]:
        """The row of the best-scored candidate of each image, and its score."""
        pil_images = self._to_pil(images)
        keep, scores = [], []
        for group in range(len(images) // rerank_candidates):
            rows = range(group * rerank_candidates, (group + 1) * rerank_candidates)
            group_scores = [
                float(s) for s in scorer([pil_images[r] for r in rows], prompts[group // num_images_per_prompt])
            ]
            if len(group_scores) != rerank_candidates:
                raise ValueError(f"the scorer returned {len(group_scores)} scores for {rerank_candidates} images")
            best = max(range(rerank_candidates), key=group_scores.__getitem__)
            keep.append(rows[best])
            scores.append(group_scores[best])
        return keep, scores

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        rerank_candidates: int = 1,
        scorer: Callable[[list[PIL.Image.Image], str], Sequence[float]] | None = None,
        safety_checker: Callable[[list[PIL.Image.Image], list[str]], Sequence[bool]] | None = None,
    ) -> VisCPMPaintPipelineOutput | tuple:
        r"""
        Draw images for `prompt`.

        Args:
            prompt (`str` or `list[str]`): what to draw (CPM-Bee markup: a literal `<` is written `<<`).
            negative_prompt (`str` or `list[str]`, *optional*): what to avoid, the caption of the unconditional input.
            height, width (`int`, *optional*): image size, a multiple of the VAE's downsampling; defaults to the
                UNet's `sample_size` times it (512 for VisCPM-Paint).
            num_inference_steps (`int`, defaults to 50): denoising steps.
            guidance_scale (`float`, defaults to 7.5): classifier-free guidance (off at <= 1).
            num_images_per_prompt (`int`, defaults to 1): images per prompt.
            generator (`torch.Generator` or a list, one per latent): draws the initial latents and the scheduler's
                noise.
            latents (`torch.Tensor`, *optional*): initial latents, `(batch * num_images_per_prompt * rerank_candidates,
                in_channels, height / f, width / f)`; scaled by the scheduler's `init_noise_sigma`.
            prompt_embeds, negative_prompt_embeds (`torch.Tensor`, *optional*): precomputed `encode_prompt` outputs.
            eta (`float`, defaults to 0.0): DDIM's eta (ignored by other schedulers).
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` or `"latent"`.
            return_dict (`bool`, defaults to True): a [`VisCPMPaintPipelineOutput`] or a tuple
                `(images, nsfw_content_detected)`.
            callback_on_step_end (`Callable`, *optional*): `callback(pipeline, step, timestep, tensors) -> dict`
                after every step, with the tensors named in `callback_on_step_end_tensor_inputs`; the tensors it
                returns replace them.
            rerank_candidates (`int`, defaults to 1): draw this many candidates per image and keep the one `scorer`
                rates highest (the original: 4, scored by Chinese-CLIP).
            scorer (`Callable`, *optional*): `scorer(images, prompt) -> scores`, higher is better; see [`clip_scorer`].
            safety_checker (`Callable`, *optional*): `safety_checker(images, prompts) -> flags`; flagged images are
                replaced by black ones, as the original's image safety checker does.
        """
        # 0. Default size: the UNet's sample size, in pixels
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        self._guidance_scale = guidance_scale
        self._interrupt = False

        # 1. Check inputs
        self.check_inputs(
            prompt,
            negative_prompt,
            height,
            width,
            num_inference_steps,
            num_images_per_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            output_type,
            callback_on_step_end_tensor_inputs,
            rerank_candidates,
            scorer,
            safety_checker,
        )
        prompts = None if prompt is None else [prompt] if isinstance(prompt, str) else list(prompt)
        batch_size = len(prompts) if prompts is not None else prompt_embeds.shape[0]
        copies = num_images_per_prompt * rerank_candidates
        device = self._execution_device

        # 2. Encode the prompt (and its unconditional twin)
        if prompt_embeds is None:
            prompt_embeds, negative_prompt_embeds = self.encode_prompt(
                prompts, device, copies, self.do_classifier_free_guidance, negative_prompt
            )
        else:
            prompt_embeds, negative_prompt_embeds = (
                None if embeds is None else embeds.to(device, self.unet.dtype).repeat_interleave(copies, dim=0)
                for embeds in (prompt_embeds, negative_prompt_embeds)
            )

        # 3. Timesteps
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)

        # 4. Initial latents
        latents = self.prepare_latents(
            batch_size * copies,
            self.unet.config.in_channels,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            latents,
        )
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 5. Denoising loop
        latents = self.denoise(
            latents,
            timesteps,
            prompt_embeds,
            negative_prompt_embeds,
            extra_step_kwargs,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
        )

        # 6. Decode, check, rerank
        nsfw_content_detected, scores = None, None
        if output_type == "latent":
            images = latents
        else:
            images = self.decode_latents(latents)
            if safety_checker is not None:
                image_prompts = [text for text in prompts for _ in range(copies)] if prompts else [None] * len(images)
                images, nsfw_content_detected = self.blank_flagged_images(images, image_prompts, safety_checker)
            if rerank_candidates > 1:
                keep, scores = self.best_candidates(images, prompts, num_images_per_prompt, rerank_candidates, scorer)
                images = images[keep]
                if nsfw_content_detected is not None:
                    nsfw_content_detected = [nsfw_content_detected[row] for row in keep]

        # 7. Post-process
        if output_type == "np":
            images = self.image_processor.pt_to_numpy(images)
        elif output_type == "pil":
            images = self._to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, nsfw_content_detected
        return VisCPMPaintPipelineOutput(images=images, nsfw_content_detected=nsfw_content_detected, scores=scores)


__all__ = ["VisCPMPaintPipeline", "VisCPMPaintPipelineOutput", "clip_scorer", "paint_prompt"]
