# Copyright 2026 The viscpm authors. Licensed under the Apache License, Version 2.0.
"""CPM-Bee configuration.

Field names follow the original CPM-Bee JSON files (``config/cpm-bee-10b.json``), so an original
config loads with ``CpmBeeConfig(**json)``; ``attribute_map`` gives transformers' generic names.
"""

from transformers import PretrainedConfig

# Segment-relation bucket of token pairs from different in-context samples (or spans); relation buckets of one
# sample's segments skip it. Shared by the structured input format and the model.
CROSS_SAMPLE_BUCKET = 1


class CpmBeeConfig(PretrainedConfig):
    r"""
    Configuration of a CPM-Bee language model ([`CpmBeeModel`], [`CpmBeeForCausalLM`]). The defaults
    describe CPM-Bee 10B, the language model of VisCPM-Chat and VisCPM-Paint.

    Args:
        vocab_size (`int`, defaults to 86583): rows of the token embedding (the ext table comes on top, per batch).
        dim_model (`int`, defaults to 4096): hidden size.
        num_heads (`int`, defaults to 32): attention heads.
        dim_head (`int`, defaults to 128): size of one head; `num_heads * dim_head` may differ from `dim_model`.
        dim_ff (`int`, defaults to 10240): inner size of the gated-GELU feed-forward.
        num_layers (`int`, defaults to 48): transformer blocks.
        dropout_p (`float`, defaults to 0.0): dropout on attention probabilities and block outputs.
        position_bias_num_buckets (`int`, defaults to 256): buckets of the relative position inside a segment.
        position_bias_num_segment_buckets (`int`, defaults to 256): buckets of the relation between two segments.
        position_bias_max_distance (`int`, defaults to 2048): distance at which position buckets saturate.
        eps (`float`, defaults to 1e-6): epsilon of the RMS layer norms.
        mask_modules (`list[tuple[bool, bool]]`, *optional*): per layer, `(drop attention, drop feed-forward)`.
        init_std (`float`, defaults to 1.0): std of the normal init of weights (the original inits with std 1 and
            keeps activations in range with its 1/sqrt(d_in) scales).
    """

    model_type = "cpmbee"
    attribute_map = {
        "hidden_size": "dim_model",
        "num_attention_heads": "num_heads",
        "num_hidden_layers": "num_layers",
        "intermediate_size": "dim_ff",
        "head_dim": "dim_head",
    }

    def __init__(
        self,
        vocab_size: int = 86583,
        dim_model: int = 4096,
        num_heads: int = 32,
        dim_head: int = 128,
        dim_ff: int = 10240,
        num_layers: int = 48,
        dropout_p: float = 0.0,
        position_bias_num_buckets: int = 256,
        position_bias_num_segment_buckets: int = 256,
        position_bias_max_distance: int = 2048,
        eps: float = 1e-6,
        mask_modules: list | None = None,
        init_std: float = 1.0,
        use_cache: bool = True,
        bos_token_id: int = 6,
        eos_token_id: int = 7,
        pad_token_id: int = 0,
        tie_word_embeddings: bool = True,
        **kwargs,
    ):
        if mask_modules is not None:
            if len(mask_modules) != num_layers or any(len(pair) != 2 for pair in mask_modules):
                raise ValueError(
                    f"mask_modules must hold one (mask_attention, mask_ffn) pair per layer ({num_layers}), "
                    f"got {mask_modules!r}"
                )
            mask_modules = [[bool(mask_att), bool(mask_ffn)] for mask_att, mask_ffn in mask_modules]
        self.vocab_size = vocab_size
        self.dim_model = dim_model
        self.num_heads = num_heads
        self.dim_head = dim_head
        self.dim_ff = dim_ff
        self.num_layers = num_layers
        self.dropout_p = dropout_p
        self.position_bias_num_buckets = position_bias_num_buckets
        self.position_bias_num_segment_buckets = position_bias_num_segment_buckets
        self.position_bias_max_distance = position_bias_max_distance
        self.eps = eps
        self.mask_modules = mask_modules
        self.init_std = init_std
        self.use_cache = use_cache
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def layer_has_attention(self, layer_idx: int) -> bool:
        return self.mask_modules is None or not self.mask_modules[layer_idx][0]

    def layer_has_ffn(self, layer_idx: int) -> bool:
        return self.mask_modules is None or not self.mask_modules[layer_idx][1]


__all__ = ["CpmBeeConfig"]
