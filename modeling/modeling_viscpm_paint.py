# Copyright 2026 The viscpm authors. Licensed under the Apache License, Version 2.0.
"""VisCPM-Paint: CPM-Bee reads the prompt, a bridge maps its hidden states to the UNet's cross-attention width, and a
Stable Diffusion UNet predicts the noise.

The original (OpenBMB/VisCPM, `VisCPM/models/vlg_cpmbee.py` and `VisCPM/models/stablediffusion.py`):

* The text states are CPM-Bee's final normed hidden states at ALL positions, padding included: the shorter of a
  prompt and its unconditional twin is right-padded, and its padded positions still produce hidden states that the
  UNet's cross-attention sees, unmasked.
* The bridge (`CPMBeeTransBlock`) is a bias-free Linear from CPM-Bee's width to the UNet's `cross_attention_dim`,
  then a LayerNorm (eps 1e-6). Its dropout has p=0 and is left out here.
* The UNet is diffusers' `UNet2DConditionModel` as Stable Diffusion 2.1 base configures it.

Module names are the original's (`llm`, `trans_block.w_out_res`, `trans_block.layernorm`, `unet`), so an original
checkpoint loads into [`VisCPMPaintModel`] with the identity key map. [`VisCPMPaintTextEncoder`] is the same minus
the UNet: the text encoder component of `VisCPMPaintPipeline`, which holds the UNet as a diffusers component.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import ModelOutput

from .configuration_viscpm_paint import VisCPMPaintConfig, VisCPMPaintTextEncoderConfig
from .modeling_cpmbee import CPMBEE_INPUT_NAMES, CpmBeeModel, CpuFourBitLoadingMixin


class VisCPMPaintBridge(nn.Module):
    """The original `CPMBeeTransBlock`: bias-free Linear from CPM-Bee's width to the UNet's, then LayerNorm."""

    def __init__(self, config: VisCPMPaintConfig):
        super().__init__()
        self.w_out_res = nn.Linear(config.text_config.dim_model, config.cross_attention_dim, bias=False)
        self.layernorm = nn.LayerNorm(config.cross_attention_dim, eps=config.bridge_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.layernorm(self.w_out_res(hidden_states))


@dataclass
class VisCPMPaintTextEncoderOutput(ModelOutput):
    """
    Args:
        encoder_hidden_states (`torch.FloatTensor` of shape `(batch, length, cross_attention_dim)`):
            The bridge's output: the UNet's `encoder_hidden_states`.
        text_hidden_states (`torch.FloatTensor` of shape `(batch, length, dim_model)`):
            CPM-Bee's final normed hidden states at every position, padding included.
    """

    encoder_hidden_states: torch.FloatTensor | None = None
    text_hidden_states: torch.FloatTensor | None = None


@dataclass
class VisCPMPaintOutput(ModelOutput):
    """
    Args:
        loss (`torch.FloatTensor`, *optional*): mean squared error against `noise`, when it is given (the original's
            training loss).
        sample (`torch.FloatTensor` of shape `(batch, channels, height, width)`): the UNet's noise prediction.
        encoder_hidden_states (`torch.FloatTensor` of shape `(batch, length, cross_attention_dim)`): what the UNet saw.
    """

    loss: torch.FloatTensor | None = None
    sample: torch.FloatTensor | None = None
    encoder_hidden_states: torch.FloatTensor | None = None


class VisCPMPaintPreTrainedModel(CpuFourBitLoadingMixin, PreTrainedModel):
    """Holds what the text encoder and the whole model share: CPM-Bee (`llm`), the bridge (`trans_block`) and
    [`~VisCPMPaintPreTrainedModel.encode_prompt`]."""

    config_class = VisCPMPaintConfig
    config: VisCPMPaintConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _no_split_modules = ["CpmBeeTransformerBlock"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _can_compile_fullgraph = False

    def _build_text_encoder(self, config: VisCPMPaintConfig) -> None:
        self.llm = CpmBeeModel(config.text_config)
        self.trans_block = VisCPMPaintBridge(config)

    def get_input_embeddings(self):
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.llm.set_input_embeddings(value)

    def encode_prompt(self, **cpmbee_inputs) -> VisCPMPaintTextEncoderOutput:
        """CPM-Bee over a batch of CPM-Bee inputs (`input_ids`, `input_id_subs`, `attention_mask`, `context`,
        `segment_ids`, ...; the other keys of a collated batch, such as `labels` or `length`, are ignored), then the
        bridge at every position, padding included (as the original)."""
        inputs = {name: cpmbee_inputs[name] for name in CPMBEE_INPUT_NAMES if cpmbee_inputs.get(name) is not None}
        text_hidden_states = self.llm(**inputs, use_cache=False).last_hidden_state
        return VisCPMPaintTextEncoderOutput(
            encoder_hidden_states=self.trans_block(text_hidden_states), text_hidden_states=text_hidden_states
        )


class VisCPMPaintTextEncoder(VisCPMPaintPreTrainedModel):
    """CPM-Bee and the bridge: a batch of CPM-Bee inputs (a prompt's structured input, collated) to the UNet's
    `encoder_hidden_states`. The text encoder component of `VisCPMPaintPipeline`; a whole model's
    `VisCPMPaintConfig` is accepted too."""

    config_class = VisCPMPaintTextEncoderConfig

    def __init__(self, config: VisCPMPaintConfig):
        if not isinstance(config, VisCPMPaintTextEncoderConfig):
            config = VisCPMPaintTextEncoderConfig.from_paint_config(config)
        super().__init__(config)
        self._build_text_encoder(config)
        self.post_init()

    def forward(self, **cpmbee_inputs) -> VisCPMPaintTextEncoderOutput:
        """See [`~VisCPMPaintPreTrainedModel.encode_prompt`]."""
        return self.encode_prompt(**cpmbee_inputs)


class VisCPMPaintModel(VisCPMPaintPreTrainedModel):
    """The original `VLG_CPMBee` minus the VAE: CPM-Bee, the bridge and the UNet, with the original's module names
    (an original checkpoint's `llm.*`, `trans_block.*` and `unet.*` keys load as they are)."""

    def __init__(self, config: VisCPMPaintConfig):
        super().__init__(config)
        # diffusers is imported here, not with the module: the text encoder (and registering these classes with the
        # Auto classes) needs only torch and transformers, and diffusers' import pulls in bitsandbytes, when installed
        from diffusers import UNet2DConditionModel

        self._build_text_encoder(config)
        self.unet = UNet2DConditionModel.from_config(config.unet_config)
        self.post_init()

    def forward(
        self,
        sample: torch.FloatTensor,
        timestep: torch.Tensor | int,
        encoder_hidden_states: torch.FloatTensor | None = None,
        noise: torch.FloatTensor | None = None,
        **cpmbee_inputs,
    ) -> VisCPMPaintOutput:
        r"""
        sample (`torch.FloatTensor` of shape `(batch, in_channels, height, width)`):
            Noisy latents.
        timestep (`torch.Tensor` or `int`):
            Diffusion timestep(s).
        encoder_hidden_states (`torch.FloatTensor` of shape `(batch, length, cross_attention_dim)`, *optional*):
            Text states computed earlier ([`~VisCPMPaintTextEncoder.encode_prompt`]); otherwise they are computed from
            the CPM-Bee inputs passed as keyword arguments (a batch `CpmBeeCollator` built).
        noise (`torch.FloatTensor`, *optional*):
            The noise that was added to the latents: with it, `loss` is the original's MSE training loss.
        """
        if encoder_hidden_states is None:
            encoder_hidden_states = self.encode_prompt(**cpmbee_inputs).encoder_hidden_states
        encoder_hidden_states = encoder_hidden_states.to(self.unet.dtype)
        noise_pred = self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states).sample
        loss = None
        if noise is not None:
            loss = F.mse_loss(noise_pred.float(), noise.float(), reduction="mean")
        return VisCPMPaintOutput(loss=loss, sample=noise_pred, encoder_hidden_states=encoder_hidden_states)


__all__ = [
    "VisCPMPaintBridge",
    "VisCPMPaintModel",
    "VisCPMPaintOutput",
    "VisCPMPaintPreTrainedModel",
    "VisCPMPaintTextEncoder",
    "VisCPMPaintTextEncoderOutput",
]
