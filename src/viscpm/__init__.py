"""viscpm: VisCPM (MpM) on Hugging Face transformers.

Importing the package registers the CPM-Bee classes with transformers' Auto classes, so
``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM`` / ``AutoTokenizer`` load converted folders.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .modeling.configuration_cpmbee import CpmBeeConfig
from .modeling.modeling_cpmbee import CpmBeeForCausalLM, CpmBeeModel, CpmBeePreTrainedModel
from .modeling.tokenization_cpmbee import CpmBeeTokenizer

__version__ = "0.1.0"

AutoConfig.register(CpmBeeConfig.model_type, CpmBeeConfig, exist_ok=True)
AutoModel.register(CpmBeeConfig, CpmBeeModel, exist_ok=True)
AutoModelForCausalLM.register(CpmBeeConfig, CpmBeeForCausalLM, exist_ok=True)
AutoTokenizer.register(CpmBeeConfig, slow_tokenizer_class=CpmBeeTokenizer, exist_ok=True)

__all__ = [
    "CpmBeeConfig",
    "CpmBeeForCausalLM",
    "CpmBeeModel",
    "CpmBeePreTrainedModel",
    "CpmBeeTokenizer",
]
