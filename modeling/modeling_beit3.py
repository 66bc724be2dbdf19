# Copyright 2026 The viscpm authors. Licensed under the Apache License, Version 2.0.
"""The BEiT-3 vision tower of VisCPM-Chat.

VisCPM-Chat encodes an image with BEiT-3 (Wang et al. 2022, "Image as a Foreign Language"), as built by
torchscale 0.3.0 (``torchscale/model/BEiT3.py``, ``architecture/encoder.py``, ``component/*``) and wrapped by
the original ``VisCPM/models/beit3.py:BEiT3Wrapper``. Learned query vectors are appended after the image
tokens and encoded together with them; VisCPM keeps only the query outputs (``query_hidden_states``).

BEiT-3 is a *multiway* transformer: every projection and LayerNorm exists twice, an image expert (``image``,
torchscale's ``A``) and a text expert (``text``, torchscale's ``B``). Attention mixes all tokens; everything
else is applied per token by that token's expert. The image tokens ([cls] + patches) use the image expert;
the learned queries use the *text* expert (BEiT3Wrapper sets ``multiway_split_position`` to the number of
image tokens, so everything after them is treated as text). The numerics, each a named line below:

* Pre-norm layers with "sub-LayerNorm" (``subln=True``): one more LayerNorm inside attention (on the
  attention output, before ``out_proj``) and one inside the feed-forward (after the activation, before
  ``fc2``). All LayerNorms have eps ``layer_norm_eps`` (1e-5).
* Attention scaling ``head_dim ** -0.5`` is applied to the queries before ``q @ k^T``; softmax in fp32.
* Exact (erf) GELU computed in fp32 and cast back.
* No embedding scale, no embedding LayerNorm, no relative position bias: learned absolute position tables,
  one per expert, indexed from 2 (fairseq reserves rows 0 and 1). The image tokens read the image table at
  2 .. num_image_tokens + 1; the queries read the text table at 2 .. num_queries + 1 (positions restart).
* The [cls] token and the patch embeddings carry no position before the tables are added.
* The final multiway LayerNorm after the last layer (``normalize_output=True``).

There is no attention mask (all images have the same size, every token sees every token) and no attention
bias, so every attention backend of transformers applies (eager, sdpa, flash attention, flex attention).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, can_return_tuple

from .configuration_beit3 import Beit3VisionConfig

# fairseq convention kept by torchscale's PositionalEmbedding: positions start at 2 (rows 0 and 1 are never read)
POSITION_OFFSET = 2


class Beit3Multiway(nn.Module):
    """A module in two copies: the first ``num_image_tokens`` tokens go through ``image``, the rest through ``text``.

    torchscale's ``MultiwayNetwork`` keeps the split position as mutable module state set before each forward;
    here it is an argument.
    """

    def __init__(self, make_expert: Callable[[], nn.Module]):
        super().__init__()
        self.image = make_expert()  # torchscale's expert `A`
        self.text = make_expert()  # torchscale's expert `B`; VisCPM's learned queries go through it

    def forward(self, hidden_states: torch.Tensor, num_image_tokens: int) -> torch.Tensor:
        length = hidden_states.shape[1]
        if num_image_tokens >= length:
            return self.image(hidden_states)
        if num_image_tokens == 0:
            return self.text(hidden_states)
        image_tokens, text_tokens = hidden_states.split([num_image_tokens, length - num_image_tokens], dim=1)
        return torch.cat([self.image(image_tokens), self.text(text_tokens)], dim=1)


class Beit3VisionEmbeddings(nn.Module):
    """[cls] + patch embeddings of the image, the queries after them, plus each expert's position table."""

    def __init__(self, config: Beit3VisionConfig):
        super().__init__()
        self.config = config
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        # torchscale's `encoder.embed_positions` (a multiway embedding): A for image tokens, B for text / queries
        self.image_position_embedding = nn.Embedding(config.num_image_tokens + POSITION_OFFSET, config.hidden_size)
        self.text_position_embedding = nn.Embedding(config.max_source_positions, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(batch, 1 + num_patches, hidden)``: [cls] then the patches in row-major order, without positions."""
        size = self.config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (self.config.num_channels, size, size):
            raise ValueError(
                f"pixel_values must have shape (batch, {self.config.num_channels}, {size}, {size}), got "
                f"{tuple(pixel_values.shape)} (BEiT-3 takes exactly the image size it was built for)"
            )
        # BEiT3Wrapper casts the pixels to the weights' dtype
        pixel_values = pixel_values.to(self.patch_embedding.weight.dtype)
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        cls_tokens = self.cls_token.expand(patches.shape[0], -1, -1)
        return torch.cat([cls_tokens, patches], dim=1)

    def forward(self, pixel_values: torch.Tensor, query_embeds: torch.Tensor | None = None) -> torch.Tensor:
        image_tokens = self.embed_image(pixel_values)
        batch, num_image_tokens, _ = image_tokens.shape
        device = image_tokens.device
        image_positions = torch.arange(POSITION_OFFSET, num_image_tokens + POSITION_OFFSET, device=device)
        # no embedding scale (no_scale_embedding=True)
        embeddings = image_tokens + self.image_position_embedding(image_positions)
        if query_embeds is not None:
            query_embeds = self._batched_queries(query_embeds, batch).to(embeddings.dtype)
            # the queries read the text table, their positions restarting at 2
            query_positions = torch.arange(POSITION_OFFSET, query_embeds.shape[1] + POSITION_OFFSET, device=device)
            query_embeds = query_embeds + self.text_position_embedding(query_positions)
            embeddings = torch.cat([embeddings, query_embeds], dim=1)
        return self.dropout(embeddings)

    def _batched_queries(self, query_embeds: torch.Tensor, batch: int) -> torch.Tensor:
        hidden = self.config.hidden_size
        if query_embeds.dim() == 2:
            query_embeds = query_embeds.unsqueeze(0).expand(batch, -1, -1)
        if query_embeds.dim() != 3 or query_embeds.shape[0] != batch or query_embeds.shape[2] != hidden:
            raise ValueError(
                f"query_embeds must have shape (num_queries, {hidden}) or ({batch}, num_queries, {hidden}), got "
                f"{tuple(query_embeds.shape)}"
            )
        max_queries = self.config.max_source_positions - POSITION_OFFSET
        if query_embeds.shape[1] > max_queries:
            raise ValueError(
                f"{query_embeds.shape[1]} queries do not fit the text position table: at most {max_queries} "
                f"(max_source_positions - 2)"
            )
        return query_embeds


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """torchscale's attention: the queries (not the scores) are scaled, softmax in fp32."""
    scores = torch.matmul(query * scaling, key.transpose(2, 3))
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    attn_output = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return attn_output, probs


class Beit3Attention(nn.Module):
    """Multiway self-attention: per-expert q/k/v, attention over all tokens, per-expert sub-LayerNorm and out_proj."""

    def __init__(self, config: Beit3VisionConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        hidden = config.hidden_size
        self.q_proj = Beit3Multiway(lambda: nn.Linear(hidden, hidden))
        self.k_proj = Beit3Multiway(lambda: nn.Linear(hidden, hidden))
        self.v_proj = Beit3Multiway(lambda: nn.Linear(hidden, hidden))
        # subln: LayerNorm of the attention output before the output projection
        self.inner_attn_ln = Beit3Multiway(lambda: nn.LayerNorm(hidden, eps=config.layer_norm_eps))
        self.out_proj = Beit3Multiway(lambda: nn.Linear(hidden, hidden))

    def forward(
        self, hidden_states: torch.Tensor, num_image_tokens: int, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length, _ = hidden_states.shape
        head_shape = (batch, length, self.num_heads, self.head_dim)
        query = self.q_proj(hidden_states, num_image_tokens).view(head_shape).transpose(1, 2)
        key = self.k_proj(hidden_states, num_image_tokens).view(head_shape).transpose(1, 2)
        value = self.v_proj(hidden_states, num_image_tokens).view(head_shape).transpose(1, 2)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            None,  # no mask: every token sees every token
            dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            is_causal=False,
            **kwargs,
        )
        attn_output = attn_output.reshape(batch, length, -1)
        attn_output = self.inner_attn_ln(attn_output, num_image_tokens)
        return self.out_proj(attn_output, num_image_tokens), attn_weights


class Beit3FeedForward(nn.Module):
    """One expert's feed-forward: ``fc2(LN(gelu(fc1 x)))`` (the LayerNorm is subln's)."""

    def __init__(self, config: Beit3VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation_dropout = nn.Dropout(config.activation_dropout)
        self.ffn_layernorm = nn.LayerNorm(config.intermediate_size, eps=config.layer_norm_eps)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.fc1(hidden_states)
        # torchscale runs the (exact, erf) GELU in fp32 and casts back
        hidden_states = F.gelu(hidden_states.float()).type_as(hidden_states)
        hidden_states = self.activation_dropout(hidden_states)
        hidden_states = self.ffn_layernorm(hidden_states)
        return self.dropout(self.fc2(hidden_states))


class Beit3EncoderLayer(GradientCheckpointingLayer):
    """Pre-norm layer: ``x + attn(LN(x))`` then ``x + ffn(LN(x))``, every LayerNorm and the FFN multiway."""

    def __init__(self, config: Beit3VisionConfig, layer_idx: int):
        super().__init__()
        eps = config.layer_norm_eps
        self.self_attn_layer_norm = Beit3Multiway(lambda: nn.LayerNorm(config.hidden_size, eps=eps))
        self.self_attn = Beit3Attention(config, layer_idx)
        self.dropout = nn.Dropout(config.hidden_dropout)
        # fairseq's name for the LayerNorm *before* the feed-forward (not a final norm)
        self.final_layer_norm = Beit3Multiway(lambda: nn.LayerNorm(config.hidden_size, eps=eps))
        self.ffn = Beit3Multiway(lambda: Beit3FeedForward(config))

    def forward(
        self, hidden_states: torch.Tensor, num_image_tokens: int, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # residual weight 1 (deepnorm=False); no stochastic depth (drop_path_rate=0)
        residual = hidden_states
        attn_output, attn_weights = self.self_attn(
            self.self_attn_layer_norm(hidden_states, num_image_tokens), num_image_tokens, **kwargs
        )
        hidden_states = residual + self.dropout(attn_output)
        residual = hidden_states
        hidden_states = residual + self.ffn(self.final_layer_norm(hidden_states, num_image_tokens), num_image_tokens)
        return hidden_states, attn_weights


class Beit3Encoder(nn.Module):
    def __init__(self, config: Beit3VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList([Beit3EncoderLayer(config, idx) for idx in range(config.num_hidden_layers)])
        # normalize_output: a multiway LayerNorm after the last layer
        self.layer_norm = Beit3Multiway(lambda: nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps))
        self.gradient_checkpointing = False

    def forward(
        self,
        hidden_states: torch.Tensor,
        num_image_tokens: int,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        **kwargs,
    ) -> BaseModelOutput:
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            hidden_states, attn_weights = layer(hidden_states, num_image_tokens, **kwargs)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (attn_weights,)
        return BaseModelOutput(
            last_hidden_state=self.layer_norm(hidden_states, num_image_tokens),
            hidden_states=all_hidden_states,
            attentions=all_attentions,
        )


@dataclass
class Beit3VisionModelOutput(ModelOutput):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(batch, num_image_tokens + num_queries, hidden)`):
        Encoder output after the final multiway LayerNorm for every token: [cls], the patches, then the queries.
    query_hidden_states (`torch.FloatTensor` of shape `(batch, num_queries, hidden)`, *optional*):
        `last_hidden_state[:, num_image_tokens:]`, the query outputs, which are all VisCPM keeps. `None` without
        queries.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned with `output_hidden_states=True`):
        `num_hidden_layers + 1` tensors: the embeddings (positions added), then the output of each layer, before
        the final LayerNorm. `hidden_states[l + 1]` is the output of layer `l`.
    attentions (`tuple(torch.FloatTensor)`, *optional*, returned with `output_attentions=True` and eager attention):
        Attention probabilities of each layer, `(batch, heads, length, length)`.
    """

    last_hidden_state: torch.FloatTensor | None = None
    query_hidden_states: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class Beit3PreTrainedModel(PreTrainedModel):
    config_class = Beit3VisionConfig
    config: Beit3VisionConfig
    base_model_prefix = "beit3"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["Beit3EncoderLayer", "Beit3VisionEmbeddings"]
    _supports_sdpa = True
    _supports_flash_attn = True  # no mask and no attention bias
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            # BEiT3Wrapper._init_weights: timm trunc_normal_ with the bounds at +-1 std (not +-2)
            init.trunc_normal_(module.weight, std=std, a=-std, b=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            # the position tables; the original leaves them at torch's N(0, 1) (released weights replace them anyway)
            init.trunc_normal_(module.weight, std=std, a=-std, b=std)
        elif isinstance(module, Beit3VisionEmbeddings):
            init.trunc_normal_(module.cls_token, std=std, a=-std, b=std)  # the original starts it at zeros
        else:
            super()._init_weights(module)


class Beit3VisionModel(Beit3PreTrainedModel):
    """BEiT-3 over an image and (optionally) learned queries appended after its tokens, as VisCPM-Chat runs it."""

    def __init__(self, config: Beit3VisionConfig):
        super().__init__(config)
        self.embeddings = Beit3VisionEmbeddings(config)
        self.encoder = Beit3Encoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embedding

    @property
    def num_image_tokens(self) -> int:
        """[cls] + patches: tokens before the queries; `last_hidden_state[:, num_image_tokens:]` are the queries."""
        return self.config.num_image_tokens

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        query_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> Beit3VisionModelOutput:
        r"""
        pixel_values (`torch.Tensor` of shape `(batch, num_channels, image_size, image_size)`):
            Normalised images (VisCPM: bicubic resize to `image_size`, mean = std = 0.5).
        query_embeds (`torch.Tensor` of shape `(num_queries, hidden)` or `(batch, num_queries, hidden)`, *optional*):
            Learned queries appended after the image tokens and encoded by the text expert (VisCPM's `query`).
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        embeddings = self.embeddings(pixel_values, query_embeds)
        num_image_tokens = self.config.num_image_tokens
        encoder_outputs = self.encoder(
            embeddings,
            num_image_tokens,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            **kwargs,
        )
        last_hidden_state = encoder_outputs.last_hidden_state
        return Beit3VisionModelOutput(
            last_hidden_state=last_hidden_state,
            query_hidden_states=last_hidden_state[:, num_image_tokens:] if query_embeds is not None else None,
            hidden_states=encoder_outputs.hidden_states,
            attentions=encoder_outputs.attentions,
        )


__all__ = ["Beit3PreTrainedModel", "Beit3VisionModel", "Beit3VisionModelOutput"]
