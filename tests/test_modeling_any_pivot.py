"""VisCPM-Chat on pivots other than CPM-Bee (issue 17, item 1): tiny random causal LMs of the Llama and Qwen2 kinds
(rotary positions), and of GPT-2's (absolute positions, where left padding needs position ids from the attention
mask), built by transformers' own classes, with their own tokenizers (Qwen2's kind with a ChatML template, the
others without one)."""

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoProcessor, GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM

from conftest import chat_as_remote_code
from tiny_models import tiny_image, tiny_pivot_chat
from training_support import chat_config, colour_image, falls, state, write_config
from viscpm.cli import main
from viscpm.modeling.configuration_viscpm_chat import VisCPMChatConfig
from viscpm.modeling.processing_viscpm_chat import IMAGE_MARKER
from viscpm.training.chat import add_lora
from viscpm.training.data import PivotCollator, PivotSamples, Turn, png_bytes
from viscpm.training.run import load_config, train

KINDS = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "gpt2": GPT2LMHeadModel}


def expressive_pivot(kind: str):
    """A tiny random pivot whose logits are distinct (at the default init scale near-ties are everywhere, and a
    frozen pivot barely responds to what the image features say)."""
    model, processor = tiny_pivot_chat(kind)
    with torch.no_grad():
        for parameter in model.llm.parameters():
            parameter.normal_(0, 0.5)
    return model, processor


@pytest.fixture(params=sorted(KINDS))
def pivot(request):
    return request.param, *expressive_pivot(request.param)


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
        assert text == (
            f"<|im_start|>user\n{IMAGE_MARKER}what is it ?<|im_end|>\n<|im_start|>assistant\na red "
            "circle<|im_end|>\n<|im_start|>user\nand now ?<|im_end|>\n<|im_start|>assistant\n"
        )
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
    out = model.generate(
        **inputs,
        max_new_tokens=5,
        min_new_tokens=5,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )
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


# ------------------------------------------------------------------------------------- training (viscpm train)


def pivot_folder(tmp_path, kind: str = "qwen2"):
    model, processor = expressive_pivot(kind)
    folder = tmp_path / f"tiny-{kind}-chat"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_a_sample_labels_the_answer_and_its_end_only(pivot):
    _, _, processor = pivot
    turn = Turn("and now ?", "a red circle", "User: what is it ?\nAI: a b\n")
    sample = PivotSamples(processor, max_length=200)(turn)
    prompt, image_start = processor.prompt_ids(turn.question, turn.context)
    answer = processor.tokenizer(turn.answer, add_special_tokens=False)["input_ids"]
    assert sample["input_ids"] == prompt + answer + [processor.tokenizer.eos_token_id]
    assert sample["labels"] == [-100] * len(prompt) + answer + [processor.tokenizer.eos_token_id]
    assert sample["image_bound"] == [[image_start, image_start + processor.query_num]]

    short = PivotSamples(processor, max_length=200)(Turn("what ?", "a"))
    image = png_bytes(colour_image("red"))
    pixels = lambda picture: processor.image_processor(picture, return_tensors="pt")["pixel_values"][0]  # noqa: E731
    batch = PivotCollator(processor.pad_token_id, pixels)([sample | {"image": image}, short | {"image": image}])
    length = len(short["input_ids"])
    assert batch["input_ids"][1, :length].tolist() == short["input_ids"]  # padded on the right
    assert batch["attention_mask"][1].tolist() == [1] * length + [0] * (len(sample["input_ids"]) - length)
    assert set(batch["labels"][1, length:].tolist()) == {-100}
    assert batch["image_bound"].shape == (2, 1, 2) and batch["pixel_values"].shape == (2, 3, 32, 32)


def test_both_chat_stages_train_another_pivot(tmp_path):
    folder = pivot_folder(tmp_path)
    before = state(AutoModel.from_pretrained(folder))
    config = load_config("chat-pretrain", str(write_config(tmp_path / "p.yaml", **chat_config(tmp_path, folder, "p"))))
    summary, _ = train("chat-pretrain", config)
    assert falls(summary["losses"]), summary["losses"]
    aligned = state(AutoModel.from_pretrained(summary["saved"]))
    assert all(torch.equal(before[name], aligned[name]) for name in before if name.startswith("llm."))
    assert not torch.equal(before["query"], aligned["query"])

    config = chat_config(tmp_path, Path(summary["saved"]), "s")
    summary, _ = train("chat-sft", load_config("chat-sft", str(write_config(tmp_path / "s.yaml", **config))))
    assert falls(summary["losses"]), summary["losses"]
    tuned = AutoModel.from_pretrained(summary["saved"]).eval()
    assert not torch.equal(
        tuned.state_dict()["llm.model.layers.0.self_attn.q_proj.weight"],
        aligned["llm.model.layers.0.self_attn.q_proj.weight"],
    )
    processor = AutoProcessor.from_pretrained(summary["saved"])
    answer, *_ = tuned.chat(colour_image("red"), "Describe the image concisely", processor, max_new_tokens=4)
    assert isinstance(answer, str)


@pytest.mark.parametrize("quantization", [None, "nf4"])
def test_lora_adapts_the_pivot_only_and_merges(tmp_path, quantization):
    from peft import PeftModel

    folder = pivot_folder(tmp_path)
    adapted = add_lora(AutoModel.from_pretrained(folder), {"r": 4}, quantized=False, gradient_checkpointing=False)
    names = [name for name, _ in adapted.named_parameters() if "lora_" in name]
    assert names and all(".llm." in name and ("q_proj" in name or "v_proj" in name) for name in names)

    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "quantization": quantization}
    config = chat_config(tmp_path, folder, "lora", lora=lora, training={"learning_rate": 5e-2})
    summary, _ = train("chat-sft", load_config("chat-sft", str(write_config(tmp_path / "c.yaml", **config))))
    assert falls(summary["losses"]), summary["losses"]
    processor = AutoProcessor.from_pretrained(folder)
    inputs = processor(images=[colour_image("red")], text=["what is it ?"])
    with torch.no_grad():
        adapted_logits = PeftModel.from_pretrained(AutoModel.from_pretrained(folder), summary["saved"])(**inputs).logits
    assert main(["merge-lora", str(summary["saved"]), "--output", str(tmp_path / "merged")]) == 0
    with torch.no_grad():
        merged_logits = AutoModel.from_pretrained(tmp_path / "merged").eval()(**inputs).logits
    torch.testing.assert_close(merged_logits, adapted_logits, rtol=1e-4, atol=1e-4)


def test_assemble_chat_puts_a_pivot_and_a_vision_tower_together(tmp_path, capsys):
    from tiny_models import tiny_chat

    language_model, processor = expressive_pivot("qwen2")
    pivot = tmp_path / "pivot"
    language_model.llm.save_pretrained(pivot)
    processor.tokenizer.save_pretrained(pivot)
    donor_model, donor_processor = tiny_chat(tmp_path)
    donor = tmp_path / "donor"
    donor_model.save_pretrained(donor)
    donor_processor.save_pretrained(donor)

    output = tmp_path / "assembled"
    arguments = ["assemble-chat", "--pivot", pivot, "--vision", donor, "--output", output, "--query-num", 4]
    assert main([str(argument) for argument in arguments]) == 0
    model, assembled = AutoModel.from_pretrained(output).eval(), AutoProcessor.from_pretrained(output)
    weights = model.state_dict()
    assert all(torch.equal(weights[f"llm.{k}"], v) for k, v in language_model.llm.state_dict().items())
    donor_weights = donor_model.state_dict()
    assert all(torch.equal(weights[k], donor_weights[k]) for k in donor_weights if k.startswith(("vpm.", "query")))
    assert assembled.tokenizer.chat_template == processor.tokenizer.chat_template and assembled.query_num == 4
    answer, *_ = model.chat(tiny_image(1), "what is it ?", assembled, max_new_tokens=3)
    assert isinstance(answer, str)

    capsys.readouterr()
    assert main(["assemble-chat", "--pivot", str(tmp_path / "nothing"), "--output", str(tmp_path / "x")]) == 2
    assert "no config.json" in capsys.readouterr().err and not (tmp_path / "x").exists()
