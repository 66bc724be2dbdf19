"""VisCPM-Paint training: the noise-prediction loss on a pipeline's components, with staged unfreezing.

CPM-Bee stays frozen. The bridge and the UNet learn to predict the noise (or the velocity, as the scheduler's
`prediction_type` says) that was added to the VAE latents of an image, conditioned on its caption's CPM-Bee states.
Training is staged as the paper describes: the bridge first, then also the UNet's cross-attention, then the whole
UNet (`paint.unfreeze`: the step at which each stage starts and the parts it trains).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback

from ..modeling.modeling_cpmbee import CPMBEE_INPUT_NAMES
from ..modeling.structured_cpmbee import CpmBeeCollator
from ..modeling.tokenization_cpmbee import CpmBeeTokenizer

PAINT_PARTS = ("bridge", "unet_cross_attention", "unet")
DEFAULT_UNFREEZE = (
    {"step": 0, "train": ["bridge"]},
    {"step": 1000, "train": ["bridge", "unet_cross_attention"]},
    {"step": 5000, "train": ["bridge", "unet"]},
)


@functools.cache
def _vae_image_processor():
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(do_resize=True, do_normalize=True)


def this_process_rows(draw: Callable[[int], torch.Tensor], rows: int) -> torch.Tensor:
    """`draw(n)`'s random values for the whole global batch, then this process's `rows` of them.

    Every process draws as many values as one process would for the whole batch, from torch's generator (which every
    process seeds alike): the generators stay in step, and the run's noise, timesteps and caption dropout do not
    depend on how many processes share the batch (a data-parallel run follows the single-process one, and resumes
    on another number of processes). Each process holds consecutive rows: accelerate shards batch by batch."""
    import torch.distributed as dist

    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    return draw(world * rows)[rank * rows : (rank + 1) * rows]


def vae_pixels(images: Sequence, resolution: int) -> torch.Tensor:
    """PIL images -> `(n, 3, resolution, resolution)` in [-1, 1], resized and centre-cropped: what the VAE encodes
    in Paint training."""
    return _vae_image_processor().preprocess(images, height=resolution, width=resolution, resize_mode="crop")


class VisCPMPaintTrainingModel(nn.Module):
    """The pipeline's text encoder (CPM-Bee + bridge), UNet and VAE, with a training scheduler; returns the loss.

    The VAE and CPM-Bee are frozen and run without gradients; noise and timesteps come from torch's global generator,
    which `Trainer` seeds and restores on `--resume`, drawn for the global batch (`this_process_rows`).
    """

    # the loss is a mean over each sample's latent, not over labelled tokens: the Trainer scales it for gradient
    # accumulation itself rather than pass a token count
    accepts_loss_kwargs = False

    def __init__(self, text_encoder: nn.Module, unet: nn.Module, vae: nn.Module, noise_scheduler):
        super().__init__()
        self.text_encoder = text_encoder
        self.unet = unet
        self.vae = vae
        self.noise_scheduler = noise_scheduler
        self.text_encoder.llm.requires_grad_(False)
        self.vae.requires_grad_(False)

    def activation_checkpointing_enable(self, **trainer_kwargs) -> None:
        """What `TrainingArguments(activation_checkpointing=True)` calls: the UNet recomputes its activations in the
        backward pass (CPM-Bee and the VAE run without gradients and keep none). The Trainer's options (checkpoint
        every n layers, reentrant or not) are transformers' own; diffusers' UNet has a single setting."""
        self.unet.enable_gradient_checkpointing()

    def parts(self) -> dict[str, list[nn.Parameter]]:
        cross_attention = [p for name, p in self.unet.named_parameters() if ".attn2." in name]
        return {
            "bridge": list(self.text_encoder.trans_block.parameters()),
            "unet_cross_attention": cross_attention,
            "unet": list(self.unet.parameters()),
        }

    def train_only(self, parts: Sequence[str]) -> None:
        unknown = sorted(set(parts) - set(PAINT_PARTS))
        if unknown:
            raise ValueError(f"paint.unfreeze names {unknown}; the parts are {list(PAINT_PARTS)}")
        groups = self.parts()
        for group in groups.values():
            for parameter in group:
                parameter.requires_grad_(False)
        for part in parts:
            for parameter in groups[part]:
                parameter.requires_grad_(True)

    def forward(self, pixel_values: torch.Tensor, text_keep: torch.Tensor | None = None, **cpmbee_inputs) -> dict:
        with torch.no_grad():
            posterior = self.vae.encode(pixel_values.to(self.vae.dtype)).latent_dist
            shape = posterior.mean.shape
            sample = this_process_rows(lambda n: torch.randn((n, *shape[1:]), dtype=posterior.mean.dtype), shape[0])
            latents = posterior.mean + posterior.std * sample.to(posterior.mean.device)  # the posterior's sample()
            latents = latents * self.vae.config.scaling_factor
            text_hidden_states = self.text_encoder.llm(
                **{name: cpmbee_inputs[name] for name in CPMBEE_INPUT_NAMES if cpmbee_inputs.get(name) is not None},
                use_cache=False,
            ).last_hidden_state
        encoder_hidden_states = self.text_encoder.trans_block(text_hidden_states).to(self.unet.dtype)
        rows = latents.shape[0]
        noise = this_process_rows(lambda n: torch.randn((n, *latents.shape[1:]), dtype=latents.dtype), rows)
        noise = noise.to(latents.device)
        timesteps = this_process_rows(
            lambda n: torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (n,)), rows
        ).to(latents.device)
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        prediction = self.unet(
            noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=text_keep
        ).sample
        return {"loss": F.mse_loss(prediction.float(), target.float())}


class StagedUnfreezing(TrainerCallback):
    """Before every optimizer step, train the parts of the stage that step belongs to (`paint.unfreeze`).

    The optimizer holds every part from the start (frozen parameters get no gradient, so the optimizer leaves them
    as they are), hence a stage change needs no new optimizer, and a resumed run picks the stage of its step.
    """

    def __init__(self, model: VisCPMPaintTrainingModel, stages: Sequence[Mapping]):
        if not stages or stages[0].get("step", 0) != 0:
            raise ValueError("paint.unfreeze must start with a stage at step 0")
        steps = [stage["step"] for stage in stages]
        if steps != sorted(steps):
            raise ValueError(f"paint.unfreeze steps must increase, got {steps}")
        self.model = model
        self.stages = [dict(stage) for stage in stages]
        self.current = None
        for stage in self.stages:
            model.train_only(stage["train"])  # validates the names now, not mid-run

    def stage_at(self, step: int) -> Mapping:
        return [stage for stage in self.stages if stage["step"] <= step][-1]

    def on_step_begin(self, args, state, control, **kwargs):
        stage = self.stage_at(state.global_step)
        if stage is not self.current:
            self.model.train_only(stage["train"])
            self.current = stage


def pipeline_with_weights(pipeline, state_dict: Mapping[str, torch.Tensor]):
    """`pipeline` with its text encoder, UNet and VAE rebuilt from the training model's full `state_dict` (keys
    `text_encoder.*`, `unet.*`, `vae.*`), for saving: under ZeRO-3 or FSDP the pipeline's own modules hold shards.
    The modules are built on the meta device and take the gathered tensors as they are (no second copy)."""
    from transformers import PreTrainedModel

    components = dict(pipeline.components)
    for name in ("text_encoder", "unet", "vae"):
        module, prefix = components[name], f"{name}."
        weights = {key.removeprefix(prefix): value for key, value in state_dict.items() if key.startswith(prefix)}
        with torch.device("meta"):
            if isinstance(module, PreTrainedModel):
                rebuilt = type(module)(module.config)
            else:
                rebuilt = type(module).from_config(module.config)
        rebuilt.load_state_dict(weights, assign=True)
        components[name] = rebuilt
    return type(pipeline)(**components)


@dataclass
class PaintCollator:
    """Prepared caption samples -> pixels in [-1, 1] at `resolution` and the CPM-Bee batch of their prompts; with
    probability `caption_dropout` a caption is replaced by the empty one, so that the model also learns the
    unconditional prediction classifier-free guidance needs.

    `token_dropout`: the probability that the UNet may not read a prompt token's text state (`text_keep`, its
    cross-attention mask; padding stays readable, as at inference). The pivot spreads a prompt's meaning over all of
    its positions; a UNet that cannot count on the English colour word's own state learns to read the scene from the
    others, which is where it is shared with other languages (docs/paint-mini.md)."""

    tokenizer: CpmBeeTokenizer
    max_length: int
    resolution: int
    caption_dropout: float = 0.1
    token_dropout: float = 0.0

    def __post_init__(self):
        from ..modeling.pipeline_viscpm_paint import paint_prompt
        from .data import training_sample

        self.empty_caption = training_sample(self.tokenizer, paint_prompt(""), self.max_length)

    def __call__(self, rows: Sequence[Mapping]) -> dict:
        from .data import open_image

        dropped = this_process_rows(torch.rand, len(rows)) < self.caption_dropout
        samples = [self.empty_caption if drop else row for row, drop in zip(rows, dropped.tolist())]
        batch = CpmBeeCollator(self.tokenizer, self.max_length)(samples)
        images = [open_image(row["image"]) for row in rows]
        batch["pixel_values"] = vae_pixels(images, self.resolution)
        if self.token_dropout:
            batch["text_keep"] = self.text_keep(batch["attention_mask"])
        return {key: batch[key] for key in (*CPMBEE_INPUT_NAMES, "pixel_values", "text_keep") if key in batch}

    def text_keep(self, tokens: torch.Tensor) -> torch.Tensor:
        """1 where the UNet reads a position: padding always, each prompt token with probability 1 - token_dropout,
        and at least a prompt's first token. Drawn for the global batch at full width, so that every process takes
        the draws one process would."""
        draws = this_process_rows(lambda n: torch.rand((n, self.max_length)), tokens.shape[0])[:, : tokens.shape[1]]
        dropped = (draws < self.token_dropout) & tokens.bool()
        dropped[:, 0] &= (tokens.bool() & ~dropped).any(dim=1)  # a prompt with every token dropped keeps its first
        return (~dropped).long()
