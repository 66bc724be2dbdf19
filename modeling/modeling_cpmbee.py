# Copyright 2026 The viscpm authors. Licensed under the Apache License, Version 2.0.
"""CPM-Bee, the multilingual language model that VisCPM-Chat and VisCPM-Paint pivot on.

The numerics are those of the original implementation (OpenBMB/VisCPM, ``VisCPM/models/modules``);
each of its quirks is a named line below:

* RMS layer norm with a weight only, variance computed in fp32.
* Bias-free projections scaled by ``1/sqrt(d_in)``: after the matmul, except the feed-forward output
  projection, which scales its *input* first to stay inside fp16 range. Every projection is a plain
  ``nn.Linear`` and every scale lives outside it, so bitsandbytes and peft (which swap ``nn.Linear``
  modules) cannot drop a scale.
* Residuals divided by 1.05.
* Gated-GELU feed-forward ``w_out(gelu(w_0 x) * w_1 x)``.
* Input embedding ``E[id] / sqrt(d)``, then a rotation driven by the token's *sub-id* (which of several
  ``<unk>`` / ``<ans_N>`` / ``<option_N>`` strings it stands for), not by its position.
* One bucketed relative-position bias per forward, shared by all layers: T5-style buckets of the
  distance inside a segment, and a bucket per relation between two segments of the structured input.
* Prefix-LM masking: context tokens are seen by every token, answer tokens causally by answer tokens;
  tokens of different in-context samples or spans are kept apart; padding is masked on both sides and
  a query that sees no key outputs zeros.
* Logits over the vocabulary plus the per-batch ext table: ``[(h / sqrt(d)) @ E^T, h @ ext^T]`` where
  ``ext`` are the (scaled, rotated) embeddings of the ext-table entries.

Token structure. Besides ``input_ids``, CPM-Bee reads per-token structure produced by the structured
input format (``structured_cpmbee.py``): ``input_id_subs``, ``context``, ``segment_ids``,
``num_segments``, ``segment_rel_offset``, ``sample_ids``, ``span`` and ``attention_mask``, plus the
per-row ``segment_rel`` table and ext table. Like ``attention_mask`` in transformers, the per-token
structure tensors describe the *whole* sequence, cached tokens included, while ``input_ids`` /
``inputs_embeds`` hold only the tokens not yet in the cache. Every one of them is optional: without
them the model is a plain causal LM over one segment.

Positions are token indices. The original passes explicit positions (restarting at 0 for generated
tokens, 0 for left padding) but only ever uses them as differences inside one segment and to order
answer tokens, which token indices give identically.

Ids at or above ``vocab_size`` index the row's ext table: they are replaced by the table's
``(base id, sub-id)`` pair before embedding, so generated ext-table tokens can be fed straight back.
"""

import copy
import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from transformers import GenerationMixin, LogitsProcessor, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.loss.loss_utils import fixed_cross_entropy
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_cpmbee import CROSS_SAMPLE_BUCKET, CpmBeeConfig

logger = logging.get_logger(__name__)

RESIDUAL_SCALE = 1.05  # the original divides every residual sum by 1.05
SUB_ID_DISTANCE_SCALE = 16  # rotation angle per sub-id step, in units of the rotary frequencies
ROTARY_BASE = 10000


@dataclass(frozen=True)
class CpmBeeStructureInput:
    """How one of CPM-Bee's structure inputs is laid out and filled in.

    per_token: a `(batch, total_length)` tensor covering the cached tokens too (like `attention_mask`); otherwise a
        per-row table (`segment_rel`, the ext table).
    flag: a boolean tensor.
    plain_value: its value for a plain causal LM (one segment, every token an answer token), used where it is not
        given; None: optional, absent by default.
    generated_value: the value a generated token takes; `CONTINUES` for the last token's value; None where
        generate() does not extend it (per-row tables, and `attention_mask`, which transformers extends).
    """

    per_token: bool
    flag: bool = False
    plain_value: int | None = None
    generated_value: int | str | None = None


CONTINUES = "continues"  # a generated token continues the last token's segment and sample

# CPM-Bee's inputs beside `input_ids`: the one list of them, from which every other list and default derives.
# A generated token is an answer token (context 0) whose sub-id comes from the ext table through its id (so 0).
CPMBEE_STRUCTURE_INPUTS = {
    "input_id_subs": CpmBeeStructureInput(per_token=True, plain_value=0, generated_value=0),
    "attention_mask": CpmBeeStructureInput(per_token=True, flag=True, plain_value=1),
    "context": CpmBeeStructureInput(per_token=True, flag=True, plain_value=0, generated_value=0),
    "segment_ids": CpmBeeStructureInput(per_token=True, plain_value=0, generated_value=CONTINUES),
    "num_segments": CpmBeeStructureInput(per_token=True, plain_value=1, generated_value=CONTINUES),
    "segment_rel_offset": CpmBeeStructureInput(per_token=True, plain_value=0, generated_value=CONTINUES),
    "sample_ids": CpmBeeStructureInput(per_token=True, plain_value=0, generated_value=CONTINUES),
    "span": CpmBeeStructureInput(per_token=True, plain_value=0, generated_value=CONTINUES),
    "segment_rel": CpmBeeStructureInput(per_token=False, plain_value=0),
    "ext_table_ids": CpmBeeStructureInput(per_token=False),
    "ext_table_sub": CpmBeeStructureInput(per_token=False),
}
CPMBEE_INPUT_NAMES = ("input_ids", *CPMBEE_STRUCTURE_INPUTS)
CPMBEE_PER_TOKEN_INPUTS = ("input_ids", *(name for name, spec in CPMBEE_STRUCTURE_INPUTS.items() if spec.per_token))


FEW_ROWS = 16  # up to this many rows a projection is computed as W @ x^T on CPU (see `project`)


def project(linear: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """``linear(hidden_states)``, computed as ``(W @ x^T)^T`` when x has a few rows on CPU.

    Decoding multiplies a few rows by every weight. On CPU, ``x @ W^T`` with a small x (what ``nn.Linear`` computes)
    takes a GEMM path that streams the weight at a third of the speed of the same product written as ``W @ x^T``
    (7.8 vs 19 GB/s; 32 vs 4.6 ms for the 86,583-row LM head; docs/performance.md). Only an exact ``nn.Linear``
    without hooks takes the fast form: quantized and LoRA layers, and modules whose forward accelerate replaced,
    keep their own forward.
    """
    rows = hidden_states.shape[:-1].numel()
    if (
        rows > FEW_ROWS
        or hidden_states.device.type != "cpu"
        or type(linear) is not nn.Linear
        or linear._forward_hooks
        or linear._forward_pre_hooks
        or "forward" in linear.__dict__
    ):
        return linear(hidden_states)
    output = (linear.weight @ hidden_states.reshape(rows, -1).T).T.reshape(*hidden_states.shape[:-1], -1)
    return output if linear.bias is None else output + linear.bias


class CpmBeeRMSNorm(nn.Module):
    """RMS layer norm with a weight and no bias; the variance is computed in fp32."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        variance = hidden_states.to(torch.float32).pow(2).mean(dim=-1, keepdim=True)
        hidden_states = (hidden_states * torch.rsqrt(variance + self.eps)).to(input_dtype)
        return hidden_states * self.weight


def rotate_by_sub_ids(embeds: torch.Tensor, input_id_subs: torch.Tensor) -> torch.Tensor:
    """Rotary transform of the embeddings by the tokens' sub-ids (identity for sub-id 0).

    NeoX half-split rotation over the full hidden size, angle ``sub_id * 16 * inv_freq``, computed in the
    embeddings' dtype as the original does.
    """
    dim = embeds.shape[-1]
    inv_freq = 1.0 / (ROTARY_BASE ** (torch.arange(0, dim, 2, device=embeds.device, dtype=torch.float32) / dim))
    angles = (input_id_subs * SUB_ID_DISTANCE_SCALE).to(embeds.dtype)[..., None] * inv_freq.to(embeds.dtype)
    angles = torch.cat((angles, angles), dim=-1)
    half = dim // 2
    rotated_half = torch.cat((-embeds[..., half:], embeds[..., :half]), dim=-1)
    return embeds * angles.cos() + rotated_half * angles.sin()


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5-style bidirectional bucket of ``key_position - query_position``."""
    num_buckets //= 2
    buckets = (relative_position > 0).to(torch.int32) * num_buckets
    distance = relative_position.abs()
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # log(0) for the exact buckets is discarded by the `where` below
    bucket_if_large = max_exact + (
        torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).to(torch.int32)
    bucket_if_large = bucket_if_large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, distance.to(torch.int32), bucket_if_large)


class CpmBeeBucketPositionBias(nn.Module):
    """Per-head bias of every (query, key) pair, looked up from its bucket.

    Buckets ``[0, num_buckets)`` are distances inside one segment; bucket ``num_buckets + r - 1`` is segment
    relation ``r >= 1`` (relation 0 means "same segment" and uses the distance instead).
    """

    def __init__(self, config: CpmBeeConfig):
        super().__init__()
        self.num_buckets = config.position_bias_num_buckets
        self.max_distance = config.position_bias_max_distance
        self.relative_attention_bias = nn.Parameter(
            torch.empty(config.position_bias_num_buckets + config.position_bias_num_segment_buckets, config.num_heads)
        )

    def forward(self, bucket_ids: torch.Tensor) -> torch.Tensor:
        # (batch, len_q, len_k) -> (batch, heads, len_q, len_k)
        return F.embedding(bucket_ids, self.relative_attention_bias).permute(0, 3, 1, 2)


@dataclass
class CpmBeeTokens:
    """Structure of the tokens on one side of the (query, key) pairs: (batch, length) tensors, or any shape that
    broadcasts against the other side (the dense bias), or single gathered elements (FlexAttention's mods)."""

    position: torch.Tensor
    context: torch.Tensor
    segment: torch.Tensor
    sample: torch.Tensor
    span: torch.Tensor
    valid: torch.Tensor
    num_segments: torch.Tensor  # queries only: where their row of `segment_rel` starts and how wide it is
    rel_offset: torch.Tensor

    def map(self, function) -> "CpmBeeTokens":
        return CpmBeeTokens(**{name: function(value) for name, value in vars(self).items()})


def pair_visible(query: CpmBeeTokens, key: CpmBeeTokens) -> torch.Tensor:
    """Which keys a query attends to (the prefix-LM mask)."""
    # context keys are seen by everyone, answer keys only by the same and later answer tokens
    visible = key.context | (~query.context & (key.position <= query.position))
    # in-context samples (sample id > 0) see only themselves; the main sample (0) sees them all
    visible = visible & ((query.sample == 0) | (query.sample == key.sample))
    visible = visible & (query.span == key.span)
    return visible & query.valid & key.valid


def pair_buckets(
    query: CpmBeeTokens, key: CpmBeeTokens, segment_rel_at, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """Position-bias bucket of each (query, key) pair: the distance inside a segment (relation 0), else
    ``num_buckets + relation - 1`` with the relation looked up in the row's ``segment_rel`` by ``segment_rel_at``."""
    same_sample = (query.sample == key.sample) & (query.span == key.span)
    index = query.segment * query.num_segments + key.segment + query.rel_offset
    # pairs across samples are not in the table: keep the lookup in range, then use the reserved bucket
    relation = torch.where(same_sample, segment_rel_at(torch.where(same_sample, index, 0)), CROSS_SAMPLE_BUCKET)
    inside_segment = relative_position_bucket(key.position - query.position, num_buckets, max_distance)
    return torch.where(relation == 0, inside_segment, relation - 1 + num_buckets)


@functools.cache
def flex_attention_kernel(device: torch.device) -> Callable:
    """FlexAttention fused by torch.compile on GPUs; on CPU the unfused reference (compiling costs ~20 s there, and
    FlexAttention has no CPU backward anyway)."""
    return torch.compile(flex_attention, dynamic=False) if device.type == "cuda" else flex_attention


@dataclass
class CpmBeeFlexInputs:
    """What FlexAttention needs instead of the dense bias: the bias as a score function and the mask as blocks."""

    score_mod: Callable
    block_mask: BlockMask


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores scaled by ``1/sqrt(dim_head)`` plus the additive bias (position bias and mask), softmax in fp32."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling + attention_mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    attn_output = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return attn_output, probs


class CpmBeeAttention(nn.Module):
    def __init__(self, config: CpmBeeConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.dim_head = config.dim_head
        self.is_causal = False  # the mask is built from the structured input, never implied
        inner_dim = config.num_heads * config.dim_head
        self.project_q = nn.Linear(config.dim_model, inner_dim, bias=False)
        self.project_k = nn.Linear(config.dim_model, inner_dim, bias=False)
        self.project_v = nn.Linear(config.dim_model, inner_dim, bias=False)
        self.attention_out = nn.Linear(inner_dim, config.dim_model, bias=False)
        # CPM-Bee's Linear is x @ W^T / sqrt(d_in)
        self.input_scale = math.sqrt(config.dim_model)
        self.output_scale = math.sqrt(inner_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_bias: torch.Tensor,
        query_sees_keys: torch.Tensor,
        cache: Cache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length, _ = hidden_states.shape
        head_shape = (batch, length, self.num_heads, self.dim_head)
        query = (project(self.project_q, hidden_states) / self.input_scale).view(head_shape).transpose(1, 2)
        key = (project(self.project_k, hidden_states) / self.input_scale).view(head_shape).transpose(1, 2)
        value = (project(self.project_v, hidden_states) / self.input_scale).view(head_shape).transpose(1, 2)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        if isinstance(attention_bias, CpmBeeFlexInputs):
            if self.training and self.config.dropout_p:
                raise ValueError("flex_attention does not support attention dropout: use sdpa for training")
            attn_output = flex_attention_kernel(query.device)(
                query,
                key,
                value,
                score_mod=attention_bias.score_mod,
                block_mask=attention_bias.block_mask,
                scale=self.dim_head**-0.5,
            ).transpose(1, 2)
            attn_weights = None
        else:
            attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
            attn_output, attn_weights = attention_interface(
                self,
                query,
                key,
                value,
                attention_bias,
                dropout=self.config.dropout_p if self.training else 0.0,
                scaling=self.dim_head**-0.5,
                is_causal=False,
            )
        # the original zeroes the probabilities of masked keys, so a query that sees no key outputs zeros
        attn_output = attn_output.masked_fill(~query_sees_keys[:, :, None, None], 0.0)
        attn_output = attn_output.reshape(batch, length, -1)
        return project(self.attention_out, attn_output) / self.output_scale, attn_weights


class CpmBeeSelfAttentionBlock(nn.Module):
    def __init__(self, config: CpmBeeConfig, layer_idx: int):
        super().__init__()
        self.layernorm_before_attention = CpmBeeRMSNorm(config.dim_model, eps=config.eps)
        self.self_attention = CpmBeeAttention(config, layer_idx)
        self.dropout = nn.Dropout(config.dropout_p)

    def forward(self, hidden_states, attention_bias, query_sees_keys, cache=None):
        attn_output, attn_weights = self.self_attention(
            self.layernorm_before_attention(hidden_states), attention_bias, query_sees_keys, cache
        )
        hidden_states = (hidden_states + self.dropout(attn_output)) / RESIDUAL_SCALE
        return hidden_states, attn_weights


class CpmBeeDenseGatedACT(nn.Module):
    def __init__(self, config: CpmBeeConfig):
        super().__init__()
        self.w_0 = nn.Linear(config.dim_model, config.dim_ff, bias=False)
        self.w_1 = nn.Linear(config.dim_model, config.dim_ff, bias=False)
        self.act = nn.GELU()
        self.input_scale = math.sqrt(config.dim_model)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate = self.act(project(self.w_0, hidden_states) / self.input_scale)
        return gate * (project(self.w_1, hidden_states) / self.input_scale)


class CpmBeeFeedForward(nn.Module):
    def __init__(self, config: CpmBeeConfig):
        super().__init__()
        self.w_in = CpmBeeDenseGatedACT(config)
        self.dropout = nn.Dropout(config.dropout_p)
        self.w_out = nn.Linear(config.dim_ff, config.dim_model, bias=False)
        self.input_scale = math.sqrt(config.dim_ff)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.dropout(self.w_in(hidden_states))
        # scaled BEFORE the matmul (unlike every other projection): the dim_ff-wide sum would overflow fp16
        return project(self.w_out, hidden_states / self.input_scale)


class CpmBeeFFNBlock(nn.Module):
    def __init__(self, config: CpmBeeConfig):
        super().__init__()
        self.layernorm_before_ffn = CpmBeeRMSNorm(config.dim_model, eps=config.eps)
        self.ffn = CpmBeeFeedForward(config)
        self.dropout = nn.Dropout(config.dropout_p)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        ffn_output = self.ffn(self.layernorm_before_ffn(hidden_states))
        return (hidden_states + self.dropout(ffn_output)) / RESIDUAL_SCALE


class CpmBeeTransformerBlock(GradientCheckpointingLayer):
    """Self-attention block then feed-forward block; ``config.mask_modules`` may drop either."""

    def __init__(self, config: CpmBeeConfig, layer_idx: int):
        super().__init__()
        self.self_att = CpmBeeSelfAttentionBlock(config, layer_idx) if config.layer_has_attention(layer_idx) else None
        self.ffn = CpmBeeFFNBlock(config) if config.layer_has_ffn(layer_idx) else None

    def forward(self, hidden_states, attention_bias, query_sees_keys, cache=None):
        attn_weights = None
        if self.self_att is not None:
            hidden_states, attn_weights = self.self_att(hidden_states, attention_bias, query_sees_keys, cache)
        if self.ffn is not None:
            hidden_states = self.ffn(hidden_states)
        return hidden_states, attn_weights


class CpmBeeEncoder(nn.Module):
    def __init__(self, config: CpmBeeConfig):
        super().__init__()
        self.layers = nn.ModuleList([CpmBeeTransformerBlock(config, idx) for idx in range(config.num_layers)])
        self.output_layernorm = CpmBeeRMSNorm(config.dim_model, eps=config.eps)


# bitsandbytes' CPU 4-bit kernel (`bitsandbytes.functional._convert_weight_packed_for_cpu`) packs a weight's output
# rows in blocks of 32 and reshapes its scales per row of quantization blocks (64 inputs each, the blocksize of
# transformers' 4-bit layers), failing at the first forward on any other shape
BNB_CPU_4BIT_OUTPUT_BLOCK = 32
BNB_4BIT_BLOCKSIZE = 64


def loads_on_cpu(device_map) -> bool:
    """Whether `from_pretrained(..., device_map=device_map)` puts (some of) the model on the CPU."""
    if device_map is None or device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        return torch.accelerator.current_accelerator() is None
    places = device_map.values() if isinstance(device_map, dict) else [device_map]
    return any(isinstance(place, (str, torch.device)) and str(place).split(":")[0] == "cpu" for place in places)


class CpuFourBitLoadingMixin:
    """`from_pretrained` with a 4-bit `BitsAndBytesConfig` onto the CPU keeps the linear layers that bitsandbytes' CPU
    kernel cannot take (output size not a multiple of 32 or input size not a multiple of 64: tiny and custom models;
    the released sizes all fit) unquantized and names them in one log line, instead of failing inside bitsandbytes
    at the first forward."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        quantization = kwargs.get("quantization_config")
        if getattr(quantization, "load_in_4bit", False) and loads_on_cpu(kwargs.get("device_map")):
            kwargs["quantization_config"] = cls._without_cpu_4bit_misfits(pretrained_model_name_or_path, kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    @classmethod
    def _without_cpu_4bit_misfits(cls, pretrained_model_name_or_path, kwargs):
        from transformers.quantizers.base import get_keys_to_not_convert
        from transformers.quantizers.quantizers_utils import should_convert_module

        quantization = copy.deepcopy(kwargs["quantization_config"])
        config = kwargs.get("config")
        if not isinstance(config, PretrainedConfig):
            hub_options = ("subfolder", "revision", "cache_dir", "token", "local_files_only")
            config = cls.config_class.from_pretrained(
                pretrained_model_name_or_path, **{key: kwargs[key] for key in hub_options if key in kwargs}
            )
        with torch.device("meta"):
            model = cls(config)
        skipped = quantization.llm_int8_skip_modules
        skipped = list(get_keys_to_not_convert(model) if skipped is None else skipped)
        misfits = [
            name
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear)
            and (module.out_features % BNB_CPU_4BIT_OUTPUT_BLOCK or module.in_features % BNB_4BIT_BLOCKSIZE)
            and should_convert_module(name, skipped)
        ]
        if misfits:
            kinds = sorted({re.sub(r"\.\d+\.", ".*.", name) for name in misfits})
            logger.warning(
                f"4-bit on CPU: {len(misfits)} linear layers stay unquantized, since bitsandbytes' CPU 4-bit kernel "
                f"needs output sizes that are multiples of {BNB_CPU_4BIT_OUTPUT_BLOCK} and input sizes that are "
                f"multiples of {BNB_4BIT_BLOCKSIZE}: " + ", ".join(kinds)
            )
            quantization.llm_int8_skip_modules = skipped + misfits
        return quantization


class CpmBeePreTrainedModel(CpuFourBitLoadingMixin, PreTrainedModel):
    config_class = CpmBeeConfig
    config: CpmBeeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["CpmBeeTransformerBlock"]
    _supports_sdpa = True
    _supports_flash_attn = False  # the position bias cannot be passed to FlashAttention
    _supports_flex_attn = True
    _can_compile_fullgraph = False

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, CpmBeeBucketPositionBias):
            init.normal_(module.relative_attention_bias, mean=0.0, std=self.config.init_std)


@dataclass
class CpmBeeStructure:
    """Structure of the whole sequence (cached tokens included), with the plain causal LM's defaults filled in."""

    input_id_subs: torch.Tensor
    attention_mask: torch.Tensor
    context: torch.Tensor
    segment_ids: torch.Tensor
    num_segments: torch.Tensor
    segment_rel_offset: torch.Tensor
    sample_ids: torch.Tensor
    span: torch.Tensor
    segment_rel: torch.Tensor


class CpmBeeModel(CpmBeePreTrainedModel):
    def __init__(self, config: CpmBeeConfig):
        super().__init__(config)
        self.input_embedding = nn.Embedding(config.vocab_size, config.dim_model)
        self.position_bias = CpmBeeBucketPositionBias(config)
        self.encoder = CpmBeeEncoder(config)
        self.first_attention_layer = next(
            (idx for idx in range(config.num_layers) if config.layer_has_attention(idx)), None
        )
        self.post_init()

    def get_input_embeddings(self):
        return self.input_embedding

    def set_input_embeddings(self, value):
        self.input_embedding = value

    def embed_tokens(
        self,
        input_ids: torch.Tensor,
        input_id_subs: torch.Tensor | None = None,
        ext_table_ids: torch.Tensor | None = None,
        ext_table_sub: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``E[id] / sqrt(d)`` rotated by the sub-ids; ids >= vocab_size are looked up in the row's ext table."""
        input_ids = input_ids.long()
        input_id_subs = torch.zeros_like(input_ids) if input_id_subs is None else input_id_subs.long()
        if ext_table_ids is None or ext_table_ids.shape[-1] == 0:
            if input_ids.numel() and int(input_ids.max()) >= self.config.vocab_size:
                raise ValueError(
                    f"input id {int(input_ids.max())} is >= vocab_size ({self.config.vocab_size}) but no ext table was "
                    "given: pass the `ext_table_ids` / `ext_table_sub` the structured input produced"
                )
        else:
            is_ext = input_ids >= self.config.vocab_size
            ext_index = (input_ids - self.config.vocab_size).clamp(0, ext_table_ids.shape[-1] - 1)
            input_ids = torch.where(is_ext, ext_table_ids.long().gather(-1, ext_index), input_ids)
            input_id_subs = torch.where(is_ext, ext_table_sub.long().gather(-1, ext_index), input_id_subs)
        embeds = self.input_embedding(input_ids) / math.sqrt(self.config.dim_model)
        return rotate_by_sub_ids(embeds, input_id_subs)

    def _structure(self, batch, total_length, device, **given) -> CpmBeeStructure:
        filled = {}
        for name, spec in CPMBEE_STRUCTURE_INPUTS.items():
            if spec.plain_value is None:
                continue
            tensor = given[name]
            shape = (batch, total_length) if spec.per_token else (batch, 1)
            if tensor is None:
                tensor = torch.full(shape, spec.plain_value, dtype=torch.long, device=device)
            elif spec.per_token and tensor.shape != shape:
                raise ValueError(
                    f"`{name}` has shape {tuple(tensor.shape)}, expected {shape}: per-token structure tensors "
                    "describe the whole sequence, cached tokens included (like attention_mask)"
                )
            filled[name] = tensor.bool() if spec.flag else tensor.long()
        return CpmBeeStructure(**filled)

    def cached_lengths(self, cache: Cache | None, query_length: int) -> tuple[int, int]:
        """How many tokens the cache holds, and the keys' length (a static cache's preallocated slots included)."""
        if cache is None or self.first_attention_layer is None:
            return 0, query_length
        past_length = cache.get_seq_length(self.first_attention_layer)
        key_length, _ = cache.get_mask_sizes(query_length, self.first_attention_layer)
        return past_length, key_length

    def token_sides(
        self, structure: CpmBeeStructure, query_length: int, key_length: int
    ) -> tuple[CpmBeeTokens, CpmBeeTokens]:
        """The queries (the last ``query_length`` tokens) and the keys as (batch, length) tensors. ``key_length``
        may exceed the sequence (a static cache's preallocated slots): those keys are padding."""
        batch, total_length = structure.attention_mask.shape
        past_length = total_length - query_length
        positions = torch.arange(key_length, device=structure.attention_mask.device).expand(batch, -1)
        sides = dict(
            context=structure.context,
            segment=structure.segment_ids,
            sample=structure.sample_ids,
            span=structure.span,
            valid=structure.attention_mask,
            num_segments=structure.num_segments,
            rel_offset=structure.segment_rel_offset,
        )
        query = CpmBeeTokens(position=positions[:, past_length:total_length], **sides).map(
            lambda tensor: tensor[:, -query_length:]
        )
        key = CpmBeeTokens(position=positions, **sides).map(
            lambda tensor: F.pad(tensor, (0, key_length - tensor.shape[1]))
        )
        return query, key

    def attention_bias(
        self, structure: CpmBeeStructure, query_length: int, key_length: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Position bias plus prefix-LM mask as one additive (batch, heads, len_q, len_k) tensor, built once per
        forward and shared by all layers (eager and sdpa).

        Also returns which queries see at least one key (every real token sees itself); the others must output
        zeros.
        """
        query, key = self.token_sides(structure, query_length, key_length)
        pairs_query, pairs_key = query.map(lambda t: t[:, :, None]), key.map(lambda t: t[:, None, :])
        segment_rel = structure.segment_rel
        buckets = pair_buckets(
            pairs_query,
            pairs_key,
            lambda index: segment_rel.gather(1, index.flatten(1)).view_as(index),
            self.position_bias.num_buckets,
            self.position_bias.max_distance,
        )
        query_sees_keys = query.valid
        # let blind queries attend everywhere so no backend sees an all-masked row (NaN); their output is zeroed
        visible = pair_visible(pairs_query, pairs_key) | ~query_sees_keys[:, :, None]
        attention_bias = self.position_bias(buckets).to(dtype).masked_fill(~visible[:, None], torch.finfo(dtype).min)
        return attention_bias, query_sees_keys

    def flex_attention_inputs(
        self, structure: CpmBeeStructure, query_length: int, key_length: int
    ) -> tuple["CpmBeeFlexInputs", torch.Tensor]:
        """The same bias and mask for FlexAttention, without an L x L tensor: the bias is looked up inside the
        score function from the bucket table, and the mask is a block mask (same rules as `attention_bias`)."""
        query, key = self.token_sides(structure, query_length, key_length)
        segment_rel, table = structure.segment_rel, self.position_bias.relative_attention_bias
        num_buckets, max_distance = self.position_bias.num_buckets, self.position_bias.max_distance

        def score_mod(score, batch, head, query_index, key_index):
            pair_query = query.map(lambda tensor: tensor[batch, query_index])
            pair_key = key.map(lambda tensor: tensor[batch, key_index])
            bucket = pair_buckets(
                pair_query, pair_key, lambda index: segment_rel[batch, index], num_buckets, max_distance
            )
            return score + table[bucket, head]

        def mask_mod(batch, head, query_index, key_index):
            pair_query = query.map(lambda tensor: tensor[batch, query_index])
            pair_key = key.map(lambda tensor: tensor[batch, key_index])
            return pair_visible(pair_query, pair_key) | ~pair_query.valid

        block_mask = create_block_mask(
            mask_mod, query.valid.shape[0], None, query_length, key_length, device=query.valid.device
        )
        return CpmBeeFlexInputs(score_mod, block_mask), query.valid

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        input_id_subs: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        segment_ids: torch.LongTensor | None = None,
        num_segments: torch.LongTensor | None = None,
        segment_rel_offset: torch.LongTensor | None = None,
        segment_rel: torch.LongTensor | None = None,
        sample_ids: torch.LongTensor | None = None,
        span: torch.LongTensor | None = None,
        ext_table_ids: torch.LongTensor | None = None,
        ext_table_sub: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        r"""
        input_id_subs (`torch.LongTensor` of shape `(batch, total_length)`, *optional*):
            Sub-id of every token (which `<unk>`/`<ans_N>`/... string it stands for); rotates its embedding.
        context (`torch.Tensor` of shape `(batch, total_length)`, *optional*):
            1 for context tokens (seen by all tokens), 0 for answer tokens (seen causally). Defaults to 0.
        segment_ids, num_segments, segment_rel_offset, sample_ids, span (`(batch, total_length)`, *optional*):
            Structured-input bookkeeping: the token's segment, its sample's segment count and offset into
            `segment_rel`, its in-context sample and its span.
        segment_rel (`torch.LongTensor` of shape `(batch, rel_size)`, *optional*):
            Flattened `num_segments x num_segments` relation buckets of each sample, concatenated.
        ext_table_ids, ext_table_sub (`torch.LongTensor` of shape `(batch, ext_size)`, *optional*):
            The ext table: id `vocab_size + k` stands for `(ext_table_ids[:, k], ext_table_sub[:, k])`.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)

        batch, query_length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        device = (input_ids if input_ids is not None else inputs_embeds).device
        past_length, key_length = self.cached_lengths(cache, query_length)
        total_length = past_length + query_length

        structure = self._structure(
            batch,
            total_length,
            device,
            input_id_subs=input_id_subs,
            attention_mask=attention_mask,
            context=context,
            segment_ids=segment_ids,
            num_segments=num_segments,
            segment_rel_offset=segment_rel_offset,
            sample_ids=sample_ids,
            span=span,
            segment_rel=segment_rel,
        )
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(
                input_ids, structure.input_id_subs[:, past_length:], ext_table_ids, ext_table_sub
            )

        key_length = max(key_length, total_length)
        if self.config._attn_implementation == "flex_attention":
            attention_bias, query_sees_keys = self.flex_attention_inputs(structure, query_length, key_length)
        else:
            attention_bias, query_sees_keys = self.attention_bias(
                structure, query_length, key_length, inputs_embeds.dtype
            )

        hidden_states = inputs_embeds
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for layer in self.encoder.layers:
            hidden_states, _ = layer(hidden_states, attention_bias, query_sees_keys, cache=cache)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        hidden_states = self.encoder.output_layernorm(hidden_states)

        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
            hidden_states=all_hidden_states,
        )


SUPPRESSED_LOGIT = -10000.0  # what the original writes into the logits of ids a sample may not generate


class CpmBeeAnswerLogitsProcessor(LogitsProcessor):
    """CPM-Bee's decode-time processing of an answer's RAW logits, in the original beam search's order.

    1. Suppress the ids a sample may not generate (set to -10000): `<unk>` unless it stands for an
       out-of-vocabulary string of the sample, and ext-table columns of other samples of the batch.
    2. CTRL repetition penalty (positive logits divided, negative multiplied) on every token of the answer so far,
       its `<s>` included; a generated ext-table id is penalised as its base id, the id the original feeds back.
    3. Temperature.

    It must see raw logits: the penalty's sign test is lost on log-probabilities, which is what transformers' beam
    search hands to logits processors. `CpmBeeGenerationMixin` therefore applies it inside the forward pass.

    Args:
        answer_start (`torch.LongTensor` of shape `(batch,)`): index of each row's answer `<s>`.
        suppress_token_ids (`torch.LongTensor` of shape `(batch, n)`, *optional*): ids to suppress per row, -1 = none.
        ext_table_ids (`torch.LongTensor` of shape `(batch, ext_size)`, *optional*): base id of each ext-table entry.
        vocab_size (`int`): first ext-table id.
    """

    def __init__(
        self,
        answer_start: torch.Tensor,
        vocab_size: int,
        suppress_token_ids: torch.Tensor | None = None,
        ext_table_ids: torch.Tensor | None = None,
        repetition_penalty: float = 1.0,
        temperature: float = 1.0,
    ):
        if repetition_penalty <= 0 or temperature <= 0:
            raise ValueError(f"repetition_penalty ({repetition_penalty}) and temperature ({temperature}) must be > 0")
        self.answer_start = answer_start
        self.vocab_size = vocab_size
        self.suppress_token_ids = suppress_token_ids
        self.ext_table_ids = ext_table_ids
        self.repetition_penalty = repetition_penalty
        self.temperature = temperature

    def _per_row(self, tensor: torch.Tensor, rows: int) -> torch.Tensor:
        # generate() repeats every sample for its beams / returned sequences, consecutively
        return tensor.repeat_interleave(rows // tensor.shape[0], dim=0).to(self.answer_start.device)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows, width = scores.shape
        if self.suppress_token_ids is not None and self.suppress_token_ids.numel():
            suppressed = self._per_row(self.suppress_token_ids, rows).to(scores.device)
            mask = torch.zeros(rows, width + 1, dtype=torch.bool, device=scores.device)
            mask.scatter_(1, suppressed.masked_fill(suppressed < 0, width), True)  # -1 lands in the spare column
            scores = scores.masked_fill(mask[:, :width], SUPPRESSED_LOGIT)

        if self.repetition_penalty != 1.0:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            in_answer = positions[None, :] >= self._per_row(self.answer_start, rows).to(input_ids.device)[:, None]
            answer_ids = input_ids
            if self.ext_table_ids is not None and self.ext_table_ids.shape[-1] > 0:
                ext_ids = self._per_row(self.ext_table_ids, rows).to(input_ids.device)
                ext_index = (input_ids - self.vocab_size).clamp(0, ext_ids.shape[-1] - 1)
                answer_ids = torch.where(input_ids >= self.vocab_size, ext_ids.gather(1, ext_index), input_ids)
            # tokens outside the answer point at a spare column, dropped below
            answer_ids = answer_ids.masked_fill(~in_answer, width)
            padded = torch.cat([scores, scores.new_zeros(rows, 1)], dim=1)
            seen = padded.gather(1, answer_ids)
            penalised = torch.where(seen < 0, seen * self.repetition_penalty, seen / self.repetition_penalty)
            scores = padded.scatter(1, answer_ids, penalised)[:, :width]

        if self.temperature != 1.0:
            scores = scores / self.temperature
        return scores


class CpmBeeBeamCacheLayer(DynamicLayer):
    """A `DynamicLayer` for beam search that neither reallocates nor copies the whole cache per step.

    `DynamicLayer` appends with `torch.cat` and beam search reorders it with `index_select`: two fresh copies of every
    layer's keys and values per decode step (2 x 153 MB at L=2048 in the small benchmark model), landing in newly
    allocated memory, which is several times slower to write than touched memory on CPU. Here keys and values live in
    a buffer with headroom, new tokens are written in place, and a reorder copies only the rows whose beam changed
    (none while the beams keep their order). `keys` / `values` are views of the filled part.
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.buffers: list[torch.Tensor] = []
        self.length = 0
        self.is_initialized = True

    def _expose(self) -> None:
        self.keys, self.values = (buffer[:, :, : self.length] for buffer in self.buffers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        needed = self.length + key_states.shape[-2]
        if not self.buffers or needed > self.buffers[0].shape[-2]:
            capacity = needed + max(64, needed // 8)  # amortised growth: one copy per 1/8 of the length
            grown = []
            for old, states in zip(self.buffers or (None, None), (key_states, value_states)):
                buffer = states.new_empty(*states.shape[:2], capacity, states.shape[-1])
                if old is not None:
                    buffer[:, :, : self.length] = old[:, :, : self.length]
                grown.append(buffer)
            self.buffers = grown
        for buffer, states in zip(self.buffers, (key_states, value_states)):
            buffer[:, :, self.length : needed] = states
        self.length = needed
        self._expose()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def reset(self) -> None:
        self.buffers, self.length = [], 0
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.is_initialized:
            self.length = self.keys.shape[-2]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if not self.get_seq_length():
            return
        beam_idx = beam_idx.to(self.device)
        moved = (beam_idx != torch.arange(len(beam_idx), device=self.device)).nonzero().squeeze(1)
        if moved.numel():
            for buffer in self.buffers:
                # the right-hand side is gathered into a new tensor first, so overlapping rows are read before written
                buffer[moved, :, : self.length] = buffer[beam_idx[moved], :, : self.length]
        self._expose()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length():
            self.buffers = [buffer.repeat_interleave(repeats, dim=0) for buffer in self.buffers]
            self._expose()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length():
            self.buffers = [buffer[indices] for buffer in self.buffers]
            self._expose()


class CpmBeeGenerationMixin(GenerationMixin):
    """transformers' generate() for CPM-Bee inputs.

    * Carries the per-token structure across steps (`generated_value` in `CPMBEE_STRUCTURE_INPUTS`).
    * `repetition_penalty` and `temperature` (saved as `cpmbee_temperature` in a generation config, since
      transformers only accepts `temperature` with sampling) take the original's meaning: applied to the raw logits
      of the answer (the last segment) by [`CpmBeeAnswerLogitsProcessor`], together with the per-row
      `suppress_token_ids` the structured input provides. transformers' own penalty (on the whole prompt, and on
      log-probabilities in beam search) and temperature are switched off so that nothing is applied twice.
    """

    def generate(self, inputs=None, generation_config=None, suppress_token_ids=None, **kwargs):
        generation_config = copy.deepcopy(
            generation_config if generation_config is not None else self.generation_config
        )
        # transformers validates `temperature` as sampling-only, so a saved beam-search default lives in
        # `cpmbee_temperature`; an explicit `temperature=` argument wins
        temperature = kwargs.get("temperature") or getattr(generation_config, "cpmbee_temperature", None)
        model_kwargs = generation_config.update(**kwargs)
        temperature = temperature or generation_config.temperature or 1.0
        penalty = generation_config.repetition_penalty or 1.0
        if penalty != 1.0 or temperature != 1.0 or suppress_token_ids is not None:
            input_ids = inputs if inputs is not None else model_kwargs.get("input_ids")
            reference = input_ids if input_ids is not None else model_kwargs["inputs_embeds"][..., 0]
            segment_ids = model_kwargs.get("segment_ids")
            if segment_ids is None:
                answer_start = torch.zeros(reference.shape[0], dtype=torch.long, device=reference.device)
            else:
                # the answer is the last segment; its first token (the answer's <s>) starts the penalised span
                answer_start = (segment_ids == segment_ids[:, -1:]).long().argmax(dim=-1)
            model_kwargs["answer_logits_processor"] = CpmBeeAnswerLogitsProcessor(
                answer_start=answer_start,
                vocab_size=self.config.get_text_config().vocab_size,
                suppress_token_ids=suppress_token_ids,
                ext_table_ids=model_kwargs.get("ext_table_ids"),
                repetition_penalty=penalty,
                temperature=temperature,
            )
            generation_config.repetition_penalty = 1.0
            generation_config.temperature = 1.0
        if (generation_config.num_beams or 1) > 1 and inputs is None:
            self._prefill_once_for_all_beams(model_kwargs, generation_config.num_beams)
        return super().generate(inputs, generation_config=generation_config, **model_kwargs)

    # inputs that only the prompt's forward reads, which a model reading more than CPM-Bee's own inputs names
    # (CPM-Bee has none)
    _PROMPT_ONLY_INPUTS: tuple[str, ...] = ()

    def _validate_model_kwargs(self, model_kwargs: dict):
        # transformers checks model kwargs against forward()'s named parameters, and the structure inputs reach
        # forward() as keyword arguments
        super()._validate_model_kwargs(
            {name: value for name, value in model_kwargs.items() if name not in CPMBEE_STRUCTURE_INPUTS}
        )

    @torch.no_grad()
    def _prefill_once_for_all_beams(self, model_kwargs: dict, num_beams: int) -> None:
        """Run the prompt once and give every beam a copy of its cache, instead of letting beam search run one
        identical copy of the prompt per beam (measured: 3x less prefill time with 3 beams, docs/performance.md).
        The prompt's last token (the answer's `<s>`) is left for the search's first step, which needs its logits."""
        input_ids = model_kwargs.get("input_ids")
        if (
            input_ids is None
            or input_ids.shape[1] < 2
            or model_kwargs.get("inputs_embeds") is not None  # generate() feeds those itself
            or model_kwargs.get("cache") is not None
        ):
            return
        prompt = {
            name: value[:, :-1] if name in CPMBEE_PER_TOKEN_INPUTS else value
            for name, value in model_kwargs.items()
            if isinstance(value, torch.Tensor)
        }
        cache = DynamicCache(config=self.config.get_text_config())
        cache.layers = [CpmBeeBeamCacheLayer() for _ in cache.layers]
        self(**prompt, cache=cache, use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(num_beams)
        for name in self._PROMPT_ONLY_INPUTS:
            model_kwargs.pop(name, None)
        model_kwargs["cache"] = cache

    # Beam search: transformers' loop, with the original's two bookkeeping rules (`BeamHypotheses` and the candidate
    # loop of `VLLMCPMBeeBeamSearch._decode`) in the two helpers that hold them. docs/cpmbee.md "Beam search".

    def _update_finished_beams(self, *, next_token_hits_stopping_criteria, top_num_beam_mask, **kwargs):
        """Finish hypotheses as the original does.

        * **Which `</s>` candidates finish.** The original walks the `2 * num_beams` candidates best first, finishing
          each `</s>` and keeping each other token as a running beam, until `num_beams` beams run: a `</s>` finishes
          while fewer than `num_beams` unfinished candidates rank above it (transformers: only within the top
          `num_beams` ranks).
        * **When a sentence is done** (`early_stopping=False`): at the top of step `i` (0-based), once `num_beams`
          hypotheses are finished, `worst finished score >= best candidate score of step i / i ** length_penalty`.
          Then nothing more finishes. transformers' own test uses the best running score after the step and the
          length after it, which stops later than the original on short answers.
        """
        finishing = next_token_hits_stopping_criteria
        num_beams = kwargs["num_beams"]
        unfinished_ranked_above = torch.cumsum(~finishing, dim=-1) - (~finishing).long()
        finishing = finishing & (unfinished_ranked_above < num_beams)
        if kwargs["early_stopping"] is False:
            step = kwargs["cur_len"] - kwargs["decoder_prompt_len"]
            is_sent_finished = kwargs["is_sent_finished"]
            all_finished = is_sent_finished.all(dim=-1, keepdim=True)
            if step > 0 and all_finished.any():
                worst_finished = kwargs["beam_scores"].min(dim=-1, keepdim=True)[0]
                best_candidate = kwargs["topk_log_probs"][:, :1] / step ** kwargs["length_penalty"]
                done = all_finished & (worst_finished >= best_candidate)
                # the flag is the loop's own state from step to step: clearing it stops the sentence for good
                kwargs["is_early_stop_heuristic_unsatisfied"].logical_and_(~done)
        return super()._update_finished_beams(
            next_token_hits_stopping_criteria=finishing, top_num_beam_mask=torch.ones_like(top_num_beam_mask), **kwargs
        )

    @staticmethod
    def _check_early_stop_heuristic(is_early_stop_heuristic_unsatisfied, *, early_stopping, **kwargs):
        """With `early_stopping=False` a sentence stops only by the original's test, in `_update_finished_beams`."""
        if early_stopping is False:
            return is_early_stop_heuristic_unsatisfied
        return GenerationMixin._check_early_stop_heuristic(
            is_early_stop_heuristic_unsatisfied=is_early_stop_heuristic_unsatisfied,
            early_stopping=early_stopping,
            **kwargs,
        )

    def prepare_inputs_for_generation(self, input_ids, inputs_embeds=None, answer_logits_processor=None, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(input_ids, inputs_embeds=inputs_embeds, **kwargs)
        if answer_logits_processor is not None:
            model_inputs["logits_transform"] = functools.partial(answer_logits_processor, input_ids)
        return model_inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )
        for name, spec in CPMBEE_STRUCTURE_INPUTS.items():
            tensor = model_kwargs.get(name)
            if tensor is None or spec.generated_value is None:
                continue
            if spec.generated_value == CONTINUES:
                new_columns = tensor[:, -1:].expand(-1, num_new_tokens)
            else:
                new_columns = tensor.new_full((tensor.shape[0], num_new_tokens), spec.generated_value)
            model_kwargs[name] = torch.cat([tensor, new_columns], dim=-1)
        return model_kwargs


class CpmBeeForCausalLM(CpmBeePreTrainedModel, CpmBeeGenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.input_embedding.weight"}

    def __init__(self, config: CpmBeeConfig):
        super().__init__(config)
        self.model = CpmBeeModel(config)
        self.lm_head = nn.Linear(config.dim_model, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.input_embedding

    def set_input_embeddings(self, value):
        self.model.input_embedding = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def compute_logits(
        self,
        hidden_states: torch.Tensor,
        ext_table_ids: torch.Tensor | None = None,
        ext_table_sub: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits over the vocabulary and then the row's ext table: ``[(h / sqrt(d)) @ E^T, h @ ext^T]``."""
        logits = project(self.lm_head, hidden_states / math.sqrt(self.config.dim_model))
        if ext_table_ids is not None and ext_table_ids.shape[-1] > 0:
            # the ext embeddings already carry the 1/sqrt(d) of the input embedding, so h is not scaled again
            ext_embeds = self.model.embed_tokens(ext_table_ids, ext_table_sub).to(hidden_states.dtype)
            logits = torch.cat([logits, torch.einsum("bld,bed->ble", hidden_states, ext_embeds)], dim=-1)
        return logits

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int = 0,
        logits_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        The structure inputs (`attention_mask`, `context`, `segment_ids`, ... : the keys of
        `CPMBEE_STRUCTURE_INPUTS`) are keyword arguments passed on to [`CpmBeeModel.forward`], which documents them.

        labels (`torch.LongTensor` of shape `(batch, length)`, *optional*):
            Target of every position, ALREADY aligned with the logits (`labels[:, i]` is what position `i` must
            predict, -100 to ignore), as the CPM-Bee collator builds them: ext-table targets are `vocab_size + k`
            and an answer's last position targets `</s>`. No shift is applied.
        logits_to_keep (`int`, defaults to 0):
            Compute logits for the last `logits_to_keep` positions only (0 = all).
        logits_transform (`Callable`, *optional*):
            Applied to the raw logits of the last position; generate() passes CPM-Bee's decode-time processing here.
        """
        structure = {name: kwargs.get(name) for name in CPMBEE_STRUCTURE_INPUTS}
        outputs = self.model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **structure,
        )
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.compute_logits(hidden_states, structure["ext_table_ids"], structure["ext_table_sub"])
        if logits_transform is not None:
            logits = torch.cat([logits[:, :-1], logits_transform(logits[:, -1])[:, None]], dim=1)

        loss = None
        if labels is not None:
            # the mean over the labelled tokens; over those of the whole optimizer step (every micro-batch, every
            # process) when the Trainer passes their count, so that gradient accumulation and data parallelism
            # give the gradient of one big batch
            loss = fixed_cross_entropy(
                logits.float().flatten(0, 1),
                labels.to(logits.device).long().flatten(),
                num_items_in_batch=kwargs.get("num_items_in_batch"),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states
        )


__all__ = [
    "CpmBeeAnswerLogitsProcessor",
    "CpmBeeForCausalLM",
    "CpmBeeGenerationMixin",
    "CpmBeeModel",
    "CpmBeePreTrainedModel",
]
