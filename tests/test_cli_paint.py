"""`viscpm paint`: outputs checked before drawing, and work beyond the budget refused before it starts."""

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from cli_support import assert_one_error_line, run_cli
from paint_support import assert_uint8_close, viscpmpaint_generate_settings


@pytest.mark.parametrize("output", ["x.xyz", "noextension", "/proc/viscpm/x.png", "file.txt/x.png", "new/deep/x.xyz"])
def test_paint_refuses_an_output_it_could_not_write_before_drawing(capsys, tmp_path, monkeypatch, output):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_text("mine")
    code, out, err = run_cli(capsys, "paint", "一个红色的圆形", "--steps", "1", "-o", output)
    assert_one_error_line(code, out, err, "-o", output)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["file.txt"], "nothing created"


def test_paint_creates_the_output_folder_it_needs(capsys, tmp_path):
    output = tmp_path / "new" / "deep" / "x.png"
    code, out, err = run_cli(capsys, "paint", "一个红色的圆形", "--steps", "1", "-o", output)
    assert code == 0 and output.is_file(), err


@pytest.mark.parametrize("size", [["--height", "100000", "--width", "100000"], ["--num-images", "100000"]])
def test_paint_refuses_work_beyond_its_budget_before_drawing(capsys, tmp_path, size):
    """`--height 100000 --width 100000` grew to 23 GB before the OOM killer ended it."""
    code, out, err = run_cli(capsys, "paint", "一个红色的圆形", *size, "-o", tmp_path / "x.png")
    assert_one_error_line(code, out, err, "pixel-steps", "--max-pixel-steps")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.golden
def test_paint_command_writes_the_golden_image(converted_paint, golden_dir, tmp_path, capsys):
    """`viscpm paint` on the converted golden checkpoint, with the golden prompt and seed (default 50 DDPM steps)."""
    from viscpm.cli import main

    prompt, seed = viscpmpaint_generate_settings(golden_dir)
    fixture = load_file(golden_dir / "paint" / "viscpmpaint_generate.safetensors")
    _, height, width, _ = fixture["image_uint8"].shape
    output = tmp_path / "painted.png"
    argv = ["paint", prompt, "--model", str(converted_paint), "-o", str(output), "--seed", str(seed)]
    assert main(argv + ["--height", str(height), "--width", str(width)]) == 0
    assert str(output) in capsys.readouterr().out
    assert_uint8_close(np.asarray(Image.open(output).convert("RGB"))[None], fixture["image_uint8"].numpy(), "cli")
    assert main(["paint", "  ", "--model", str(converted_paint), "-o", str(output)]) == 2
    assert main(["paint", prompt, "--model", str(tmp_path), "-o", str(output)]) == 2
    assert "model_index.json" in capsys.readouterr().err
