"""Original VisCPM-Paint checkpoint -> a folder that `VisCPMPaintPipeline.from_pretrained` loads (after ``import
viscpm``), and that `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` loads without viscpm.

The original checkpoint is one flat state dict: ``llm.*`` (CPM-Bee), ``trans_block.*`` (the bridge) and ``unet.*``
(a diffusers `UNet2DConditionModel`); `VisCPMPaint.load_model` splits it by prefix. `VisCPMPaintModel` keeps those
names, so the key map is the identity (`paint_key`); the pipeline folder splits the same way: ``llm.*`` and
``trans_block.*`` in ``text_encoder/`` (unchanged), ``unet.*`` in ``unet/`` (prefix dropped). The VAE is not in the
checkpoint (the original loads Stable Diffusion 2.1 base's): it comes from a diffusers `AutoencoderKL` folder.

Dimensions come from the tensors' shapes. What they cannot show (the UNet's head counts and sample size, the split of
CPM-Bee's bias table, the scheduler) defaults to the released model's (Stable Diffusion 2.1 base) and can be given
with an original-format config (``../shared/golden/paint/config.json`` is one).
"""

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from ..modeling.configuration_viscpm_paint import SD21_BASE_UNET_CONFIG, VisCPMPaintConfig
from ..modeling.modeling_viscpm_paint import VisCPMPaintModel, VisCPMPaintTextEncoder
from ..modeling.pipeline_viscpm_paint import VisCPMPaintPipeline
from ..modeling.tokenization_cpmbee import CpmBeeTokenizer
from .checkpoint import (
    CheckpointError,
    layer_indices,
    map_state_dict,
    open_original_checkpoint,
    require_tensor,
)
from .cpmbee import cpmbee_config_from_state_dict
from .export import (
    PAINT_CARD,
    check_output,
    parse_dtype,
    render_model_card,
    staged_output,
    to_original,
    verify_weights,
    write_original_extras,
)

UNET_PREFIX = "unet."
BRIDGE_WEIGHT = "trans_block.w_out_res.weight"

# Stable Diffusion 2.1 base's noise schedule (`scheduler/scheduler_config.json`), read by the original into a
# `DDPMScheduler`; the other DDPM settings keep diffusers' defaults (fixed_small variance, leading spacing).
SD21_BASE_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "prediction_type": "epsilon",
    "steps_offset": 1,
}


def paint_key(original_key: str) -> str:
    """Original VisCPM-Paint key -> `VisCPMPaintModel` key: the same (``llm.*``, ``trans_block.*``, ``unet.*``)."""
    return original_key


def unet_config_from_state_dict(state_dict: Mapping[str, torch.Tensor], base: Mapping) -> dict:
    """The UNet's config: channels, blocks and cross-attention width from the ``unet.*`` (and bridge) shapes, the rest
    (head counts, sample size, norms) from ``base``."""
    config = {key: value for key, value in base.items() if not key.startswith("_")}
    down_blocks = layer_indices(state_dict, r"unet\.down_blocks\.(\d+)\.")
    up_blocks = layer_indices(state_dict, r"unet\.up_blocks\.(\d+)\.")

    def has_attention(kind, index):
        return any(key.startswith(f"unet.{kind}_blocks.{index}.attentions.") for key in state_dict)

    proj_in = next((tensor for key, tensor in state_dict.items() if key.endswith(".proj_in.weight")), None)
    config.update(
        in_channels=require_tensor(state_dict, "unet.conv_in.weight").shape[1],
        out_channels=require_tensor(state_dict, "unet.conv_out.weight").shape[0],
        block_out_channels=[
            require_tensor(state_dict, f"unet.down_blocks.{i}.resnets.0.conv2.weight").shape[0] for i in down_blocks
        ],
        layers_per_block=len(layer_indices(state_dict, r"unet\.down_blocks\.0\.resnets\.(\d+)\.")),
        down_block_types=["CrossAttnDownBlock2D" if has_attention("down", i) else "DownBlock2D" for i in down_blocks],
        up_block_types=["CrossAttnUpBlock2D" if has_attention("up", i) else "UpBlock2D" for i in up_blocks],
        # the bridge's output is the UNet's cross-attention context
        cross_attention_dim=require_tensor(state_dict, BRIDGE_WEIGHT).shape[0],
    )
    if proj_in is not None:
        config["use_linear_projection"] = proj_in.ndim == 2
    head_dims = config.get("attention_head_dim")
    if isinstance(head_dims, list) and len(head_dims) != len(down_blocks):
        raise CheckpointError(
            f"the UNet has {len(down_blocks)} down blocks but attention_head_dim lists {len(head_dims)} values "
            f"({head_dims}): give the UNet's config (`unet` section) with --config"
        )
    return config


def paint_config_from_checkpoint(
    state_dict: Mapping[str, torch.Tensor], original: Mapping | None = None
) -> VisCPMPaintConfig:
    """The model config: shapes from the state dict, the rest from ``original`` (golden `config.json` format)."""
    original = original or {}
    text_config = cpmbee_config_from_state_dict(state_dict, original.get("cpmbee"))
    bridge_input = require_tensor(state_dict, BRIDGE_WEIGHT).shape[1]
    if bridge_input != text_config.dim_model:
        raise CheckpointError(
            f"the bridge ({BRIDGE_WEIGHT}) reads {bridge_input} features but CPM-Bee's width is {text_config.dim_model}"
        )
    return VisCPMPaintConfig(
        text_config=text_config,
        unet_config=unet_config_from_state_dict(state_dict, original.get("unet", SD21_BASE_UNET_CONFIG)),
        bridge_eps=original.get("trans_block", {}).get("eps", 1e-6),
    )


def load_vae(vae_dir: str | Path) -> AutoencoderKL:
    vae_dir = Path(vae_dir)
    if not (vae_dir / "config.json").is_file():
        raise CheckpointError(
            f"--vae {vae_dir}: not a diffusers AutoencoderKL folder (config.json and weights), such as the `vae/` "
            "folder of stabilityai/stable-diffusion-2-1-base, the VAE VisCPM-Paint was trained with"
        )
    try:
        return AutoencoderKL.from_pretrained(vae_dir)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"--vae {vae_dir}: cannot load the AutoencoderKL ({error})") from error


def build_paint_pipeline(
    state_dict: Mapping[str, torch.Tensor],
    tokenizer: CpmBeeTokenizer,
    vae: AutoencoderKL,
    original: Mapping | None = None,
    dtype: torch.dtype | None = None,
) -> VisCPMPaintPipeline:
    """The pipeline holding the checkpoint's tensors (cast to ``dtype``; views of the checkpoint where no cast is
    needed): the text encoder gets ``llm.*`` / ``trans_block.*``, the UNet ``unet.*``."""
    original = original or {}
    config = paint_config_from_checkpoint(state_dict, original)
    if tokenizer.vocab_size != config.text_config.vocab_size:
        raise CheckpointError(
            f"the vocabulary has {tokenizer.vocab_size} tokens but the checkpoint's embedding has "
            f"{config.text_config.vocab_size} rows: pass the vocabulary the model was trained with"
        )
    if vae.config.latent_channels != config.unet_config["in_channels"]:
        raise CheckpointError(
            f"the VAE's latents have {vae.config.latent_channels} channels but the UNet takes "
            f"{config.unet_config['in_channels']}: pass the VAE VisCPM-Paint was trained with"
        )
    with torch.device("meta"):
        targets = VisCPMPaintModel(config).state_dict()
    weights = map_state_dict(
        targets, state_dict, paint_key, hint="is this a VisCPM-Paint checkpoint of the configured dimensions?"
    )
    if dtype is not None:
        weights = {key: tensor.to(dtype) for key, tensor in weights.items()}
        config.dtype = dtype
    with torch.device("meta"):
        text_encoder = VisCPMPaintTextEncoder(config)
        unet = UNet2DConditionModel.from_config(config.unet_config)
    text_encoder.load_state_dict({k: v for k, v in weights.items() if not k.startswith(UNET_PREFIX)}, assign=True)
    unet.load_state_dict(
        {k.removeprefix(UNET_PREFIX): v for k, v in weights.items() if k.startswith(UNET_PREFIX)}, assign=True
    )
    scheduler = DDPMScheduler(**{**SD21_BASE_SCHEDULER_CONFIG, **original.get("scheduler", {})})
    return VisCPMPaintPipeline(
        text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(), scheduler=scheduler, vae=vae
    )


def write_paint_folder(staging: Path, pipeline: VisCPMPaintPipeline, max_shard_size: str | int, model_name: str):
    """Everything the folder holds: the pipeline's components (`save_pretrained` also ships the model code) and the
    model card."""
    pipeline.save_pretrained(staging, max_shard_size=max_shard_size)
    (staging / "README.md").write_text(render_model_card(PAINT_CARD, model_name), encoding="utf-8")


def convert_paint(
    checkpoint: str | Path,
    vocab: str | Path,
    vae_dir: str | Path,
    output: str | Path,
    config: str | Path | None = None,
    overwrite: bool = False,
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    model_name: str = "VisCPM-Paint",
    verify: bool = True,
) -> Path:
    """Write a VisCPM-Paint pipeline folder to ``output``: ``model_index.json``, ``text_encoder/``, ``tokenizer/``,
    ``unet/``, ``vae/``, ``scheduler/``, the pipeline code and a model card. The folder appears only when complete.

    ``dtype`` is `fp16`, `bf16` or `fp32` for the text encoder and UNet (default: the checkpoint's); the VAE is written
    as ``vae_dir`` holds it. With ``verify`` the written weights are reloaded and compared with the checkpoint.
    """
    inputs = {"--checkpoint": checkpoint, "--vocab": vocab, "--vae": vae_dir, "--config": config}
    check_output(output, inputs, overwrite)
    original = json.loads(Path(config).read_text(encoding="utf-8")) if config is not None else {}
    state_dict, _ = open_original_checkpoint(checkpoint)
    weight_dtype = parse_dtype(dtype, state_dict)
    tokenizer = CpmBeeTokenizer(vocab_file=str(vocab))
    pipeline = build_paint_pipeline(state_dict, tokenizer, load_vae(vae_dir), original, weight_dtype)
    with staged_output(output, overwrite) as staging:
        write_paint_folder(staging, pipeline, max_shard_size, model_name)
        source_dtypes = {key: str(tensor.dtype).removeprefix("torch.") for key, tensor in state_dict.items()}
        write_original_extras(staging, {}, source_dtypes, release=False)
        if verify:
            text_weights = {key: tensor for key, tensor in state_dict.items() if not key.startswith(UNET_PREFIX)}
            unet_weights = {
                key.removeprefix(UNET_PREFIX): tensor
                for key, tensor in state_dict.items()
                if key.startswith(UNET_PREFIX)
            }
            verify_weights(staging / "text_encoder", text_weights, weight_dtype, release=False)
            verify_weights(staging / "unet", unet_weights, weight_dtype, release=False, stem="diffusion_pytorch_model")
    return Path(output)


def paint_to_original(folder: str | Path, output: str | Path) -> Path:
    """A converted VisCPM-Paint folder back as the original flat checkpoint (``llm.*``, ``unet.*``,
    ``trans_block.*``), bit-exact."""
    return to_original(
        folder,
        output,
        [("text_encoder", "model", paint_key), ("unet", "diffusion_pytorch_model", lambda key: UNET_PREFIX + key)],
    )


__all__ = [
    "build_paint_pipeline",
    "convert_paint",
    "paint_config_from_checkpoint",
    "paint_key",
    "unet_config_from_state_dict",
    "write_paint_folder",
]
