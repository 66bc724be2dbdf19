"""viscpm: VisCPM (MpM) on Hugging Face transformers.

Importing the package registers its classes with transformers' Auto classes, so ``AutoConfig``,
``AutoModel``, ``AutoModelForCausalLM``, ``AutoModelForImageTextToText``, ``AutoTokenizer``,
``AutoImageProcessor`` and ``AutoProcessor`` load converted folders.
"""

import importlib.util

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)

from .modeling.configuration_beit3 import Beit3VisionConfig
from .modeling.configuration_cpmbee import CpmBeeConfig
from .modeling.configuration_viscpm_chat import VisCPMChatConfig
from .modeling.configuration_viscpm_paint import VisCPMPaintConfig, VisCPMPaintTextEncoderConfig
from .modeling.image_processing_viscpm_chat import VisCPMChatImageProcessor
from .modeling.modeling_beit3 import Beit3VisionModel
from .modeling.modeling_cpmbee import CpmBeeForCausalLM, CpmBeeModel, CpmBeePreTrainedModel
from .modeling.modeling_viscpm_chat import VisCPMChatForConditionalGeneration
from .modeling.processing_viscpm_chat import VisCPMChatProcessor
from .modeling.tokenization_cpmbee import CpmBeeTokenizer

__version__ = "0.1.0"

for _config in (CpmBeeConfig, Beit3VisionConfig, VisCPMChatConfig, VisCPMPaintConfig, VisCPMPaintTextEncoderConfig):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
AutoModel.register(CpmBeeConfig, CpmBeeModel, exist_ok=True)
AutoModelForCausalLM.register(CpmBeeConfig, CpmBeeForCausalLM, exist_ok=True)
AutoModel.register(Beit3VisionConfig, Beit3VisionModel, exist_ok=True)
AutoModel.register(VisCPMChatConfig, VisCPMChatForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(VisCPMChatConfig, VisCPMChatForConditionalGeneration, exist_ok=True)
for _config in (CpmBeeConfig, VisCPMChatConfig):
    AutoTokenizer.register(_config, slow_tokenizer_class=CpmBeeTokenizer, exist_ok=True)
AutoImageProcessor.register(VisCPMChatConfig, slow_image_processor_class=VisCPMChatImageProcessor, exist_ok=True)
AutoProcessor.register(VisCPMChatConfig, VisCPMChatProcessor, exist_ok=True)

# VisCPM-Paint needs diffusers (the `paint` extra)
if importlib.util.find_spec("diffusers") is not None:
    from .modeling.modeling_viscpm_paint import VisCPMPaintModel, VisCPMPaintTextEncoder
    from .modeling.pipeline_viscpm_paint import VisCPMPaintPipeline

    AutoModel.register(VisCPMPaintConfig, VisCPMPaintModel, exist_ok=True)
    AutoModel.register(VisCPMPaintTextEncoderConfig, VisCPMPaintTextEncoder, exist_ok=True)
    AutoTokenizer.register(VisCPMPaintConfig, slow_tokenizer_class=CpmBeeTokenizer, exist_ok=True)

__all__ = [
    "Beit3VisionConfig",
    "Beit3VisionModel",
    "CpmBeeConfig",
    "CpmBeeForCausalLM",
    "CpmBeeModel",
    "CpmBeePreTrainedModel",
    "CpmBeeTokenizer",
    "VisCPMChatConfig",
    "VisCPMChatForConditionalGeneration",
    "VisCPMChatImageProcessor",
    "VisCPMChatProcessor",
    "VisCPMPaintConfig",
    "VisCPMPaintModel",
    "VisCPMPaintPipeline",
    "VisCPMPaintTextEncoder",
    "VisCPMPaintTextEncoderConfig",
]
