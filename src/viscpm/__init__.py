"""viscpm: VisCPM (MpM) on Hugging Face transformers.

``import viscpm`` teaches transformers' Auto classes (``AutoConfig``, ``AutoModel``, ``AutoModelForCausalLM``,
``AutoModelForImageTextToText``, ``AutoTokenizer``, ``AutoImageProcessor``, ``AutoProcessor``) to load converted
folders, whichever of the two is imported first.

The import itself is light: it loads neither torch nor transformers, so that the command line starts in a fraction of
a second. The classes below load on first use (``viscpm.VisCPMChatForConditionalGeneration``), and the Auto classes
learn them when transformers is imported: at once if it already is, else as soon as it is.
"""

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

# public name -> the module (under viscpm) that defines it
_EXPORTS = {
    "Beit3VisionConfig": ".modeling.configuration_beit3",
    "Beit3VisionModel": ".modeling.modeling_beit3",
    "CpmBeeConfig": ".modeling.configuration_cpmbee",
    "CpmBeeForCausalLM": ".modeling.modeling_cpmbee",
    "CpmBeeModel": ".modeling.modeling_cpmbee",
    "CpmBeePreTrainedModel": ".modeling.modeling_cpmbee",
    "CpmBeeTokenizer": ".modeling.tokenization_cpmbee",
    "VisCPMChatConfig": ".modeling.configuration_viscpm_chat",
    "VisCPMChatForConditionalGeneration": ".modeling.modeling_viscpm_chat",
    "VisCPMChatImageProcessor": ".modeling.image_processing_viscpm_chat",
    "VisCPMChatProcessor": ".modeling.processing_viscpm_chat",
    "VisCPMPaintConfig": ".modeling.configuration_viscpm_paint",
    "VisCPMPaintModel": ".modeling.modeling_viscpm_paint",
    "VisCPMPaintPipeline": ".modeling.pipeline_viscpm_paint",  # needs diffusers (the `paint` extra)
    "VisCPMPaintTextEncoder": ".modeling.modeling_viscpm_paint",
    "VisCPMPaintTextEncoderConfig": ".modeling.configuration_viscpm_paint",
}

# subpackages reachable as attributes without an import of their own (`viscpm.defaults.CHAT`)
_SUBPACKAGES = ("defaults",)

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBPACKAGES))


def register_auto_classes() -> None:
    """Register the VisCPM classes with transformers' Auto classes (idempotent; imports torch and transformers)."""
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
    from .modeling.modeling_cpmbee import CpmBeeForCausalLM, CpmBeeModel
    from .modeling.modeling_viscpm_chat import VisCPMChatForConditionalGeneration
    from .modeling.modeling_viscpm_paint import VisCPMPaintModel, VisCPMPaintTextEncoder
    from .modeling.processing_viscpm_chat import VisCPMChatProcessor
    from .modeling.tokenization_cpmbee import CpmBeeTokenizer

    configs = (CpmBeeConfig, Beit3VisionConfig, VisCPMChatConfig, VisCPMPaintConfig, VisCPMPaintTextEncoderConfig)
    for config in configs:
        AutoConfig.register(config.model_type, config, exist_ok=True)
    AutoModel.register(CpmBeeConfig, CpmBeeModel, exist_ok=True)
    AutoModelForCausalLM.register(CpmBeeConfig, CpmBeeForCausalLM, exist_ok=True)
    AutoModel.register(Beit3VisionConfig, Beit3VisionModel, exist_ok=True)
    AutoModel.register(VisCPMChatConfig, VisCPMChatForConditionalGeneration, exist_ok=True)
    AutoModelForImageTextToText.register(VisCPMChatConfig, VisCPMChatForConditionalGeneration, exist_ok=True)
    AutoModel.register(VisCPMPaintConfig, VisCPMPaintModel, exist_ok=True)
    AutoModel.register(VisCPMPaintTextEncoderConfig, VisCPMPaintTextEncoder, exist_ok=True)
    for config in (CpmBeeConfig, VisCPMChatConfig, VisCPMPaintConfig):
        AutoTokenizer.register(config, slow_tokenizer_class=CpmBeeTokenizer, exist_ok=True)
    AutoImageProcessor.register(VisCPMChatConfig, slow_image_processor_class=VisCPMChatImageProcessor, exist_ok=True)
    AutoProcessor.register(VisCPMChatConfig, VisCPMChatProcessor, exist_ok=True)

    # every save_pretrained writes the model files and the auto_map entries that load them as Hub remote code, so a
    # saved folder (converted, fine-tuned, merged) loads with trust_remote_code=True where viscpm is not installed
    for config in (CpmBeeConfig, Beit3VisionConfig, VisCPMChatConfig):
        config.register_for_auto_class()
    for model, auto_class in (
        (CpmBeeModel, "AutoModel"),
        (CpmBeeForCausalLM, "AutoModelForCausalLM"),
        (Beit3VisionModel, "AutoModel"),
        (VisCPMChatForConditionalGeneration, "AutoModel"),
        (CpmBeeTokenizer, "AutoTokenizer"),
        (VisCPMChatImageProcessor, "AutoImageProcessor"),
        (VisCPMChatProcessor, "AutoProcessor"),
    ):
        model.register_for_auto_class(auto_class)


class _RegisterAfterTransformersImport(importlib.abc.MetaPathFinder):
    """Runs `register_auto_classes()` right after the first `import transformers` of the process completes.

    It stays installed until that import runs: libraries look transformers up without importing it
    (`importlib.util.find_spec`, as diffusers, accelerate and peft check what is installed), and such a lookup's spec
    is never executed.
    """

    looking_up = False  # this finder's own lookup of the real spec asks the finders again

    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers" or self.looking_up:
            return None
        self.looking_up = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self.looking_up = False
        if spec is not None and spec.loader is not None:
            execute = spec.loader.exec_module

            def execute_then_register(module):
                execute(module)
                if self in sys.meta_path:
                    sys.meta_path.remove(self)
                register_auto_classes()

            spec.loader.exec_module = execute_then_register
        return spec


if "transformers" in sys.modules:
    register_auto_classes()
elif not any(isinstance(finder, _RegisterAfterTransformersImport) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTransformersImport())
