"""VisCPM-Chat: golden parity through the converted checkpoint, and tiny-model behaviour."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor, TextIteratorStreamer

from conftest import golden_cases, load_json
from tiny_models import tiny_chat, tiny_image
from viscpm import (
    CpmBeeTokenizer,
    VisCPMChatConfig,
    VisCPMChatForConditionalGeneration,
    VisCPMChatProcessor,
)
from viscpm.modeling.modeling_viscpm_chat import place_image_features
from viscpm.modeling.structured_cpmbee import CpmBeeCollator, encode_structured

ATOL = RTOL = 1e-4


# ---------------------------------------------------------------- golden parity


@pytest.fixture(scope="module")
def converted(converted_golden_chat):
    return converted_golden_chat


@pytest.fixture(scope="module")
def chat_model(converted):
    return AutoModel.from_pretrained(converted, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def processor(converted):
    return AutoProcessor.from_pretrained(converted)


def golden_images(golden_dir: Path) -> list[Image.Image]:
    return [Image.open(path) for path in sorted((golden_dir / "chat" / "images").iterdir())]


pytestmark_golden = pytest.mark.golden


@pytestmark_golden
def test_converted_folder_loads_with_auto_classes(converted, chat_model, processor, golden_dir):
    config = load_json(golden_dir / "chat" / "config.json")
    assert type(chat_model) is VisCPMChatForConditionalGeneration
    assert type(AutoModelForImageTextToText.from_pretrained(converted)) is VisCPMChatForConditionalGeneration
    assert type(processor) is VisCPMChatProcessor
    assert processor.query_num == chat_model.config.query_num == config["query_num"]
    assert processor.image_processor.size["height"] == chat_model.config.vision_config.image_size
    assert (
        chat_model.config.vision_config.num_attention_heads
        == config["beit3"]["encoder_config"]["encoder_attention_heads"]
    )
    # the chat defaults of the original VisCPMChat.chat
    generation = json.loads((converted / "generation_config.json").read_text())
    assert (generation["num_beams"], generation["repetition_penalty"], generation["length_penalty"]) == (3, 1.1, 3.0)
    assert generation["cpmbee_temperature"] == 0.7


@pytestmark_golden
def test_image_features_equal_the_original(chat_model, processor, golden_dir):
    golden = load_file(golden_dir / "chat" / "vision.safetensors")
    pixel_values = processor.image_processor(golden_images(golden_dir), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(
        pixel_values, load_file(golden_dir / "chat" / "image_transform.safetensors")["pixel_values"], rtol=0, atol=1e-6
    )
    with torch.no_grad():
        features = chat_model.get_image_features(pixel_values)
    torch.testing.assert_close(features, golden["vision_hidden_states_mapped"], rtol=RTOL, atol=1e-5)
    torch.testing.assert_close(chat_model.query, golden["query"], rtol=0, atol=0)


@pytestmark_golden
def test_teacher_forced_forward_from_pixels(chat_model, golden_dir):
    """Image pixels and a structured training sample in, the original's teacher-forced logits and loss out."""
    tokenizer = CpmBeeTokenizer(vocab_file=str(golden_dir / "vocab" / "bee.txt"))
    golden = load_file(golden_dir / "chat" / "forward_teacher_forcing.safetensors")
    pixels = load_file(golden_dir / "chat" / "image_transform.safetensors")["pixel_values"]
    for case in load_json(golden_dir / "chat" / "forward_teacher_forcing.json"):
        name = case["name"]
        sample = encode_structured(tokenizer, case["data"]).to_sample()
        batch = CpmBeeCollator(tokenizer, max_length=len(sample["input_ids"]))([sample])
        with torch.no_grad():
            outputs = chat_model(pixel_values=pixels[case["image_index"]][None], use_cache=False, **batch)
        torch.testing.assert_close(
            outputs.vision_hidden_states, golden[f"{name}.vision_hidden_states"], rtol=RTOL, atol=1e-5
        )
        logits = outputs.logits[0]
        assert torch.equal(logits.argmax(-1), golden[f"{name}.logits.argmax"])
        torch.testing.assert_close(logits.logsumexp(-1), golden[f"{name}.logits.logsumexp"], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(outputs.loss, golden[f"{name}.loss"], rtol=1e-5, atol=0)


def beam_cases(folder: Path) -> list[dict]:
    return load_json(folder / "chat" / "generate_beam.json")


def chat_default_cases(folder: Path) -> list[dict]:
    """generate_beam cases run with VisCPMChat.chat's settings (everything but max_length)."""
    defaults = {"beam_size": 3, "temperature": 0.7, "repetition_penalty": 1.1, "length_penalty": 3}
    return [case for case in beam_cases(folder) if all(case["settings"][k] == v for k, v in defaults.items())]


def settings_kwargs(settings: dict) -> dict:
    """The original's generate settings as generate() arguments (it decodes at most max_length + 2 tokens)."""
    return dict(
        num_beams=settings["beam_size"],
        temperature=float(settings["temperature"]),
        repetition_penalty=float(settings["repetition_penalty"]),
        length_penalty=float(settings["length_penalty"]),
        max_new_tokens=settings["max_length"] + 2,
    )


@pytestmark_golden
@golden_cases(
    "case", beam_cases, ids=lambda c: f"p{c['prompt_index']}-i{c['image_index']}-b{c['settings']['beam_size']}"
)
def test_chat_equals_original_generation(chat_model, processor, golden_dir, case):
    image = golden_images(golden_dir)[case["image_index"]]
    prompt = case["extra_inp_dict"]
    answer, context, vision_hidden_states, token_ids = chat_model.chat(
        image,
        prompt["question"],
        processor,
        context=prompt["context"],
        return_token_ids=True,
        **settings_kwargs(case["settings"]),
    )
    assert token_ids == [raw_id for raw_id, _ in case["result_ids"][0]]
    assert answer == case["answer"]
    assert context == case["next_context_as_VisCPMChat_builds"]
    golden_states = load_file(golden_dir / "chat" / "generate_beam.safetensors")
    prefix = f"p{case['prompt_index']}_i{case['image_index']}_"
    expected_states = next(value for key, value in golden_states.items() if key.startswith(prefix))
    torch.testing.assert_close(vision_hidden_states, expected_states, rtol=RTOL, atol=1e-5)


@pytestmark_golden
def test_batched_chat_equals_the_original_one_at_a_time(chat_model, processor, golden_dir):
    """Several images and questions in one batch (different prompt lengths, left padded) give each original answer."""
    cases = chat_default_cases(golden_dir)
    assert len(cases) > 1
    images = golden_images(golden_dir)
    (max_length,) = {case["settings"]["max_length"] for case in cases}
    answers, contexts, _ = chat_model.chat(
        [images[case["image_index"]] for case in cases],
        [case["extra_inp_dict"]["question"] for case in cases],
        processor,
        context=[case["extra_inp_dict"]["context"] for case in cases],
        max_new_tokens=max_length + 2,
    )
    assert answers == [case["answer"] for case in cases]
    assert contexts == [case["next_context_as_VisCPMChat_builds"] for case in cases]


@pytestmark_golden
def test_batch_of_two_images_is_right_where_the_original_was_not(chat_model, processor, golden_dir):
    """The original's batched generation puts the image features in row 0 only (generate_batch2_quirk.json): its row 0
    is right and equals ours; our row 1 equals the second image asked alone."""
    quirk = load_json(golden_dir / "chat" / "generate_batch2_quirk.json")
    images = [golden_images(golden_dir)[index] for index in quirk["images"]]
    question, context = quirk["extra_inp_dict"]["question"], quirk["extra_inp_dict"]["context"]
    kwargs = settings_kwargs(quirk["settings"])
    answers, _, _, token_ids = chat_model.chat(
        images, [question] * len(images), processor, context=context, return_token_ids=True, **kwargs
    )
    assert token_ids[0] == [raw_id for raw_id, _ in quirk["result_ids"][0]]
    assert answers[0] == quirk["answers"][0]
    for row in range(1, len(images)):
        alone = chat_model.chat(images[row], question, processor, context=context, **kwargs)[0]
        assert answers[row] == alone


@pytestmark_golden
@golden_cases("conversation", lambda folder: sorted(load_json(folder / "chat" / "viscpmchat_chat.json")), ids=str)
def test_multi_turn_chat_equals_the_original(chat_model, processor, golden_dir, conversation):
    """VisCPMChat.chat with its own defaults, two turns, feeding back context and vision states like demo_chat.py."""
    transcript = load_json(golden_dir / "chat" / "viscpmchat_chat.json")[conversation]
    image = golden_images(golden_dir)[transcript["image_index"]]
    context, vision_hidden_states = "", None
    for turn in transcript["turns"]:
        assert turn["context_in"] == context
        answer, context, vision_hidden_states, token_ids = chat_model.chat(
            image,
            turn["question"],
            processor,
            context=context,
            return_token_ids=True,
            vision_hidden_states=vision_hidden_states if turn["passed_vision_hidden_states"] else None,
        )
        assert token_ids == [raw_id for raw_id, _ in turn["result_ids"][0]]
        assert answer == turn["answer"]
        assert context == turn["context_out"]


# ---------------------------------------------------------------- tiny random models


def test_save_and_reload_chat_model_and_processor(tmp_path):
    model, processor = tiny_chat(tmp_path)
    model.save_pretrained(tmp_path / "saved")
    processor.save_pretrained(tmp_path / "saved")
    reloaded = AutoModel.from_pretrained(tmp_path / "saved").eval()
    reloaded_processor = AutoProcessor.from_pretrained(tmp_path / "saved")
    inputs = processor(images=[tiny_image(0)], text=["what ?"])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
    assert reloaded_processor.query_num == 4 and reloaded_processor.image_processor.size["height"] == 32
    assert reloaded.generation_config.num_beams == 3


def test_vision_states_are_reused_across_turns(tmp_path):
    model, processor = tiny_chat(tmp_path)
    image = tiny_image(1)
    first, context, states = model.chat(image, "what ?", processor, num_beams=1, max_new_tokens=4)
    assert context == f"User: what ?\nAI: {first}\n"
    again = model.chat(
        None, "a b ?", processor, context=context, vision_hidden_states=states, num_beams=1, max_new_tokens=4
    )
    fresh = model.chat(image, "a b ?", processor, context=context, num_beams=1, max_new_tokens=4)
    assert again[0] == fresh[0]
    torch.testing.assert_close(again[2], fresh[2])


def test_batched_generation_equals_one_at_a_time(tmp_path):
    model, processor = tiny_chat(tmp_path, seed=2)
    images = [tiny_image(3), tiny_image(4), tiny_image(5)]
    questions = ["what ?", "a b c a b c ?", "c ?"]
    contexts = ["", "User: a\nAI: b\n", ""]
    batched = model.chat(images, questions, processor, context=contexts, max_new_tokens=6)
    alone = [model.chat(i, q, processor, context=c, max_new_tokens=6) for i, q, c in zip(images, questions, contexts)]
    assert batched[0] == [answer for answer, _, _ in alone]
    assert batched[1] == [context for _, context, _ in alone]


def test_processor_output_generates_as_is_and_decodes_with_its_tables(tmp_path):
    model, processor = tiny_chat(tmp_path, seed=3)
    inputs = processor(images=[tiny_image(2)], text=["a b c a b c ?"])
    assert "ext_tables" not in inputs  # decode state travels beside the model inputs, not among them
    sequences = model.generate(**inputs, num_beams=1, max_new_tokens=5)
    answers = processor.decode_answers(sequences[:, inputs["input_ids"].shape[1] :], inputs.ext_tables)
    assert answers == [model.chat(tiny_image(2), "a b c a b c ?", processor, num_beams=1, max_new_tokens=5)[0]]


def test_streaming_answer_through_text_iterator_streamer(tmp_path):
    model, processor = tiny_chat(tmp_path, seed=6)
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True)
    answer, _, _ = model.chat(tiny_image(7), "what ?", processor, num_beams=1, max_new_tokens=5, streamer=streamer)
    # the stream also shows the final </s> that ends the answer
    assert "".join(streamer).removesuffix(processor.tokenizer.eos_token) == answer


def test_bad_inputs_are_clear_errors(tmp_path):
    model, processor = tiny_chat(tmp_path)
    with pytest.raises(ValueError, match="non-empty string"):
        processor(images=[tiny_image(0)], text=["  "])
    with pytest.raises(ValueError, match="max_prompt_length=80"):
        processor(images=[tiny_image(0)], text=["a b " * 40])
    with pytest.raises(ValueError, match="one question per image"):
        processor(images=[tiny_image(0), tiny_image(1)], text=["what ?"])
    with pytest.raises(ValueError, match="not an image|cannot identify|image"):
        processor(images=[tmp_path / "vocab.txt"], text=["what ?"])
    inputs = processor(images=[tiny_image(0)], text=["what ?"])
    inputs["pixel_values"] = torch.zeros(1, 3, 64, 64)  # a processor of another size
    with pytest.raises(ValueError, match="64"):
        model(**inputs)


def test_image_features_must_fill_the_placeholders():
    embeds = torch.zeros(1, 10, 8)
    with pytest.raises(ValueError, match="query_num=4"):
        place_image_features(embeds, torch.ones(1, 4, 8), torch.tensor([[[2, 5]]]))
    placed = place_image_features(embeds, torch.ones(1, 4, 8), torch.tensor([[[2, 6]]]))
    assert placed[0, 2:6].eq(1).all() and placed[0, :2].eq(0).all() and placed[0, 6:].eq(0).all()


def test_flash_attention_request_routes_the_language_model_to_flex(caplog):
    """FlashAttention cannot take CPM-Bee's position bias: a whole-model request runs BEiT-3 on it and CPM-Bee on
    FlexAttention, and says so once. (FlashAttention itself needs CUDA: benchmarks/gpu_check.py runs it.)"""
    config = VisCPMChatConfig(attn_implementation="flash_attention_2")
    assert config.vision_config._attn_implementation == "flash_attention_2"
    assert config.text_config._attn_implementation == "flex_attention"
    explicit = VisCPMChatConfig(attn_implementation={"vision_config": "sdpa", "text_config": "eager"})
    assert (explicit.vision_config._attn_implementation, explicit.text_config._attn_implementation) == (
        "sdpa",
        "eager",
    )


@torch.no_grad()
def test_per_sub_model_attention_equals_eager(tmp_path):
    model, processor = tiny_chat(tmp_path)
    model.save_pretrained(tmp_path / "saved")
    mixed = AutoModel.from_pretrained(
        tmp_path / "saved", attn_implementation={"vision_config": "sdpa", "text_config": "flex_attention"}
    ).eval()
    assert mixed.vpm.config._attn_implementation == "sdpa"
    assert mixed.llm.model.config._attn_implementation == "flex_attention"
    inputs = processor(images=[tiny_image(0)], text=["what ?"])
    torch.testing.assert_close(mixed(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_beam_search_prefills_the_prompt_once(tmp_path, monkeypatch):
    """The prompt runs once (not once per beam); the beams get copies of its cache. Same answers as without."""
    model, processor = tiny_chat(tmp_path, seed=8)
    shapes = []
    model.llm.model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(
            tuple(
                (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]).shape[:2]
            )
        ),
        with_kwargs=True,
    )
    images, questions = [tiny_image(9), tiny_image(10)], ["what ?", "a b c ?"]
    answers = model.chat(images, questions, processor, num_beams=3, max_new_tokens=5)[0]
    prompt_length = processor(text=questions)["input_ids"].shape[1]
    assert shapes[0] == (2, prompt_length - 1)  # the prompt, once per sample
    assert shapes[1] == (2 * 3, 1)  # then the beams, one token each
    monkeypatch.setattr(type(model), "_prefill_once_for_all_beams", lambda self, kwargs, beams: None)
    assert model.chat(images, questions, processor, num_beams=3, max_new_tokens=5)[0] == answers
