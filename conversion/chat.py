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
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers.dynamic_module_utils import custom_object_save

from ..modeling.configuration_beit3 import Beit3VisionConfig
from ..modeling.configuration_viscpm_chat import VisCPMChatConfig
from ..modeling.image_processing_viscpm_chat import VisCPMChatImageProcessor
from ..modeling.modeling_viscpm_chat import VisCPMChatForConditionalGeneration
from ..modeling.processing_viscpm_chat import VisCPMChatProcessor
from ..modeling.tokenization_cpmbee import CpmBeeTokenizer
from .beit3 import BEIT3_PREFIX, beit3_config_from_original, beit3_key, original_beit3_key
from .checkpoint import (
    CheckpointError,
    layer_indices,
    map_state_dict,
    open_original_checkpoint,
    require_tensor,
)
from .cpmbee import CPMBEE_PREFIX, cpmbee_config_from_state_dict, cpmbee_key
from .export import (
    CHAT_CARD,
    check_output,
    parse_dtype,
    render_model_card,
    staged_output,
    to_original,
    verify_weights,
    write_original_extras,
    write_weights,
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


def original_chat_key(key: str) -> str:
    """`VisCPMChatForConditionalGeneration` key -> original key (the inverse of `chat_key`)."""
    if key.startswith("llm.model."):
        return CPMBEE_PREFIX + key.removeprefix("llm.model.")
    if key.startswith("vpm."):
        return original_beit3_key(key.removeprefix("vpm."))
    return key


def chat_config_from_checkpoint(
    state_dict: Mapping[str, torch.Tensor], original: Mapping | None = None
) -> VisCPMChatConfig:
    """The model config: shapes from the state dict, the rest from ``original`` (golden `config.json` format)."""
    original = original or {}
    text_config = cpmbee_config_from_state_dict(state_dict, original.get("cpmbee"))

    patch_embedding = require_tensor(state_dict, f"{BEIT3_PREFIX}vision_embed.proj.weight")
    hidden_size, num_channels, patch_size, _ = patch_embedding.shape
    image_positions = require_tensor(state_dict, f"{BEIT3_PREFIX}encoder.embed_positions.A.weight").shape[0]
    patches_per_side = math.isqrt(image_positions - BEIT3_POSITION_OFFSET - 1)
    image_size = patches_per_side * patch_size
    encoder_config = original.get("beit3", {}).get("encoder_config")
    # what the shapes cannot tell (head count, epsilon) comes from the original config, else the release's
    base = beit3_config_from_original(encoder_config) if encoder_config is not None else Beit3VisionConfig()
    vision_config = Beit3VisionConfig(
        num_attention_heads=base.num_attention_heads,
        layer_norm_eps=base.layer_norm_eps,
        hidden_size=hidden_size,
        num_channels=num_channels,
        patch_size=patch_size,
        image_size=image_size,
        num_hidden_layers=len(layer_indices(state_dict, re.escape(BEIT3_PREFIX) + r"encoder\.layers\.(\d+)\.")),
        intermediate_size=require_tensor(state_dict, f"{BEIT3_PREFIX}encoder.layers.0.ffn.A.fc1.weight").shape[0],
        max_source_positions=require_tensor(state_dict, f"{BEIT3_PREFIX}encoder.embed_positions.B.weight").shape[0],
    )
    if "image_size" in original and original["image_size"] != image_size:
        raise CheckpointError(
            f"the config says image_size={original['image_size']} but the checkpoint's position table fits {image_size}"
        )
    return VisCPMChatConfig(
        vision_config=vision_config,
        text_config=text_config,
        query_num=require_tensor(state_dict, "query").shape[0],
    )


def convert_chat(
    checkpoint: str | Path,
    vocab: str | Path,
    output: str | Path,
    config: str | Path | None = None,
    overwrite: bool = False,
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    verify: bool = True,
    model_name: str = "VisCPM-Chat",
) -> Path:
    """Write a Hub-ready VisCPM-Chat folder to ``output`` (see `conversion.export` for what it holds).

    ``dtype`` is `fp16`, `bf16` or `fp32` (default: the checkpoint's). With ``verify`` the written weights are
    reloaded and compared with the checkpoint. The folder appears only when complete.
    """
    check_output(output, {"--checkpoint": checkpoint, "--vocab": vocab, "--config": config}, overwrite)
    original_config = json.loads(Path(config).read_text(encoding="utf-8")) if config is not None else {}
    state_dict, memory_mapped = open_original_checkpoint(checkpoint)
    model_config = chat_config_from_checkpoint(state_dict, original_config)
    weight_dtype = parse_dtype(dtype, state_dict)
    model_config.dtype = weight_dtype
    with torch.device("meta"):
        model = VisCPMChatForConditionalGeneration(model_config)
    targets = {key: value for key, value in model.state_dict().items() if key not in model.all_tied_weights_keys}
    weights = map_state_dict(
        targets, state_dict, chat_key, hint="is this a VisCPM-Chat checkpoint of the configured dimensions?"
    )
    extras = {key: tensor for key, tensor in state_dict.items() if chat_key(key) is None}

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

    with staged_output(output, overwrite) as staging:
        # the model files and auto_map entries, as the model's own save_pretrained writes them (its weights are
        # streamed from the checkpoint instead)
        custom_object_save(model, staging, config=model_config)
        model.name_second_auto_class()
        model_config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        processor.save_pretrained(staging)
        write_weights(staging, weights, weight_dtype, max_shard_size, release=memory_mapped)
        source_dtypes = {key: str(tensor.dtype).removeprefix("torch.") for key, tensor in state_dict.items()}
        write_original_extras(staging, extras, source_dtypes, release=memory_mapped)
        (staging / "README.md").write_text(render_model_card(CHAT_CARD, model_name), encoding="utf-8")
        if verify:
            verify_weights(staging, weights, weight_dtype, release=memory_mapped)
    return Path(output)


def chat_to_original(folder: str | Path, output: str | Path) -> Path:
    """A converted VisCPM-Chat folder back in the original `VLU_CPMBee` layout (`torch.load`-able, bit-exact)."""
    return to_original(folder, output, [("", "model", original_chat_key)])


def chat_pivot(folder: str | Path, output: str | Path, overwrite: bool = False) -> Path:
    """A converted VisCPM-Chat folder's CPM-Bee (its MpM pivot, `llm`) with its tokenizer, as a folder that
    `AutoModelForCausalLM` and `AutoTokenizer` load."""
    output = check_output(output, {"folder": folder}, overwrite)
    with staged_output(output, overwrite) as staging:
        VisCPMChatForConditionalGeneration.from_pretrained(folder).llm.save_pretrained(staging)
        CpmBeeTokenizer.from_pretrained(folder).save_pretrained(staging)
    return output
