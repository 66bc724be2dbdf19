"""`data.image_augmentation`: the chat stages' images, each time they are batched, flipped or turned at random."""

import json

import pytest
import torch
from PIL import Image

from tiny_models import tiny_chat
from training_support import chat_config, write_config
from viscpm.training.data import IMAGE_AUGMENTATIONS
from viscpm.training.run import ConfigError, build_chat, load_config, training_arguments

TRANSPOSES = [None, *Image.Transpose]


def corner_image() -> Image.Image:
    """A red bar, wider than tall, near the top-left corner: each of the square's eight symmetries moves it apart."""
    image = Image.new("RGB", (40, 40), (255, 255, 255))
    image.paste((220, 30, 30), (2, 3, 14, 8))
    return image


def batched_pixels(augmentation, tmp_path, draws: int = 64) -> list[torch.Tensor]:
    """The pixels `viscpm train chat-pretrain`'s collator gives one image over `draws` batches."""
    model, processor = tiny_chat(tmp_path)
    folder = tmp_path / "chat"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    corner_image().save(tmp_path / "corner.png")
    (tmp_path / "corner.jsonl").write_text(json.dumps({"image": "corner.png", "caption": "a red"}) + "\n")
    entries = chat_config(tmp_path, folder, "run")
    entries["data"] |= {
        "sources": [{"path": str(tmp_path / "corner.jsonl"), "image_root": str(tmp_path)}],
        "image_augmentation": augmentation,
    }
    config = load_config("chat-pretrain", str(write_config(tmp_path / "c.yaml", **entries)))
    _, _, dataset, _, collator, _ = build_chat("chat-pretrain", config, training_arguments(config))
    torch.manual_seed(0)
    return [collator([dataset[0]])["pixel_values"][0] for _ in range(draws)]


def transposed_pixels(tmp_path) -> list[torch.Tensor]:
    """The pixels of each of `TRANSPOSES` of the image, through the tiny model's own image processor."""
    _, processor = tiny_chat(tmp_path)
    images = [corner_image() if transpose is None else corner_image().transpose(transpose) for transpose in TRANSPOSES]
    return [processor.image_processor(image, return_tensors="pt")["pixel_values"][0] for image in images]


@pytest.mark.parametrize("augmentation, seen", [(None, 1), ("horizontal_flip", 2), ("dihedral", 8)])
def test_each_batch_sees_the_image_turned_by_one_of_the_augmentations_transposes(augmentation, seen, tmp_path):
    """Over 64 batches the image comes as each of its allowed transposes (one, two, eight), and as nothing else."""
    allowed = IMAGE_AUGMENTATIONS[augmentation] if augmentation else (None,)
    assert len(allowed) == seen
    expected = transposed_pixels(tmp_path)
    assert len({tuple(pixels.flatten().tolist()) for pixels in expected}) == 8  # the bar tells all eight apart
    counts = [0] * len(TRANSPOSES)
    for pixels in batched_pixels(augmentation, tmp_path):
        (index,) = [index for index, candidate in enumerate(expected) if torch.equal(candidate, pixels)]
        counts[index] += 1
    assert [TRANSPOSES[index] for index, count in enumerate(counts) if count] == list(allowed), counts


def test_the_draws_follow_the_seed(tmp_path):
    first, second = batched_pixels("dihedral", tmp_path / "a"), batched_pixels("dihedral", tmp_path / "b")
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize(
    "stage, augmentation, named",
    [
        ("chat-pretrain", "rotate", "must be one of horizontal_flip, dihedral"),
        ("chat-pretrain", ["dihedral"], "must be one of horizontal_flip, dihedral"),
        ("paint", "dihedral", "chat stages"),
    ],
)
def test_an_unknown_or_misplaced_augmentation_is_a_config_error(stage, augmentation, named, tmp_path):
    entries = chat_config(tmp_path, tmp_path, "run")
    entries["data"]["image_augmentation"] = augmentation
    with pytest.raises(ConfigError, match=named):
        load_config(stage, str(write_config(tmp_path / "c.yaml", **entries)))
