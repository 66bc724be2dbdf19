"""VisCPM-Chat on pivots other than CPM-Bee (issue 17, item 1): tiny random causal LMs of the Llama and Qwen2 kinds
(rotary positions), and of GPT-2's (absolute positions, where left padding needs position ids from the attention
mask), built by transformers' own classes, with their own tokenizers (Qwen2's kind with a ChatML template, the
others without one)."""

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoProcessor, GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM

from conftest import chat_as_remote_code
from tiny_models import tiny_image, tiny_pivot_chat
from viscpm.modeling.configuration_viscpm_chat import VisCPMChatConfig
from viscpm.modeling.processing_viscpm_chat import IMAGE_MARKER

KINDS = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "gpt2": GPT2LMHeadModel}


@pytest.fixture(params=sorted(KINDS))
def pivot(request):
    model, processor = tiny_pivot_chat(request.param)
    with torch.no_grad():  # distinct logits: random weights at the default scale make near-ties everywhere
        for parameter in model.llm.parameters():
            parameter.normal_(0, 0.5)
    return request.param, model, processor


def test_the_pivot_is_the_transformers_model_its_config_names(pivot, tmp_path):
    kind, model, _ = pivot
    assert type(model.llm) is KINDS[kind]
    model.config.save_pretrained(tmp_path)
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(reloaded, VisCPMChatConfig) and not reloaded.pivot_is_cpmbee
    assert reloaded.text_config.to_dict() == model.config.text_config.to_dict()
    assert VisCPMChatConfig(text_config=reloaded.text_config.to_dict()).text_config.model_type == kind


def test_the_default_pivot_is_still_cpmbee():
    config = VisCPMChatConfig()
    assert config.pivot_is_cpmbee and config.text_config.model_type == "cpmbee"
    assert VisCPMChatConfig(text_config={"dim_model": 64}).text_config.model_type == "cpmbee"  # released folders


def test_the_prompt_follows_the_pivots_chat_template_with_the_image_first(pivot):
    kind, _, processor = pivot
    context = "User: what is it ?\nAI: a red circle\n"
    text = processor.prompt_text("and now ?", context)
    if kind == "qwen2":
        assert text == (f"<|im_start|>user\n{IMAGE_MARKER}what is it ?<|im_end|>\n<|im_start|>assistant\na red "
                        "circle<|im_end|>\n<|im_start|>user\nand now ?<|im_end|>\n<|im_start|>assistant\n")  # fmt: skip
    else:
        assert text == f"{IMAGE_MARKER}{context}User: and now ?\nAI:"
    inputs = processor(images=[tiny_image(1)], text=["and now ?"], context=[context])
    (start, end) = inputs["image_bound"][0, 0].tolist()
    assert end - start == processor.query_num
    assert set(inputs["input_ids"][0, start:end].tolist()) == {processor.image_placeholder_id}
    prefix = processor.tokenizer(text.split(IMAGE_MARKER)[0], add_special_tokens=False)["input_ids"]
    assert inputs["input_ids"][0, :start].tolist() == prefix


def test_a_context_not_in_chats_format_is_refused_by_a_chat_template():
    _, processor = tiny_pivot_chat("qwen2")
    with pytest.raises(ValueError, match="User: "):
        processor.prompt_text("what ?", "we talked before")


def test_the_image_features_replace_the_placeholder_embeddings(pivot):
    _, model, processor = pivot
    inputs = processor(images=[tiny_image(1)], text=["what is it ?"])
    inputs.pop("ext_tables")
    with torch.no_grad():
        logits = model(**inputs).logits
        features = model.get_image_features(inputs["pixel_values"])
        embeddings = model.llm.get_input_embeddings()(inputs["input_ids"]).clone()
        start, end = inputs["image_bound"][0, 0].tolist()
        embeddings[0, start:end] = features[0]
        expected = model.llm(inputs_embeds=embeddings, attention_mask=inputs["attention_mask"]).logits
    torch.testing.assert_close(logits, expected)
    with torch.no_grad():  # and they matter
        other = model(**{**inputs, "pixel_values": processor(images=[tiny_image(2)], text=["x"])["pixel_values"]})
    assert not torch.allclose(other.logits, logits)


def generated_logits(model, processor, images, questions, **kwargs) -> torch.Tensor:
    """The logits of 5 greedy steps, (batch, steps, vocab)."""
    inputs = processor(images=images, text=questions)
    inputs.pop("ext_tables")
    out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, **kwargs)  # fmt: skip
    return torch.stack(out.logits, dim=1)


def test_a_batch_scores_as_each_alone_and_the_cache_changes_nothing(pivot):
    """Left padding: the positions follow the attention mask (GPT-2's absolute positions would shift otherwise); the
    image features live in the cache. Compared on the logits: random models repeat one token whatever the input."""
    _, model, processor = pivot
    images, questions = [tiny_image(1), tiny_image(2)], ["what is it ?", "a b c red circle and now ?"]
    together = generated_logits(model, processor, images, questions)
    for row, (image, question) in enumerate(zip(images, questions)):
        alone = generated_logits(model, processor, [image], [question])
        torch.testing.assert_close(together[row : row + 1], alone)
        torch.testing.assert_close(generated_logits(model, processor, [image], [question], use_cache=False), alone)


def test_a_conversation_continues_with_the_features_of_its_first_turn(pivot):
    _, model, processor = pivot
    answer, context, features = model.chat(tiny_image(1), "what is it ?", processor, max_new_tokens=3)
    assert context == f"User: what is it ?\nAI: {answer}\n"
    again = model.chat(None, "and now ?", processor, context=context, vision_hidden_states=features, max_new_tokens=3)
    fresh = model.chat(tiny_image(1), "and now ?", processor, context=context, max_new_tokens=3)
    assert again[:2] == fresh[:2]


def test_a_saved_folder_loads_natively_and_as_remote_code(pivot, tmp_path):
    _, model, processor = pivot
    folder = tmp_path / "chat"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    image = tmp_path / "image.png"
    tiny_image(1).save(image)
    native, native_processor = AutoModel.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)
    kwargs = dict(max_new_tokens=6, num_beams=1, return_token_ids=True)
    answer, _, _, ids = native.chat(str(image), "what is it ?", native_processor, **kwargs)
    assert model.chat(str(image), "what is it ?", processor, **kwargs)[::3] == (answer, ids)
    remote = chat_as_remote_code(folder, image, "what is it ?", tmp_path)
    assert (remote["answer"], remote["ids"]) == (answer, ids)
