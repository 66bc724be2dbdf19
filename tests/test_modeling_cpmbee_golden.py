"""CPM-Bee against the original implementation's outputs in the golden folder.

The weights are the original tiny checkpoints, read by the same conversion code users run
(`viscpm.conversion.checkpoint`). Inputs are the exact tensors the original fed; where its input
embeddings carry vision states, the golden vision states are placed at the image bound, as the
original's scatter does. Tolerances are the manifest's: hidden states and logits rtol=1e-4 atol=1e-4,
argmax / top-10 ids exact.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import DynamicCache

from conftest import golden_cases, load_json
from original_checkpoints import load_original_cpmbee, read_original_checkpoint
from viscpm.conversion.cpmbee import cpmbee_config_from_original
from viscpm.modeling.modeling_cpmbee import CpmBeeForCausalLM
from viscpm.modeling.structured_cpmbee import CpmBeeCollator, build_generation_batch, encode_structured
from viscpm.modeling.tokenization_cpmbee import CpmBeeTokenizer

pytestmark = pytest.mark.golden

ATOL = RTOL = 1e-4


def only_checkpoint(folder: Path) -> Path:
    checkpoints = sorted(folder.glob("*.pt"))
    assert len(checkpoints) == 1, f"expected one original checkpoint (*.pt) in {folder}, found {checkpoints}"
    return checkpoints[0]


def load_golden_cpmbee(folder: Path, attn_implementation: str = "eager") -> CpmBeeForCausalLM:
    config = cpmbee_config_from_original(load_json(folder / "config.json")["cpmbee"])
    config._attn_implementation = attn_implementation
    model = CpmBeeForCausalLM(config).eval()
    load_original_cpmbee(model.model, read_original_checkpoint(only_checkpoint(folder)))
    return model


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def chat_llm(request, golden_dir):
    return load_golden_cpmbee(golden_dir / "chat", request.param)


@pytest.fixture(scope="module")
def paint_llm(golden_dir):
    return load_golden_cpmbee(golden_dir / "paint")


def batch_table(table: torch.Tensor, batch: int) -> torch.Tensor:
    """The original's batch-level ext table (1D), as the per-row table our model takes."""
    return table[None].expand(batch, -1)


def place_vision_states(embeds, vision_states, image_bound):
    """The original's scatter: row b's image placeholder positions get that row's vision states."""
    embeds = embeds.clone()
    for row, bounds in enumerate(image_bound):
        for start, end in bounds.tolist():
            embeds[row, start:end] = vision_states[row]
    return embeds


def assert_close(actual, expected, name, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def assert_logits_match(logits: torch.Tensor, golden: dict, prefix: str):
    """Compare (rows, columns) logits with the manifest's summaries stored under ``prefix``."""
    assert logits.shape[-1] > int(golden[f"{prefix}.slice_cols"].max()), f"{prefix}: too few logit columns"
    assert torch.equal(logits.argmax(-1), golden[f"{prefix}.argmax"]), f"{prefix}.argmax differs"
    top_values, top_ids = logits.topk(golden[f"{prefix}.top10_ids"].shape[-1], dim=-1)
    assert torch.equal(top_ids, golden[f"{prefix}.top10_ids"]), f"{prefix}.top10_ids differ"
    assert_close(top_values, golden[f"{prefix}.top10_values"], f"{prefix}.top10_values")
    assert_close(logits.logsumexp(-1), golden[f"{prefix}.logsumexp"], f"{prefix}.logsumexp")
    assert_close(logits.mean(-1), golden[f"{prefix}.mean"], f"{prefix}.mean")
    assert_close(logits.std(-1), golden[f"{prefix}.std"], f"{prefix}.std")
    assert_close(logits[:, golden[f"{prefix}.slice_cols"]], golden[f"{prefix}.slice_values"], f"{prefix}.slice_values")


def structure_from_collated(batch: dict, prefix: str) -> dict:
    """Model inputs from a batch collated by the original CPMBeeCollater (right padded, `length`)."""
    input_ids = batch[f"{prefix}input_ids"]
    rows, length = input_ids.shape
    return dict(
        input_id_subs=batch[f"{prefix}input_id_subs"],
        attention_mask=torch.arange(length)[None, :] < batch[f"{prefix}length"][:, None],
        context=batch[f"{prefix}context"],
        segment_ids=batch[f"{prefix}segment_ids"],
        num_segments=batch[f"{prefix}num_segments"],
        segment_rel_offset=batch[f"{prefix}segment_rel_offset"],
        segment_rel=batch[f"{prefix}segment_rel"],
        sample_ids=batch[f"{prefix}sample_ids"],
        span=batch[f"{prefix}span"],
        ext_table_ids=batch_table(batch[f"{prefix}ext_table_ids"], rows),
        ext_table_sub=batch_table(batch[f"{prefix}ext_table_sub"], rows),
    )


def teacher_forcing_cases(folder: Path) -> list[str]:
    return [case["name"] for case in load_json(folder / "chat" / "forward_teacher_forcing.json")]


@golden_cases("case", teacher_forcing_cases, ids=str)
def test_teacher_forced_forward(chat_llm, golden_dir, case):
    golden = load_file(golden_dir / "chat" / "forward_teacher_forcing.safetensors")
    inputs = structure_from_collated(golden, f"{case}.in.")
    embeds = chat_llm.model.embed_tokens(
        golden[f"{case}.in.input_ids"], inputs["input_id_subs"], inputs["ext_table_ids"], inputs["ext_table_sub"]
    )
    embeds = place_vision_states(embeds, golden[f"{case}.vision_hidden_states"], golden[f"{case}.in.image_bound"])
    target = golden[f"{case}.target"]

    captured = []
    hook = chat_llm.model.position_bias.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        with torch.no_grad():
            outputs = chat_llm(
                inputs_embeds=embeds, labels=target, output_hidden_states=True, use_cache=False, **inputs
            )
    finally:
        hook.remove()
    (position_bias,) = captured  # computed once per forward, shared by all layers
    assert_close(position_bias, golden[f"{case}.position_bias"], "position_bias")
    for layer, expected in enumerate(golden[f"{case}.layer_outputs"]):
        assert_close(outputs.hidden_states[layer + 1], expected, f"layer_outputs[{layer}]")
    assert_close(
        chat_llm.model.encoder.output_layernorm(outputs.hidden_states[-1]),
        golden[f"{case}.hidden_states"],
        "hidden_states",
    )
    logits = outputs.logits[0]
    assert_logits_match(logits, golden, f"{case}.logits")
    first_answer_row = int(torch.nonzero(target[0] != -100)[0])
    assert_close(logits[first_answer_row], golden[f"{case}.logits_full_first_answer_row"], "first answer row")
    positions = golden[f"{case}.target_positions"]
    assert_close(logits[positions, target[0, positions].long()], golden[f"{case}.target_logits"], "target_logits")
    torch.testing.assert_close(outputs.loss, golden[f"{case}.loss"], rtol=1e-5, atol=0)


@torch.no_grad()
def test_teacher_forced_logits_with_flex_attention(golden_dir):
    """FlexAttention (bias inside the score function, block mask) gives the original's logits too."""
    model = load_golden_cpmbee(golden_dir / "chat", "flex_attention")
    golden = load_file(golden_dir / "chat" / "forward_teacher_forcing.safetensors")
    for case in teacher_forcing_cases(golden_dir):
        inputs = structure_from_collated(golden, f"{case}.in.")
        embeds = model.model.embed_tokens(
            golden[f"{case}.in.input_ids"], inputs["input_id_subs"], inputs["ext_table_ids"], inputs["ext_table_sub"]
        )
        embeds = place_vision_states(embeds, golden[f"{case}.vision_hidden_states"], golden[f"{case}.in.image_bound"])
        outputs = model(inputs_embeds=embeds, labels=golden[f"{case}.target"], use_cache=False, **inputs)
        assert_logits_match(outputs.logits[0], golden, f"{case}.logits")
        torch.testing.assert_close(outputs.loss, golden[f"{case}.loss"], rtol=1e-5, atol=0)


def inference_cases(folder: Path) -> list[str]:
    return [case["case"] for case in load_json(folder / "chat" / "inference_steps.json")]


@golden_cases("case", inference_cases, ids=str)
def test_prefill_and_decode_steps_with_kv_cache(chat_llm, golden_dir, case):
    """Prefill the prompt, then feed the decode steps one token at a time through a transformers cache.

    The original feeds generated tokens with context=1 and positions restarting at 0; here they are answer tokens
    (context 0) at their token index, which sees exactly the same keys with the same relative positions.
    """
    golden = load_file(golden_dir / "chat" / "inference_steps.safetensors")
    steps = next(entry for entry in load_json(golden_dir / "chat" / "inference_steps.json") if entry["case"] == case)
    prefix = f"{case}.in."
    input_ids = golden[f"{prefix}input_ids"]
    rows = input_ids.shape[0]
    ext = dict(
        ext_table_ids=batch_table(golden[f"{prefix}batch_ext_table_ids"], rows),
        ext_table_sub=batch_table(golden[f"{prefix}batch_ext_table_sub"], rows),
    )
    structure = dict(
        input_id_subs=golden[f"{prefix}input_id_subs"],
        attention_mask=golden[f"{prefix}num_segments"] != 0,
        context=golden[f"{prefix}context"],
        segment_ids=golden[f"{prefix}segment_ids"],
        num_segments=golden[f"{prefix}num_segments"],
        segment_rel_offset=golden[f"{prefix}segment_rel_offset"],
        sample_ids=golden[f"{prefix}sample_idx"],
    )
    embeds = chat_llm.model.embed_tokens(input_ids, structure["input_id_subs"], **ext)
    embeds = place_vision_states(embeds, golden[f"{case}.vision_hidden_states"], golden[f"{prefix}image_bound"])
    assert_close(embeds, golden[f"{case}.vllm_embedding"], "vllm_embedding")

    cache = DynamicCache(config=chat_llm.config)

    def forward_with_cache(**new_tokens):
        with torch.no_grad():
            outputs = chat_llm(
                segment_rel=golden[f"{prefix}segment_rel"],
                cache=cache,
                use_cache=True,
                output_hidden_states=True,
                **new_tokens,
                **structure,
                **ext,
            )
        return outputs, chat_llm.model.encoder.output_layernorm(outputs.hidden_states[-1])

    outputs, hidden = forward_with_cache(inputs_embeds=embeds)
    assert_close(hidden, golden[f"{case}.prefill.hidden"], "prefill.hidden")
    assert_logits_match(outputs.logits[0], golden, f"{case}.prefill.logits")
    for layer, cached in enumerate(cache.layers):
        assert_close(cached.keys, golden[f"{case}.prefill.buffer.{layer}.k"], f"prefill.buffer.{layer}.k")
        assert_close(cached.values, golden[f"{case}.prefill.buffer.{layer}.v"], f"prefill.buffer.{layer}.v")

    step_logits = []
    for step in steps["steps"]:
        fed = {
            "input_id_subs": step["fed_sub"],
            "attention_mask": 1,
            "context": 0,
            "segment_ids": step["fed_segment"],
            "num_segments": None,
            "segment_rel_offset": None,
            "sample_ids": None,
        }
        for name, value in fed.items():
            last = structure[name][:, -1:]
            structure[name] = torch.cat([structure[name], last if value is None else torch.full_like(last, value)], 1)
        outputs, hidden = forward_with_cache(input_ids=torch.full((rows, 1), step["fed_token"]))
        assert_close(hidden, golden[f"{case}.step{step['step']}.hidden"], f"step{step['step']}.hidden")
        assert int(outputs.logits[0, -1].argmax()) == step["argmax_raw_id"]
        step_logits.append(outputs.logits[0, -1])
    step_logits = torch.stack(step_logits)
    assert_logits_match(step_logits, golden, f"{case}.steps.logits")
    assert_close(step_logits[0], golden[f"{case}.step0.logits_full"], "step0.logits_full")
    for layer, cached in enumerate(cache.layers):
        assert_close(cached.keys, golden[f"{case}.final.buffer.{layer}.k"], f"final.buffer.{layer}.k")
        assert_close(cached.values, golden[f"{case}.final.buffer.{layer}.v"], f"final.buffer.{layer}.v")
    # the cache holds exactly the tokens the original's buffer holds
    assert cache.get_seq_length() == golden[f"{case}.final.buffer_position"].shape[1]


def test_training_batch_loss(chat_llm, golden_dir):
    golden = load_file(golden_dir / "chat" / "train_batch.safetensors")
    inputs = structure_from_collated(golden, "batch.")
    embeds = chat_llm.model.embed_tokens(
        golden["batch.input_ids"], inputs["input_id_subs"], inputs["ext_table_ids"], inputs["ext_table_sub"]
    )
    embeds = place_vision_states(embeds, golden["vision_hidden_states"], golden["batch.image_bound"])
    target = golden["batch.target"].long()
    with torch.no_grad():
        outputs = chat_llm(inputs_embeds=embeds, labels=target, output_hidden_states=True, use_cache=False, **inputs)

    final_hidden = chat_llm.model.encoder.output_layernorm(outputs.hidden_states[-1])
    assert_close(final_hidden, golden["hidden_states"], "hidden_states")
    torch.testing.assert_close(outputs.loss, golden["loss"], rtol=1e-5, atol=0)
    per_token = torch.nn.functional.cross_entropy(
        outputs.logits.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="none"
    ).view_as(target)
    assert_close(per_token, golden["per_token_loss"], "per_token_loss", atol=1e-4, rtol=1e-5)
    at_targets = outputs.logits.flatten(0, 1)[target.flatten() != -100]
    assert_logits_match(at_targets, golden, "logits_at_targets")
    target_logit = at_targets.gather(1, target.flatten()[target.flatten() != -100][:, None])[:, 0]
    assert_close(target_logit, golden["logits_at_targets.target_logit"], "target_logit")


def paint_text_cases(folder: Path) -> list[str]:
    golden = load_file(folder / "paint" / "text_hidden.safetensors")
    return sorted({name.split(".in.")[0] for name in golden if name.endswith(".in.segment_rel")})


@golden_cases("case", paint_text_cases, ids=str)
def test_paint_text_hidden_states(paint_llm, golden_dir, case):
    """Paint's text encoder output: the final normed hidden states at ALL positions, padding included."""
    golden = load_file(golden_dir / "paint" / "text_hidden.safetensors")
    inputs = structure_from_collated(golden, f"{case}.in.")
    with torch.no_grad():
        hidden = paint_llm.model(input_ids=golden[f"{case}.in.input_ids"], use_cache=False, **inputs).last_hidden_state
    assert_close(hidden, golden[f"{case}.text_hidden_states"], "text_hidden_states")


def test_golden_layout_is_complete(golden_dir):
    """Guard against silently testing nothing: every parametrized list above found cases."""
    assert teacher_forcing_cases(golden_dir) and inference_cases(golden_dir) and paint_text_cases(golden_dir)
    assert json.loads((golden_dir / "chat" / "config.json").read_text())["cpmbee"]["num_layers"] > 0


# End to end: our structured-input code builds the inputs, our model runs them.


@pytest.fixture(scope="module")
def tokenizer(golden_dir):
    return CpmBeeTokenizer(vocab_file=str(golden_dir / "vocab" / "bee.txt"))


def paint_text_batches(tokenizer, prompt: str, negative_prompt: str | None) -> list[dict]:
    """The original VisCPM-Paint text input: `{'caption': prompt, 'objects': ''}` and its unconditional twin, each
    collated on its own but padded (right) to the longer of the two."""
    samples = [
        encode_structured(tokenizer, {"caption": caption, "objects": ""}).to_sample()
        for caption in (prompt, negative_prompt or "")
    ]
    length = max(len(sample["input_ids"]) for sample in samples)
    collator = CpmBeeCollator(tokenizer, max_length=length)
    return [collator([sample]) for sample in samples]


def test_paint_text_encoding_from_prompts(paint_llm, tokenizer, golden_dir):
    """Prompt text -> structured input -> collated batch -> CPM-Bee hidden states, equal to the original's."""
    golden = load_file(golden_dir / "paint" / "text_hidden.safetensors")
    spec = load_json(golden_dir / "paint" / "text_hidden.json")
    cases = [(entry["key"], entry["prompt"], None, 0) for entry in spec["inputs"]]
    # negpair = the first prompt with the negative prompt as its unconditional input (see the manifest)
    cases += [("negpair.cond", spec["prompts"][0], spec["negative_prompt"], 0)]
    cases += [("negpair.uncond", spec["prompts"][0], spec["negative_prompt"], 1)]
    for key, prompt, negative_prompt, which in cases:
        batch = paint_text_batches(tokenizer, prompt, negative_prompt)[which]
        for name in ("input_ids", "input_id_subs", "context", "segment_ids", "num_segments", "length"):
            assert torch.equal(batch[name].long(), golden[f"{key}.in.{name}"].long()), f"{key}.in.{name}"
        with torch.no_grad():
            hidden = paint_llm.model(**batch, use_cache=False).last_hidden_state
        assert_close(hidden, golden[f"{key}.text_hidden_states"], f"{key}.text_hidden_states")


def test_teacher_forced_loss_from_structured_input(chat_llm, tokenizer, golden_dir):
    """The chat training path end to end: structured dict -> collator -> model with the vision states -> loss."""
    golden = load_file(golden_dir / "chat" / "forward_teacher_forcing.safetensors")
    for case in load_json(golden_dir / "chat" / "forward_teacher_forcing.json"):
        name = case["name"]
        sample = encode_structured(tokenizer, case["data"]).to_sample()
        batch = CpmBeeCollator(tokenizer, max_length=len(sample["input_ids"]))([sample])
        embeds = chat_llm.model.embed_tokens(
            batch["input_ids"], batch["input_id_subs"], batch["ext_table_ids"], batch["ext_table_sub"]
        )
        embeds = place_vision_states(embeds, golden[f"{name}.vision_hidden_states"], batch["image_bound"])
        model_inputs = {key: value for key, value in batch.items() if key != "input_ids"}
        with torch.no_grad():
            outputs = chat_llm(inputs_embeds=embeds, use_cache=False, **model_inputs)
        assert torch.equal(batch["labels"], golden[f"{name}.target"].long()), f"{name}.target"
        torch.testing.assert_close(outputs.loss, golden[f"{name}.loss"], rtol=1e-5, atol=0)


def beam_cases(folder: Path) -> list[dict]:
    return load_json(folder / "chat" / "generate_beam.json")


@golden_cases(
    "case", beam_cases, ids=lambda c: f"p{c['prompt_index']}-i{c['image_index']}-beam{c['settings']['beam_size']}"
)
def test_generate_equals_original_beam_search(chat_llm, tokenizer, golden_dir, case):
    """transformers' generate() with CPM-Bee's decode-time processing reproduces the original's beam search.

    The original runs `max_length + 2` decoding steps at most (it adds one for `</s>` and loops `range(max + 1)`).
    Its vision states are the golden ones, placed at the image bound.
    """
    settings = case["settings"]
    vision = load_file(golden_dir / "chat" / "generate_beam.safetensors")
    # vision states depend on the image only: any setting of this (prompt, image) pair holds them
    prefix = f"p{case['prompt_index']}_i{case['image_index']}_"
    vision_states = next(value for key, value in vision.items() if key.startswith(prefix))
    query_num = vision_states.shape[1]
    prompt = {"image": "<unk>" * query_num, **case["extra_inp_dict"], "<ans>": ""}
    batch = build_generation_batch(tokenizer, [prompt])
    inputs = dict(batch.model_inputs)
    image_bound = inputs.pop("image_bound")
    embeds = chat_llm.model.embed_tokens(
        inputs["input_ids"], inputs["input_id_subs"], inputs["ext_table_ids"], inputs["ext_table_sub"]
    )
    embeds = place_vision_states(embeds, vision_states, image_bound)
    with torch.no_grad():
        sequences = chat_llm.generate(
            **inputs,
            inputs_embeds=embeds,
            num_beams=settings["beam_size"],
            do_sample=False,
            max_new_tokens=settings["max_length"] + 2,
            length_penalty=float(settings["length_penalty"]),
            early_stopping=False,
            repetition_penalty=float(settings["repetition_penalty"]),
            temperature=float(settings["temperature"]),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    generated = sequences[0, inputs["input_ids"].shape[1] :].tolist()
    ((expected_ids, expected_segments),) = [list(zip(*case["result_ids"][0]))]
    assert generated == list(expected_ids)
    assert set(expected_segments) == {answer for _, answer in batch.predict_segments[0]}
    answer_ids = generated[:-1] if generated[-1] == tokenizer.eos_token_id else generated
    assert tokenizer.decode(answer_ids, ext_table=batch.ext_tables[0]) == case["answer"]
