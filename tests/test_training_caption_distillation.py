"""Stage 1's `caption_distillation`: each caption sample's teacher is the same sample with the caption written in the
image slot, and the pivot's states after the image are trained toward the frozen pivot's states after the written
caption. On CPM-Bee and on pivots transformers implements.
"""

import random

import pytest
import torch
from transformers import AutoModel

from tiny_models import tiny_chat, tiny_pivot_chat
from training_support import chat_config, colour_image, conversation_source, state, write_config
from viscpm.training.chat import caption_distillation_loss
from viscpm.training.data import (
    TEACHER_PREFIX,
    CaptionDistillationSamples,
    ChatPrompts,
    chat_collator,
    chat_samples,
    png_bytes,
    split_teacher,
)
from viscpm.training.run import ConfigError, load_config, train

PIVOTS = ["cpmbee", "qwen2", "gpt2"]  # CPM-Bee's segments; rotary positions; absolute positions
CAPTIONS = ["a b c", "a", "c a b a b"]  # words of both tiny vocabularies, of three lengths


def tiny(kind: str, tmp_path):
    return tiny_chat(tmp_path) if kind == "cpmbee" else tiny_pivot_chat(kind)


def distillation_rows(processor, captions=CAPTIONS) -> list[dict]:
    """Caption samples as `viscpm train` prepares them, each with its teacher columns and an image."""
    samples = CaptionDistillationSamples(chat_samples(processor, max_length=96))
    prompts = ChatPrompts("caption", processor)
    image = png_bytes(colour_image("red"))
    rows = []
    for index, caption in enumerate(captions):
        (prompt,) = prompts(caption, random.Random(index))
        rows.append(samples(prompt) | {"image": image})
    return rows


def pixels_of(processor):
    return lambda image: processor.image_processor(image, return_tensors="pt")["pixel_values"][0]


@pytest.mark.parametrize("kind", PIVOTS)
def test_the_teacher_is_the_sample_with_its_caption_in_the_image_slot(kind, tmp_path):
    _, processor = tiny(kind, tmp_path)
    for caption, row in zip(CAPTIONS, distillation_rows(processor)):
        (start, end), (teacher_start, teacher_end) = row["image_bound"][0], row[TEACHER_PREFIX + "image_bound"][0]
        student_ids, teacher_ids = row["input_ids"], row[TEACHER_PREFIX + "input_ids"]
        assert end - start == processor.query_num
        assert set(student_ids[start:end]) == {processor.image_placeholder_id}
        assert processor.tokenizer.decode(teacher_ids[teacher_start:teacher_end]).strip() == caption
        assert (student_ids[:start], student_ids[end:]) == (teacher_ids[:teacher_start], teacher_ids[teacher_end:])
        assert TEACHER_PREFIX + "image" not in row  # the teacher reads text only


def per_layer_sums(model, batch: dict, end: int, length: int) -> list[torch.Tensor]:
    """One unpadded row's states after its image slot, layer by layer (the embedding layer left out)."""
    states = model(**batch, output_hidden_states=True).hidden_states[1:]
    return [layer[0, end:length] for layer in states]


@pytest.mark.parametrize("kind", PIVOTS)
def test_the_distance_is_each_layers_relative_error_after_the_image_whatever_the_padding(kind, tmp_path):
    """The batched loss (rows of different lengths, padded, teacher slots of other lengths than the image's) equals
    the distance computed from each row alone, where no padding or alignment is involved."""
    torch.manual_seed(0)
    model, processor = tiny(kind, tmp_path)
    model.eval()
    rows = distillation_rows(processor)
    collator = chat_collator(processor, 96, pixels_of(processor), caption_distillation=True)

    with torch.no_grad():
        student, teacher = split_teacher(collator(rows))
        assert len({int(length) for length in teacher["attention_mask"].sum(1)}) > 1  # padding is exercised
        outputs = model(**student, output_hidden_states=True)
        batched = caption_distillation_loss(model, student, outputs, teacher)

        errors, norms = None, None
        for row in rows:
            alone, alone_teacher = split_teacher(collator([row]))
            student_after = per_layer_sums(model, alone, row["image_bound"][0][1], len(row["input_ids"]))
            teacher_after = per_layer_sums(
                model,
                {name: value for name, value in alone_teacher.items() if name != "labels"},
                row[TEACHER_PREFIX + "image_bound"][0][1],
                len(row[TEACHER_PREFIX + "input_ids"]),
            )
            row_errors = torch.stack([((s - t) ** 2).sum() for s, t in zip(student_after, teacher_after)])
            row_norms = torch.stack([(t**2).sum() for t in teacher_after])
            errors = row_errors if errors is None else errors + row_errors
            norms = row_norms if norms is None else norms + row_norms
    expected = (errors / norms).mean()
    assert batched.item() > 0.01
    torch.testing.assert_close(batched, expected, rtol=1e-4, atol=1e-6)


def distance_on(folder, rows) -> float:
    """The caption distillation distance of the saved model ``folder`` on ``rows``."""
    from transformers import AutoProcessor

    model, processor = AutoModel.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)
    batch = chat_collator(processor, 96, pixels_of(processor), caption_distillation=True)(rows)
    student, teacher = split_teacher(batch)
    with torch.no_grad():
        return caption_distillation_loss(model, student, model(**student, output_hidden_states=True), teacher).item()


@pytest.mark.parametrize("kind", ["cpmbee", "qwen2"])
def test_chat_pretrain_with_caption_distillation_brings_the_image_toward_the_written_caption(kind, tmp_path):
    """The same run with and without it: with it, the pivot (frozen either way) reads the images after training
    nearer to how it reads their written captions; the distances are logged and in the run's summary."""
    model, processor = tiny(kind, tmp_path)
    folder = tmp_path / "chat"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    before = state(AutoModel.from_pretrained(folder))
    runs = {}
    for weight in (None, 10.0):
        entries = chat_config(tmp_path, folder, f"run-{weight}", steps=10, caption_distillation=weight)
        config = load_config("chat-pretrain", str(write_config(tmp_path / "c.yaml", **entries)))
        runs[weight], _ = train("chat-pretrain", config)
    summary = runs[10.0]
    assert runs[None]["caption_distillation_losses"] == []
    assert len(summary["caption_distillation_losses"]) == len(summary["losses"]) == 10
    after = state(AutoModel.from_pretrained(summary["saved"]))
    assert all(torch.equal(before[name], after[name]) for name in before if name.startswith("llm."))
    rows = distillation_rows(processor)
    distances = {weight: distance_on(run["saved"], rows) for weight, run in runs.items()}
    assert distances[10.0] < 0.8 * distances[None], distances


def test_gradient_accumulation_gives_the_step_of_the_whole_batch(tmp_path):
    """One SGD step on 8 samples at once, or as 2 accumulated micro-batches of 4, moves the queries alike: the
    distance is averaged over the accumulated micro-batches as the caption loss is (counted twice, the
    distillation's share of the step would double)."""
    model, processor = tiny("cpmbee", tmp_path)
    folder = tmp_path / "chat"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    queries = []
    for batch, accumulation in ((8, 1), (4, 2)):
        training = {"per_device_train_batch_size": batch, "gradient_accumulation_steps": accumulation, "optim": "sgd"}
        entries = chat_config(tmp_path, folder, f"run-{batch}", steps=1, caption_distillation=50.0, training=training)
        config = load_config("chat-pretrain", str(write_config(tmp_path / "c.yaml", **entries)))
        summary, _ = train("chat-pretrain", config)
        queries.append(AutoModel.from_pretrained(summary["saved"]).query.detach())
    start = AutoModel.from_pretrained(folder).query.detach()
    whole, accumulated = queries[0] - start, queries[1] - start
    # alike, not equal: the distance of 8 rows is their summed error over their summed norm, not two halves' mean
    # (0.9% apart; with the accumulated distance counted twice, 5.3%)
    assert whole.abs().max() > 1e-4 and (accumulated - whole).norm() < 0.02 * whole.norm()


@pytest.mark.parametrize(
    "stage, change, named",
    [
        ("chat-sft", {}, "chat-pretrain only"),
        ("chat-pretrain", {"tune_llm": True}, "pivot frozen"),
        ("chat-pretrain", {"caption_distillation": -1}, "positive number"),
        ("chat-pretrain", {"caption_distillation": "much"}, "positive number"),
        ("chat-pretrain", {"caption_distillation": True}, "positive number"),
        ("chat-pretrain", {"conversations": True}, "not captions"),
    ],
)
def test_caption_distillation_where_it_cannot_apply_is_a_config_error(stage, change, named, tmp_path):
    entries = chat_config(tmp_path, tmp_path, "run", caption_distillation=1.0)
    if change.pop("conversations", False):
        path = conversation_source(tmp_path / "talk")
        entries["data"]["sources"].append({"path": str(path), "kind": "conversation", "image_root": str(path.parent)})
    entries |= change
    with pytest.raises(ConfigError, match=named):
        load_config(stage, str(write_config(tmp_path / "c.yaml", **entries)))
