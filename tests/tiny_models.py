"""Tiny random models, configs and vocabularies, shared by the test files (as transformers' model testers)."""

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler
from PIL import Image
from torch import nn

from viscpm import (
    Beit3VisionConfig,
    CpmBeeConfig,
    CpmBeeForCausalLM,
    VisCPMChatConfig,
    VisCPMChatForConditionalGeneration,
)
from viscpm.experiments.mpm_mini import CHATML, SPECIAL_TOKENS
from viscpm.modeling.configuration_viscpm_paint import VisCPMPaintConfig
from viscpm.modeling.image_processing_viscpm_chat import VisCPMChatImageProcessor
from viscpm.modeling.modeling_beit3 import Beit3VisionModel
from viscpm.modeling.modeling_viscpm_paint import VisCPMPaintModel, VisCPMPaintTextEncoder
from viscpm.modeling.pipeline_viscpm_paint import VisCPMPaintPipeline
from viscpm.modeling.processing_viscpm_chat import VisCPMChatProcessor
from viscpm.modeling.tokenization_cpmbee import CpmBeeTokenizer


def tiny_vocab(*words: str) -> list[str]:
    """CPM-Bee's special tokens, then `words`: a token's id is its index."""
    return [*SPECIAL_TOKENS, *words]


def write_vocab(folder: Path, tokens: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "vocab.txt"
    path.write_text("\n".join(tokens), encoding="utf-8")
    return path


def tiny_tokenizer(folder: Path, *words: str) -> CpmBeeTokenizer:
    return CpmBeeTokenizer(vocab_file=str(write_vocab(folder, tiny_vocab(*words))))


CHAT_WORDS = ("image", "context", "question", "User", "AI", ":", "a", "b", "c", "?", "what", "<", ">")
PAINT_WORDS = ("caption", "objects", "a", "b", "c", "red", "cat", "dog", "<", ">")


def tiny_cpmbee_config(vocab_size: int, **overrides) -> CpmBeeConfig:
    values = dict(
        vocab_size=vocab_size,
        dim_model=32,
        num_heads=2,
        dim_head=16,
        dim_ff=64,
        num_layers=2,
        position_bias_num_buckets=32,
        position_bias_num_segment_buckets=32,
        position_bias_max_distance=64,
    )
    return CpmBeeConfig(**(values | overrides))


TINY_VOCAB_SIZE = 97  # a vocabulary without a tokenizer: CPM-Bee on random ids


def tiny_causal_lm(seed=0, **overrides) -> CpmBeeForCausalLM:
    torch.manual_seed(seed)
    return CpmBeeForCausalLM(tiny_cpmbee_config(TINY_VOCAB_SIZE, **overrides)).eval()


def structured_prompt(prompt_lengths=(4, 5), answer_length=3, ext_size=2, seed=0) -> dict:
    """One sample of three segments: two context segments, then an answer segment (context 0).

    The segment relations are random buckets (0 on the diagonal: same segment); the answer holds one ext-table id.
    """
    generator = torch.Generator().manual_seed(seed)
    lengths = list(prompt_lengths) + [answer_length]
    total = sum(lengths)
    segment_ids = torch.cat([torch.full((n,), index) for index, n in enumerate(lengths)])
    num_segments = len(lengths)
    relation = torch.randint(2, 30, (num_segments, num_segments), generator=generator)
    relation.fill_diagonal_(0)
    input_ids = torch.randint(0, TINY_VOCAB_SIZE, (total,), generator=generator)
    input_ids[-1] = TINY_VOCAB_SIZE + ext_size - 1  # an ext-table token
    return dict(
        input_ids=input_ids[None],
        input_id_subs=torch.randint(0, 3, (1, total), generator=generator),
        context=(segment_ids < len(prompt_lengths))[None].long(),
        segment_ids=segment_ids[None],
        num_segments=torch.full((1, total), num_segments),
        segment_rel_offset=torch.zeros(1, total, dtype=torch.long),
        sample_ids=torch.zeros(1, total, dtype=torch.long),
        segment_rel=relation.flatten()[None],
        ext_table_ids=torch.randint(0, TINY_VOCAB_SIZE, (1, ext_size), generator=generator),
        ext_table_sub=torch.randint(1, 4, (1, ext_size), generator=generator),
    )


STRUCTURED_PER_TOKEN = ("input_id_subs", "context", "segment_ids", "num_segments", "segment_rel_offset", "sample_ids")


TINY_VISION = dict(
    hidden_size=32,
    num_attention_heads=2,
    intermediate_size=64,
    num_hidden_layers=2,
    image_size=32,
    patch_size=16,
    max_source_positions=16,
)


def tiny_vision_tower(attn_implementation="eager", seed=0, **overrides) -> Beit3VisionModel:
    """A tiny tower with every parameter random (LayerNorm weights and biases too), so no expert is an identity."""
    config = Beit3VisionConfig(**{**TINY_VISION, **overrides})
    config._attn_implementation = attn_implementation
    model = Beit3VisionModel(config).eval()
    assert model.config._attn_implementation == attn_implementation
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.add_(1.0)
    return model


CHAT_QUERY_NUM = 4
CHAT_MAX_PROMPT_LENGTH = 80


def tiny_chat_with(tokenizer: CpmBeeTokenizer):
    """A random tiny VisCPM-Chat over `tokenizer`'s vocabulary, and its processor."""
    config = VisCPMChatConfig(
        vision_config=Beit3VisionConfig(**TINY_VISION),
        text_config=tiny_cpmbee_config(tokenizer.vocab_size),
        query_num=CHAT_QUERY_NUM,
        max_prompt_length=CHAT_MAX_PROMPT_LENGTH,
    )
    model = VisCPMChatForConditionalGeneration(config).eval()
    image_processor = VisCPMChatImageProcessor(size={"height": 32, "width": 32})
    processor = VisCPMChatProcessor(
        image_processor, tokenizer, query_num=CHAT_QUERY_NUM, max_prompt_length=CHAT_MAX_PROMPT_LENGTH
    )
    return model, processor


def tiny_chat(tmp_path: Path, seed: int = 0):
    torch.manual_seed(seed)
    return tiny_chat_with(tiny_tokenizer(tmp_path, *CHAT_WORDS))


PIVOT_WORDS = [
    "user",
    "assistant",
    "system",
    "User",
    "AI",
    ":",
    "?",
    ".",
    "what",
    "is",
    "it",
    "a",
    "b",
    "c",
    "red",
    "green",
    "blue",
    "black",
    "circle",
    "and",
    "now",
]


def tiny_pivot_tokenizer(kind: str):
    """A word-level fast tokenizer for a tiny pivot of ``kind`` (`qwen2`: ChatML template, others: none)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: index for index, token in enumerate([*specials, *PIVOT_WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    eos = "<|im_end|>" if kind == "qwen2" else "</s>"
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token=eos,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHATML if kind == "qwen2" else None,
    )


def tiny_pivot_chat(kind: str, seed: int = 0):
    """VisCPM-Chat on a tiny random pivot of ``kind`` (`llama`, `qwen2`, or `gpt2`: absolute positions), and its
    processor."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    tokenizer = tiny_pivot_tokenizer(kind)
    special = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    if kind == "gpt2":
        text_config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=256, **special)
    else:
        text_config = {"llama": LlamaConfig, "qwen2": Qwen2Config}[kind](
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **special,
        )
    config = VisCPMChatConfig(vision_config=Beit3VisionConfig(**TINY_VISION), text_config=text_config, query_num=4)
    model = VisCPMChatForConditionalGeneration(config).eval()
    processor = VisCPMChatProcessor(VisCPMChatImageProcessor(size={"height": 32, "width": 32}), tokenizer, query_num=4)
    return model, processor


def tiny_image(seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (40, 48, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


TINY_UNET = {
    "sample_size": 4,
    "block_out_channels": [32, 32],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "attention_head_dim": [2, 2],
    "cross_attention_dim": 16,
    "use_linear_projection": True,
}


def tiny_pipeline(tmp_path: Path, with_vae: bool = True, seed: int = 0) -> VisCPMPaintPipeline:
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(tmp_path, *PAINT_WORDS)
    config = VisCPMPaintConfig(
        text_config=tiny_cpmbee_config(tokenizer.vocab_size), unet_config=TINY_UNET, max_prompt_length=40
    )
    model = VisCPMPaintModel(config).eval()
    text_encoder = VisCPMPaintTextEncoder(config).eval()
    text_encoder.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("unet.")})
    vae = None
    if with_vae:
        vae = AutoencoderKL(
            block_out_channels=[32, 32],
            down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2,
            latent_channels=4,
            layers_per_block=1,
            sample_size=8,
        ).eval()
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    pipeline = VisCPMPaintPipeline(text_encoder, tokenizer, model.unet, scheduler, vae=vae)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
