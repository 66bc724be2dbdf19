"""`viscpm assemble-chat`: a VisCPM-Chat folder on the pivot of your choice, the starting point of MpM on your own
multilingual LLM (docs/mpm-recipe.md).

The pivot (any folder `AutoModelForCausalLM` and `AutoTokenizer` load) becomes the language model with its weights,
tokenizer (chat template included) and generation config. The vision side comes from a VisCPM-Chat folder when one
is given: its BEiT-3 (trained by VisCPM's stage 1 through the language experts) and, when the counts agree, its
learned queries, read straight from its safetensors without loading its language model; the mapping into the
pivot's width is new. Without one, BEiT-3 and the queries start random (and the image processor is VisCPM's).
"""

from __future__ import annotations

from pathlib import Path

VISION_PREFIXES = ("vpm.", "query")


def vision_weights(folder: Path) -> dict:
    """The BEiT-3 and query tensors of a VisCPM-Chat folder, read from its safetensors files alone."""
    from safetensors import safe_open

    from ..conversion.export import weight_files

    tensors = {}
    for path in weight_files(folder):
        if not path.is_file():
            raise FileNotFoundError(f"--vision {folder} has no {path.name}: pass a VisCPM-Chat folder")
        with safe_open(path, framework="pt") as weights:
            for key in weights.keys():  # noqa: SIM118  (safe_open is no mapping)
                if key.startswith(VISION_PREFIXES):
                    tensors[key] = weights.get_tensor(key)
    return tensors


def assemble_chat(
    pivot: Path, output: Path, vision: Path | None = None, query_num: int = 64, overwrite: bool = False
) -> Path:
    """Write a VisCPM-Chat folder on ``pivot`` (and ``vision``'s BEiT-3) to ``output``; see the module's doc."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, AutoTokenizer, GenerationConfig

    from ..conversion.export import check_output, staged_output
    from ..modeling.configuration_viscpm_chat import VisCPMChatConfig
    from ..modeling.image_processing_viscpm_chat import VisCPMChatImageProcessor
    from ..modeling.modeling_viscpm_chat import VisCPMChatForConditionalGeneration
    from ..modeling.processing_viscpm_chat import VisCPMChatProcessor

    pivot, output = Path(pivot), Path(output)
    check_output(output, {"--pivot": pivot, "--vision": vision}, overwrite)
    if not (pivot / "config.json").is_file():
        raise FileNotFoundError(f"--pivot {pivot} has no config.json: pass a folder AutoModelForCausalLM loads")
    language_model = AutoModelForCausalLM.from_pretrained(pivot, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(pivot)
    if vision is not None:
        donor = AutoConfig.from_pretrained(vision)
        if not isinstance(donor, VisCPMChatConfig):
            raise ValueError(f"--vision {vision} is a {type(donor).__name__} folder, not VisCPM-Chat")
        vision_config, image_processor = donor.vision_config, AutoProcessor.from_pretrained(vision).image_processor
        tensors = vision_weights(Path(vision))
        if donor.query_num != query_num:  # the queries go with their count
            tensors.pop("query")
    else:
        vision_config, image_processor, tensors = None, VisCPMChatImageProcessor(), {}

    config = VisCPMChatConfig(vision_config=vision_config, text_config=language_model.config, query_num=query_num)
    model = VisCPMChatForConditionalGeneration(config)
    model.llm.load_state_dict(language_model.state_dict())
    model.load_state_dict(tensors, strict=False)
    if (pivot / "generation_config.json").is_file():  # the pivot's own end tokens and decoding defaults
        model.generation_config = GenerationConfig.from_pretrained(pivot)
    processor = VisCPMChatProcessor(image_processor, tokenizer, query_num=query_num)
    with staged_output(output, overwrite) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
    return output
