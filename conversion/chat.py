"""Original VisCPM-Chat checkpoint -> a folder that `AutoModel` / `AutoProcessor` load (after ``import viscpm``).

The original `VLU_CPMBee` holds ``query``, ``mapping.*``, ``vpm.*`` (BEiT-3) and ``llm.*`` (CPM-Bee); our
`VisCPMChatForConditionalGeneration` keeps those names, with CPM-Bee one level down (``llm.model.*``, next to its
tied LM head) and BEiT-3 as `Beit3VisionModel` (`conversion.beit3`).

Dimensions come from the tensors' shapes. What the state dict cannot show (BEiT-3's head count, the split of
CPM-Bee's bias table between position and segment buckets) defaults to the released VisCPM-Chat and can be given
with an original-format config (``../shared/golden/chat/config.json`` is one).
"""

import json
import math
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from ..modeling.configuration_beit3 import Beit3VisionConfig
from ..modeling.configuration_viscpm_chat import VisCPMChatConfig
from ..modeling.image_processing_viscpm_chat import VisCPMChatImageProcessor
from ..modeling.modeling_viscpm_chat import VisCPMChatForConditionalGeneration
from ..modeling.processing_viscpm_chat import VisCPMChatProcessor
from ..modeling.tokenization_cpmbee import CpmBeeTokenizer
from .beit3 import BEIT3_PREFIX, beit3_key
from .checkpoint import (
    CPMBEE_PREFIX,
    CheckpointError,
    cpmbee_config_from_original,
    cpmbee_key,
    map_state_dict,
    read_original_checkpoint,
)

# BEiT-3's position tables start counting at 2 (fairseq's padding offset), and the image table has one row for [cls]
BEIT3_POSITION_OFFSET = 2


def chat_key(original_key: str) -> str | None:
    """Original VisCPM-Chat key -> `VisCPMChatForConditionalGeneration` key (None: unused by the model)."""
    if original_key.startswith(CPMBEE_PREFIX):
        return "llm.model." + cpmbee_key(original_key)
    if original_key.startswith("vpm."):
        key = beit3_key(original_key)
        return None if key is None else "vpm." + key
    return original_key  # `query`, `mapping.*`: same names


def _layer_count(state_dict: Mapping, pattern: str) -> int:
    indices = {int(match.group(1)) for key in state_dict if (match := re.match(pattern, key))}
    return max(indices) + 1 if indices else 0


def _require(state_dict: Mapping, key: str) -> torch.Tensor:
    if key not in state_dict:
        raise CheckpointError(
            f"the checkpoint has no `{key}`: is it a VisCPM-Chat checkpoint? "
            "(use `viscpm convert paint` for VisCPM-Paint)"
        )
    return state_dict[key]


def chat_config_from_checkpoint(
    state_dict: Mapping[str, torch.Tensor], original: Mapping | None = None
) -> VisCPMChatConfig:
    """The model config: shapes from the state dict, the rest from ``original`` (golden `config.json` format)."""
    original = original or {}
    embedding = _require(state_dict, "llm.input_embedding.weight")
    bias_table = _require(state_dict, "llm.position_bias.relative_attention_bias")
    num_layers = _layer_count(state_dict, r"llm\.encoder\.layers\.(\d+)\.")
    attention_layer = next(
        i for i in range(num_layers) if f"llm.encoder.layers.{i}.self_att.self_attention.project_q.weight" in state_dict
    )
    ffn_layer = next(i for i in range(num_layers) if f"llm.encoder.layers.{i}.ffn.ffn.w_out.weight" in state_dict)
    num_heads = bias_table.shape[1]
    text = {
        **original.get("cpmbee", {}),
        "vocab_size": embedding.shape[0],
        "dim_model": embedding.shape[1],
        "num_layers": num_layers,
        "num_heads": num_heads,
        "dim_head": state_dict[f"llm.encoder.layers.{attention_layer}.self_att.self_attention.project_q.weight"].shape[
            0
        ]
        // num_heads,
        "dim_ff": state_dict[f"llm.encoder.layers.{ffn_layer}.ffn.ffn.w_out.weight"].shape[1],
    }
    mask_modules = [
        [
            f"llm.encoder.layers.{i}.self_att.self_attention.project_q.weight" not in state_dict,
            f"llm.encoder.layers.{i}.ffn.ffn.w_out.weight" not in state_dict,
        ]
        for i in range(num_layers)
    ]
    if any(any(pair) for pair in mask_modules):
        text["mask_modules"] = mask_modules
    text_config = cpmbee_config_from_original(text)
    if text_config.position_bias_num_buckets + text_config.position_bias_num_segment_buckets != bias_table.shape[0]:
        raise CheckpointError(
            f"the position bias table has {bias_table.shape[0]} rows, not position_bias_num_buckets + "
            f"position_bias_num_segment_buckets = {text_config.position_bias_num_buckets} + "
            f"{text_config.position_bias_num_segment_buckets}: give the right split with --config"
        )

    patch_embedding = _require(state_dict, f"{BEIT3_PREFIX}vision_embed.proj.weight")
    hidden_size, num_channels, patch_size, _ = patch_embedding.shape
    image_positions = _require(state_dict, f"{BEIT3_PREFIX}encoder.embed_positions.A.weight").shape[0]
    patches_per_side = math.isqrt(image_positions - BEIT3_POSITION_OFFSET - 1)
    image_size = patches_per_side * patch_size
    encoder_config = original.get("beit3", {}).get("encoder_config")
    # what the shapes cannot tell (head count, epsilon) comes from the original config, else the release's
    base = Beit3VisionConfig.from_original(encoder_config) if encoder_config is not None else Beit3VisionConfig()
    vision_config = Beit3VisionConfig(
        num_attention_heads=base.num_attention_heads,
        layer_norm_eps=base.layer_norm_eps,
        hidden_size=hidden_size,
        num_channels=num_channels,
        patch_size=patch_size,
        image_size=image_size,
        num_hidden_layers=_layer_count(state_dict, re.escape(BEIT3_PREFIX) + r"encoder\.layers\.(\d+)\."),
        intermediate_size=_require(state_dict, f"{BEIT3_PREFIX}encoder.layers.0.ffn.A.fc1.weight").shape[0],
        max_source_positions=_require(state_dict, f"{BEIT3_PREFIX}encoder.embed_positions.B.weight").shape[0],
    )
    if "image_size" in original and original["image_size"] != image_size:
        raise CheckpointError(
            f"the config says image_size={original['image_size']} but the checkpoint's position table fits {image_size}"
        )
    return VisCPMChatConfig(
        vision_config=vision_config,
        text_config=text_config,
        query_num=_require(state_dict, "query").shape[0],
    )


def load_original_chat(
    model: VisCPMChatForConditionalGeneration, state_dict: Mapping[str, torch.Tensor], assign: bool = False
) -> None:
    """Load an original VisCPM-Chat state dict; ``assign=True`` for a model built on the meta device."""
    targets = {key: value for key, value in model.state_dict().items() if key not in model._tied_weights_keys}
    mapped = map_state_dict(
        targets, state_dict, chat_key, hint="is this a VisCPM-Chat checkpoint of the configured dimensions?"
    )
    if assign:
        model.load_state_dict(mapped, strict=False, assign=True)
        model.tie_weights()
    else:
        with torch.no_grad():
            for key, tensor in mapped.items():
                targets[key].copy_(tensor)


def convert_chat(
    checkpoint: str | Path,
    vocab: str | Path,
    output: str | Path,
    config: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a converted VisCPM-Chat folder (model, tokenizer, image processor, processor) to ``output``.

    The folder appears only when complete: it is written next to ``output`` and renamed into place.
    """
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists: choose another --output or pass --overwrite")
    original_config = json.loads(Path(config).read_text(encoding="utf-8")) if config is not None else {}
    state_dict = read_original_checkpoint(checkpoint)
    model_config = chat_config_from_checkpoint(state_dict, original_config)
    with torch.device("meta"):
        model = VisCPMChatForConditionalGeneration(model_config)
    load_original_chat(model, state_dict, assign=True)

    tokenizer = CpmBeeTokenizer(vocab_file=str(vocab))
    if tokenizer.vocab_size != model_config.text_config.vocab_size:
        raise CheckpointError(
            f"{vocab} has {tokenizer.vocab_size} tokens but the checkpoint's embedding has "
            f"{model_config.text_config.vocab_size} rows: pass the vocabulary the model was trained with"
        )
    image_size = model_config.vision_config.image_size
    image_processor = VisCPMChatImageProcessor(
        size={"height": image_size, "width": image_size},
        image_mean=original_config.get("image_mean", VisCPMChatImageProcessor.image_mean),
        image_std=original_config.get("image_std", VisCPMChatImageProcessor.image_std),
    )
    processor = VisCPMChatProcessor(
        image_processor, tokenizer, query_num=model_config.query_num, max_prompt_length=model_config.max_prompt_length
    )

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output
