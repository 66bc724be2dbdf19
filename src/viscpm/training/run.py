"""`viscpm train STAGE --config FILE`: one entry point for the three MpM stages, on transformers' `Trainer`.

The config is YAML (examples in `configs/`); `--set key.sub=value` overrides any entry. Its sections:

    model: DIR                 a from_pretrained folder: VisCPM-Chat (chat stages) or a VisCPM-Paint pipeline (paint)
    output_dir: DIR            checkpoints (checkpoint-N/), the final model, data_summary.json
    seed: 0
    data:                      sources and how records become samples (see viscpm.training.data)
      sources: [{path, kind, image_column, text_column, image_root, weight, name, caption_requests}, ...]
      max_length: 512          samples over it are skipped (and counted)
      min_image_size: 0        images whose shorter side is under it are skipped (the original fine-tuning used 128)
      conversation_rounds: all all rounds of a conversation (the original kept only the first: `first`)
      image_augmentation: null chat stages: each image, each time it is batched, mirrored left to right half the time
                               (`horizontal_flip`) or turned by one of the square's eight flips and quarter turns
                               (`dihedral`), for images whose text does not depend on their orientation. null: none
    tune_llm / tune_vision:    chat stages (defaults per stage below)
    tune_patch_embedding: false chat stages, without `lora`: train BEiT-3's patch embedding and class token too, which
                               the original keeps as pretrained; for a vision encoder that starts random
    llm_learning_rate: null    chat stages: the pivot's own learning rate (its LoRA adapters' under `lora`); the
                               vision side, queries and mapping keep training.learning_rate. null: the same for all
    caption_distillation: null chat-pretrain only, caption sources, pivot frozen: a weight (e.g. 1.0) for a second
                               loss, the pivot's states after the image made to match those after its caption written
                               in the image slot (viscpm.training.chat.caption_distillation_loss). null: captions only
    lora: {r, alpha, dropout, target_modules, modules_to_save, quantization: null | nf4 | int8}   chat-sft only
    paint: {resolution, caption_dropout, token_dropout,
            unfreeze: [{step, train: [bridge | unet_cross_attention | unet]}, ...]}
    training:                  keyword arguments of transformers.TrainingArguments, as they are: learning rate and
                               schedule, batch size, gradient_accumulation_steps, bf16 / fp16,
                               activation_checkpointing, save_steps, deepspeed (a ZeRO config file), fsdp, ...

Multi-GPU runs launch the same command under `accelerate launch` or `torchrun`; distribution, mixed precision,
DeepSpeed and FSDP are the Trainer's. `--resume` continues from the newest checkpoint in `output_dir`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import yaml

STAGES = ("chat-pretrain", "chat-sft", "paint")
STAGE_DEFAULTS = {
    "chat-pretrain": {"tune_llm": False, "tune_vision": False},
    "chat-sft": {"tune_llm": True, "tune_vision": True},
    "paint": {},
}
DEFAULTS = {
    "model": None,
    "output_dir": None,
    "seed": 0,
    "data": {
        "sources": [],
        "max_length": 512,
        "min_image_size": 0,
        "conversation_rounds": "all",
        "image_augmentation": None,
    },
    "tune_llm": None,
    "tune_vision": None,
    "tune_patch_embedding": False,
    "llm_learning_rate": None,
    "caption_distillation": None,
    "lora": None,
    "paint": {"resolution": 512, "caption_dropout": 0.1, "token_dropout": 0.0, "unfreeze": None},
    "training": {},
}
TRAINING_DEFAULTS = {
    "save_steps": 500,
    "logging_steps": 10,
    "report_to": "none",
    "remove_unused_columns": False,  # the collators read the image bytes, which no forward() names
    "dataloader_num_workers": 0,
}
FINAL_FOLDER = "final"
ADAPTER_FOLDER = "adapter"
logger = logging.getLogger("viscpm.train")


class ConfigError(ValueError):
    """A config entry that is missing, unknown or of the wrong kind."""


FREE_FORM = ("training", "lora")  # passed on as they are (TrainingArguments fields, LoRA settings)


def merge(base: dict, override: dict, path: str = "") -> dict:
    """`override` laid over `base`; keys `base` does not know are an error, except inside the free-form sections."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        where = f"{path}{key}"
        if key not in base:
            raise ConfigError(f"unknown config entry {where!r}; known here: {sorted(base)}")
        if where in FREE_FORM and isinstance(value, dict):
            merged[key] = {**(base[key] or {}), **copy.deepcopy(value)}
        elif isinstance(base[key], dict) and isinstance(value, dict):
            merged[key] = merge(base[key], value, f"{where}.")
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_override(text: str) -> dict:
    """`a.b=value` -> {"a": {"b": value}}, the value read as YAML (numbers, booleans, lists)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects KEY=VALUE (e.g. training.learning_rate=1e-4), got {text!r}")
    result: Any = yaml.safe_load(value) if value else None
    for part in reversed(key.split(".")):
        result = {part: result}
    return result


def load_config(stage: str, path: str | None, overrides: list[str] = ()) -> dict:
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; the stages are {', '.join(STAGES)}")
    config = merge(DEFAULTS, {})
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except OSError as error:
            raise ConfigError(f"cannot read the config {path}: {error.strerror}") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {error}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of config entries")
        config = merge(config, loaded)
    for override in overrides:
        config = merge(config, parse_override(override))
    for key, value in STAGE_DEFAULTS[stage].items():
        if config[key] is None:
            config[key] = value
    for key in ("model", "output_dir"):
        if not config[key]:
            raise ConfigError(f"the config needs `{key}` (in the YAML, or --set {key}=...)")
    if config["lora"] is not None and stage != "chat-sft":
        raise ConfigError("`lora` applies to chat-sft only (stage 1 and Paint train their own small modules fully)")
    check_llm_learning_rate(stage, config)
    check_image_augmentation(stage, config)
    check_tune_patch_embedding(stage, config)
    specs = source_specs(config)  # here, before a model loads: a wrong source costs no loading time
    check_caption_distillation(stage, config, specs)
    if stage == "paint" and any(spec.caption_requests for spec in specs):
        raise ConfigError("caption_requests: Paint's prompt is the caption alone, asked with no request; leave it out")
    if stage == "paint" and config["training"].get("deepspeed") and len(config["paint"]["unfreeze"] or [0, 0]) > 1:
        # DeepSpeed's optimizer steps every parameter it was given, gradient or not: Adam's step count (and any
        # weight decay) would move the parts a stage keeps frozen, and a part would start late with a wrong step
        raise ConfigError(
            "paint.unfreeze has several stages (the default has three), which DeepSpeed cannot stage: its optimizer "
            "steps every part from the first step. Under DeepSpeed run one stage per `viscpm train` (e.g. "
            "--set 'paint.unfreeze=[{step: 0, train: [bridge]}]', then the next stage with model=<that run>/final), "
            "or train without DeepSpeed (DDP stages them in one run)"
        )
    return config


def positive_number(config: dict, key: str, example: str) -> float | None:
    """`config[key]` as a positive float (YAML reads "2e-4", without a dot, as a string), or None if it is null."""
    value = config[key]
    if value is None:
        return None
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not number > 0 or math.isinf(number):
        raise ConfigError(f"{key} must be a positive number (e.g. {example}) or null, got {value!r}")
    config[key] = number
    return number


def check_llm_learning_rate(stage: str, config: dict) -> None:
    """`llm_learning_rate` as a float, where it can apply."""
    if positive_number(config, "llm_learning_rate", "2e-4") is None:
        return
    if stage == "paint":
        raise ConfigError("llm_learning_rate applies to the chat stages: Paint keeps its pivot frozen")
    if not config["tune_llm"] and config["lora"] is None:
        raise ConfigError(
            f"llm_learning_rate is set, but {stage} keeps the pivot frozen: set tune_llm: true, or leave it out"
        )


def check_image_augmentation(stage: str, config: dict) -> None:
    """`data.image_augmentation`: one of the chat stages' augmentations, or null."""
    from .data import IMAGE_AUGMENTATIONS

    augmentation = config["data"]["image_augmentation"]
    if augmentation is None:
        return
    if not isinstance(augmentation, str) or augmentation not in IMAGE_AUGMENTATIONS:  # a YAML list is unhashable
        raise ConfigError(
            f"data.image_augmentation must be one of {', '.join(IMAGE_AUGMENTATIONS)} or null, got {augmentation!r}"
        )
    if stage == "paint":
        raise ConfigError(
            "data.image_augmentation applies to the chat stages: Paint learns to draw its images as they are"
        )


def check_tune_patch_embedding(stage: str, config: dict) -> None:
    """`tune_patch_embedding`: a boolean, for a chat stage that trains the model's own parameters (not LoRA's)."""
    tune = config["tune_patch_embedding"]
    if not isinstance(tune, bool):
        raise ConfigError(f"tune_patch_embedding must be true or false, got {tune!r}")
    if tune and stage == "paint":
        raise ConfigError("tune_patch_embedding applies to the chat stages: Paint has no vision encoder")
    if tune and config["lora"] is not None:
        raise ConfigError(
            "tune_patch_embedding: under `lora` the base stays frozen; name the vision side in lora.modules_to_save "
            "(e.g. [vpm, mapping]) to train it whole, or leave tune_patch_embedding out"
        )


def check_caption_distillation(stage: str, config: dict, specs) -> None:
    """`caption_distillation` as a float weight, where it can apply: stage 1's captions, read by a frozen pivot."""
    if positive_number(config, "caption_distillation", "1.0") is None:
        return
    if stage != "chat-pretrain":
        raise ConfigError(
            "caption_distillation applies to chat-pretrain only: its targets are a caption written in the image slot"
        )
    if config["tune_llm"]:
        raise ConfigError(
            "caption_distillation needs the pivot frozen (its own reading of the caption is the target): leave "
            "tune_llm false, or caption_distillation out"
        )
    others = [spec.name for spec in specs if spec.kind != "caption"]
    if others:
        raise ConfigError(
            f"caption_distillation: the sources {others} are not captions, and only a caption can be written in the "
            "image slot as the target: give chat-pretrain caption sources only, or leave caption_distillation out"
        )


def training_arguments(config: dict):
    import torch
    from transformers import TrainingArguments

    # pinned memory helps only the copy to an accelerator; without one torch warns on every data loader
    pin_memory = torch.accelerator.current_accelerator() is not None
    arguments = {**TRAINING_DEFAULTS, "dataloader_pin_memory": pin_memory, **config["training"]}
    arguments.update(output_dir=config["output_dir"], seed=config["seed"])
    try:
        return TrainingArguments(**arguments)
    except TypeError as error:
        raise ConfigError(f"training: {error} (entries are transformers.TrainingArguments fields)") from None


def source_specs(config: dict):
    from .data import SourceSpec

    sources = config["data"]["sources"]
    if not isinstance(sources, list) or not sources:
        raise ConfigError(
            f"data.sources must be a non-empty list of sources, e.g. [{{path: captions.jsonl, kind: caption}}]; got "
            f"{sources!r}"
        )
    specs = []
    for index, source in enumerate(sources):
        if not isinstance(source, dict) or "path" not in source:
            raise ConfigError(f"data.sources[{index}] needs at least a `path`")
        try:
            specs.append(SourceSpec(**source))
        except (TypeError, ValueError, FileNotFoundError) as error:
            raise ConfigError(f"data.sources[{index}]: {error}") from None
    return specs


def build_chat(stage: str, config: dict, arguments):
    import torch
    from transformers import AutoModel, AutoProcessor

    from .chat import add_lora, bitsandbytes_config, set_chat_trainable, trainable_summary
    from .data import (
        IMAGE_AUGMENTATIONS,
        CaptionDistillationSamples,
        ChatPrompts,
        RandomlyTransposed,
        build_training_data,
        chat_collator,
        chat_samples,
    )

    lora = config["lora"]
    quantization = bitsandbytes_config(lora.get("quantization")) if lora else None
    processor = AutoProcessor.from_pretrained(config["model"])
    # fp32 master weights (the Trainer's bf16 / fp16 autocast does the mixed precision); a quantized base keeps
    # bitsandbytes' own storage
    model = AutoModel.from_pretrained(config["model"], dtype=torch.float32, quantization_config=quantization)
    if lora:  # peft freezes the whole base and trains the adapters (and `modules_to_save`)
        model = add_lora(
            model, lora, quantized=quantization is not None, gradient_checkpointing=arguments.activation_checkpointing
        )
    else:
        set_chat_trainable(
            model,
            tune_llm=config["tune_llm"],
            tune_vision=config["tune_vision"],
            tune_patch_embedding=config["tune_patch_embedding"],
        )
    logger.info("%s: %s", stage, trainable_summary(model))
    data = config["data"]
    samples = chat_samples(processor, data["max_length"])
    if config["caption_distillation"] is not None:
        samples = CaptionDistillationSamples(samples)
    dataset, report = build_training_data(
        source_specs(config),
        samples,
        lambda spec: ChatPrompts(spec.kind, processor, spec.caption_requests),
        min_image_size=data["min_image_size"],
        rounds=data["conversation_rounds"],
        seed=config["seed"],
    )

    def pixels(image):
        return processor.image_processor(image, return_tensors="pt")["pixel_values"][0]

    if data["image_augmentation"] is not None:
        pixels = RandomlyTransposed(pixels, IMAGE_AUGMENTATIONS[data["image_augmentation"]])
    collator = chat_collator(processor, data["max_length"], pixels, config["caption_distillation"] is not None)
    return model, processor, dataset, report, collator, []


def build_paint(config: dict):
    from diffusers import DDPMScheduler

    from ..modeling.pipeline_viscpm_paint import VisCPMPaintPipeline
    from .data import StructuredSamples, build_training_data, paint_prompts
    from .paint import DEFAULT_UNFREEZE, PaintCollator, StagedUnfreezing, VisCPMPaintTrainingModel

    pipeline = VisCPMPaintPipeline.from_pretrained(config["model"])
    if pipeline.vae is None:
        raise ConfigError(f"{config['model']} has no VAE: Paint training encodes images with it")
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    model = VisCPMPaintTrainingModel(pipeline.text_encoder, pipeline.unet, pipeline.vae, noise_scheduler)
    unfreezing = StagedUnfreezing(model, config["paint"]["unfreeze"] or DEFAULT_UNFREEZE)
    model.train_only([part for stage in unfreezing.stages for part in stage["train"]])  # the optimizer sees them all
    data = config["data"]
    dataset, report = build_training_data(
        source_specs(config),
        StructuredSamples(pipeline.tokenizer, data["max_length"]),
        lambda spec: paint_prompts,
        min_image_size=data["min_image_size"],
        seed=config["seed"],
    )
    paint = config["paint"]
    collator = PaintCollator(
        pipeline.tokenizer, data["max_length"], paint["resolution"], paint["caption_dropout"], paint["token_dropout"]
    )
    return model, pipeline, dataset, report, collator, [unfreezing]


def save_result(stage: str, config: dict, trainer, saver) -> Path:
    """The trained model as a `from_pretrained` folder (LoRA: the adapter alone), written to a temporary folder and
    moved into place when complete. Every process calls it: under ZeRO-3 and FSDP the weights are sharded, and
    gathering them takes them all; the first process writes."""
    from .paint import pipeline_with_weights

    output = Path(config["output_dir"])
    folder = output / (ADAPTER_FOLDER if config["lora"] else FINAL_FOLDER)
    staging = output / f".{folder.name}.partial"
    writer = trainer.is_world_process_zero()
    if writer:
        shutil.rmtree(staging, ignore_errors=True)
    if stage == "paint":
        if weights_are_sharded(trainer):  # the pipeline's own modules hold this process's shards only
            engine = trainer.deepspeed if trainer.is_deepspeed_enabled else trainer.model
            weights = trainer.accelerator.get_state_dict(engine)
            saver = pipeline_with_weights(saver, weights) if writer else None
        if writer:
            saver.save_pretrained(staging)  # the pipeline: its components are the trained modules
    else:
        trainer.save_model(str(staging))  # gathers sharded weights; a PEFT model writes its adapter alone
        if writer:
            saver.save_pretrained(staging)  # the processor
            (staging / "training_args.bin").unlink(missing_ok=True)  # the Trainer's pickle: not part of a model
    if writer:
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
    trainer.accelerator.wait_for_everyone()
    return folder


def engine_name(trainer) -> str:
    """What distributed the run: "DeepSpeed ZeRO-N", "FSDPN", "DDP" or "none" (one process)."""
    if trainer.is_deepspeed_enabled:
        return f"DeepSpeed ZeRO-{trainer.accelerator.deepspeed_config['zero_optimization'].get('stage', 0)}"
    if trainer.is_fsdp_enabled:
        return f"FSDP{trainer.accelerator.state.fsdp_plugin.fsdp_version}"
    return "DDP" if trainer.args.world_size > 1 else "none"


def weights_are_sharded(trainer) -> bool:
    if trainer.is_deepspeed_enabled:
        return trainer.accelerator.deepspeed_config["zero_optimization"].get("stage", 0) == 3
    return trainer.is_fsdp_enabled


def latest_complete_checkpoint(output: Path) -> Path | None:
    """The newest `checkpoint-N` whose `trainer_state.json` (the Trainer writes it last) exists: a run killed while
    writing a checkpoint resumes from the one before."""
    complete = [
        path
        for path in output.glob("checkpoint-*")
        if path.name.split("-")[-1].isdigit() and (path / "trainer_state.json").is_file()
    ]
    return max(complete, key=lambda path: int(path.name.split("-")[-1]), default=None)


def train(stage: str, config: dict, resume: bool = False):
    """Run one stage; returns the summary also written to `output_dir/run_summary.json`, and the data report."""
    from transformers import Trainer, TrainerCallback, set_seed

    class StepsRunHere(TrainerCallback):
        """Counts the optimizer steps this process ran, and the number of the first: the proof that a resumed run
        continued from its checkpoint rather than starting over (the loss curve cannot tell: CPU training is
        deterministic)."""

        def __init__(self):
            self.run, self.first = 0, None

        def on_step_end(self, args, state, control, **kwargs):
            self.run += 1
            self.first = state.global_step if self.first is None else self.first

    output = Path(config["output_dir"])
    checkpoint = latest_complete_checkpoint(output)
    if not resume and any(output.glob("checkpoint-*")):
        raise ConfigError(
            f"{output} already holds checkpoints: pass --resume to continue that run, or choose another output_dir"
        )
    if resume and checkpoint is None:
        raise ConfigError(f"--resume: {output} holds no complete checkpoint-N folder to continue from")
    arguments = training_arguments(config)
    llm_learning_rate = config["llm_learning_rate"]
    if llm_learning_rate is not None and arguments.deepspeed and "optimizer" in arguments.hf_deepspeed_config.config:
        raise ConfigError(
            "llm_learning_rate needs the Trainer's optimizer, and the DeepSpeed config brings its own: remove the "
            "`optimizer` section from the DeepSpeed config (the Trainer then builds it from `training:`)"
        )

    from .chat import caption_distillation_loss, give_the_pivot_its_learning_rate
    from .data import split_teacher

    distillation_weight = config["caption_distillation"]

    class VisCPMTrainer(Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.distillation_losses: list[float] = []  # caption distillation distances since the last log

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                super().create_optimizer(model)
                if llm_learning_rate is not None:
                    give_the_pivot_its_learning_rate(
                        self.optimizer, self.model if model is None else model, llm_learning_rate
                    )
            return self.optimizer

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """The caption loss, plus `caption_distillation` times `caption_distillation_loss` when it is set."""
            inputs, teacher = split_teacher(inputs)
            if not teacher:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss, outputs = super().compute_loss(
                model, {**inputs, "output_hidden_states": True}, True, num_items_in_batch
            )
            distance = caption_distillation_loss(model, inputs, outputs, teacher)
            self.distillation_losses.append(distance.item())
            caption_loss_is_scaled = self.loss_is_scaled_for_ga
            if caption_loss_is_scaled is None:  # as `Trainer.training_step` decides it
                caption_loss_is_scaled = (
                    self.model_accepts_loss_kwargs and num_items_in_batch is not None
                ) or self.compute_loss_func is not None
            if caption_loss_is_scaled:
                # the caption loss came normalised over the whole accumulated step; this one is per micro-batch
                distance = distance / self.current_gradient_accumulation_steps
            loss = loss + distillation_weight * distance
            return (loss, outputs) if return_outputs else loss

        def log(self, logs, *args, **kwargs):
            if self.distillation_losses and "loss" in logs:
                logs["caption_distillation"] = round(sum(self.distillation_losses) / len(self.distillation_losses), 6)
                self.distillation_losses = []
            super().log(logs, *args, **kwargs)

    set_seed(config["seed"])
    if stage == "paint":
        model, saver, dataset, report, collator, callbacks = build_paint(config)
    else:
        model, saver, dataset, report, collator, callbacks = build_chat(stage, config, arguments)
    writer = arguments.process_index == 0  # of a multi-process run, the first process writes the summaries
    if writer:
        output.mkdir(parents=True, exist_ok=True)
        (output / "data_summary.json").write_text(json.dumps(report.as_dict(), indent=2) + "\n", encoding="utf-8")
    logger.info("data:\n%s", report.summary())

    steps = StepsRunHere()
    callbacks = [*callbacks, steps]
    trainer = VisCPMTrainer(
        model=model, args=arguments, train_dataset=dataset, data_collator=collator, callbacks=callbacks
    )
    if arguments.fsdp and not trainer.is_fsdp_enabled:
        raise ConfigError(
            "training.fsdp is set, but accelerate did not enable FSDP: it does so for GPU (and other accelerator) "
            "processes only, and CPU processes would silently train with DDP. On CPU, leave training.fsdp out (DDP) "
            "or use a DeepSpeed config (training.deepspeed)"
        )
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if resume else None)
    folder = save_result(stage, config, trainer, saver)
    summary = {
        "stage": stage,
        "saved": str(folder),
        "processes": arguments.world_size,
        "engine": engine_name(trainer),
        "resumed_from": str(checkpoint) if resume else None,
        "global_step": trainer.state.global_step,
        "steps_run_here": steps.run,  # a resumed run: only those after its checkpoint
        "first_step_here": steps.first,
        "train_loss": result.training_loss,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "caption_distillation_losses": [
            entry["caption_distillation"] for entry in trainer.state.log_history if "caption_distillation" in entry
        ],
        "data": report.as_dict(),
    }
    if writer:
        (output / "run_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary, report
