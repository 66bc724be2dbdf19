"""paint-mini: the experiment's pipeline in a few steps, and the shipped default VisCPM-Paint judged by a classifier."""

import dataclasses
import json

import pytest
import torch

from viscpm import defaults
from viscpm.cli import main
from viscpm.experiments import glossary as g
from viscpm.experiments import paint_mini
from viscpm.modeling.pipeline_viscpm_paint import VisCPMPaintPipeline

pytestmark = pytest.mark.slow  # the slowest tests, left out by -m "not slow"

pytest.importorskip("easy_vqa", reason="the experiment extra (easy-vqa) is not installed")


def test_quick_run_of_the_whole_pipeline(tmp_path, capsys):
    """VAE, classifier, and every system's pivot, Paint training and evaluation, for a few steps, through the
    command line."""
    assert main(["experiment", "paint-mini", "--quick", "--output", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["systems"]) == set(paint_mini.SYSTEMS)
    for system, entry in results["systems"].items():
        assert set(entry["accuracy"]) == {"en", "zh", "zh_held_out"} and entry["losses"]
        assert all(0 <= value <= 1 for scores in entry["accuracy"].values() for value in scores.values())
        assert VisCPMPaintPipeline.from_pretrained(entry["model"]).unet.config.cross_attention_dim == 16
        assert (tmp_path / f"{system}.png").stat().st_size > 0
    assert (tmp_path / "accuracy.png").stat().st_size > 0 and "| mpm |" in capsys.readouterr().out


def test_scores_count_colour_and_shape_separately():
    red_circle, red_triangle, blue_circle = (
        paint_mini.SCENES.index(scene) for scene in (("red", "circle"), ("red", "triangle"), ("blue", "circle"))
    )
    expected = torch.tensor([red_circle] * 4)
    predicted = torch.tensor([red_circle, red_triangle, blue_circle, red_triangle])
    assert paint_mini.scores(predicted, expected) == {"colour": 0.75, "shape": 0.5, "both": 0.25}


def test_held_out_scenes_leave_every_colour_and_shape_a_chinese_caption():
    """One held-out scene per colour, and every colour and shape still in some captioned scene: what the held-out
    Chinese prompts test is composing known words, not words never seen in Chinese."""
    held_out = paint_mini.HELD_OUT_SCENES
    assert sorted(colour for colour, _ in held_out) == sorted(g.COLOURS)
    captioned = [scene for scene in paint_mini.SCENES if scene not in held_out]
    assert {colour for colour, _ in captioned} == set(g.COLOURS) and {shape for _, shape in captioned} == set(g.SHAPES)


@pytest.mark.parametrize("share", [0.0, 0.05, 0.5])
def test_translated_captions_are_the_share_and_never_of_a_held_out_scene(tmp_path, share):
    scenes = {index: {"colour": colour, "shape": shape} for index, (colour, shape) in enumerate(paint_mini.SCENES * 10)}
    paths = {index: f"{index}.png" for index in scenes}
    config = dataclasses.replace(paint_mini.CONFIG, translated_share=share)
    counts = paint_mini.write_captions(tmp_path, scenes, paths, sorted(scenes), config)
    records = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text("utf-8").splitlines()]
    chinese = [r for r in records if r["caption"] != g.describe("en", **scenes[int(r["image"].split(".")[0])])]
    assert counts == {"en": len(records) - len(chinese), "zh": len(chinese)} and len(chinese) == round(share * 240)
    for record in chinese:
        scene = scenes[int(record["image"].split(".")[0])]
        assert record["caption"] == g.describe("zh", **scene)
        assert (scene["colour"], scene["shape"]) not in paint_mini.HELD_OUT_SCENES


def test_a_translated_share_above_half_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="held-out scenes"):
        dataclasses.replace(paint_mini.CONFIG, translated_share=0.6)


def test_installed_default_holds_no_code_and_loads(tmp_path):
    from tiny_models import tiny_pipeline

    tiny_pipeline(tmp_path).save_pretrained(tmp_path / "trained")
    results = {"systems": {"mpm": {"model": str(tmp_path / "trained")}}}
    installed = paint_mini.install_default(results, "mpm", tmp_path / "default")
    assert not list(installed.rglob("*.py")) and not list(tmp_path.glob(".default*"))  # nor a staging folder
    # nor a pointer to code: the trained folder's tokenizer names its module in `auto_map`
    assert "auto_map" in (tmp_path / "trained" / "tokenizer" / "tokenizer_config.json").read_text()
    assert not [path for path in installed.rglob("*.json") if "auto_map" in path.read_text()]
    pipeline, trained = (VisCPMPaintPipeline.from_pretrained(folder) for folder in (installed, tmp_path / "trained"))
    for name in ("text_encoder", "unet", "vae"):
        expected = getattr(trained, name).state_dict()
        assert all(torch.equal(value, expected[key]) for key, value in getattr(pipeline, name).state_dict().items())


def test_shipped_default_draws_what_english_and_chinese_prompts_ask():
    """Every scene from its English and its Chinese caption (8 seeds), judged by the experiment's classifier,
    trained here on easy-VQA's labels. The default trained on 5% Chinese captions, none of a held-out scene
    (docs/paint-mini.md): with this test's judge seeds 11-13 on the development machine, English both 78-84%,
    Chinese colour 78-82%, shape 84-92% and both 65-74%, the held-out scenes' Chinese both 31-55% (chance 4%).
    Another CPU trains another judge (the previous default's Chinese shape read 44-70% over judge seeds on an AMD
    EPYC), so the floors sit about 15 points under what this machine measured."""
    config = dataclasses.replace(paint_mini.CONFIG, images_per_prompt=8, seed=11)
    _, pixels, labels, _, _ = paint_mini.labelled_images("train", config.resolution, limit=2000)
    classifier = paint_mini.train_classifier(config, pixels, labels)
    accuracy, _ = paint_mini.evaluate(defaults.PAINT, classifier, config)
    assert accuracy["en"]["both"] >= 0.65, accuracy
    assert accuracy["zh"]["colour"] >= 0.6 and accuracy["zh"]["shape"] >= 0.7, accuracy
    assert accuracy["zh"]["both"] >= 0.5, accuracy
    assert accuracy["zh_held_out"]["both"] >= 0.15, accuracy


def test_paint_command_draws_with_the_shipped_default(tmp_path, capsys):
    output = tmp_path / "red-circle.png"
    assert main(["paint", g.describe("zh", "red", "circle"), "-o", str(output), "--seed", "0", "--steps", "10"]) == 0
    from PIL import Image

    assert Image.open(output).size == (paint_mini.CONFIG.resolution,) * 2
    printed = capsys.readouterr()
    assert printed.out.strip() == str(output)
    assert printed.err == ""  # the denoising bar shows only on a terminal or with --verbose
