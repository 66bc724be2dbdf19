"""`viscpm convert chat`: a loadable folder from the golden checkpoint, and one error line for each bad input."""

from pathlib import Path

import pytest
import torch

from cli_support import assert_one_error_line, run_cli
from conftest import load_json
from paint_support import only_checkpoint
from viscpm.cli import build_parser


def test_convert_takes_a_model_name():
    """`convert` has one sub-subcommand per model, so `convert paint` can join `convert chat`."""
    args = build_parser().parse_args(["convert", "chat", "--checkpoint", "a.pt", "--vocab", "v.txt", "--output", "o"])
    assert (args.command, args.model) == ("convert", "chat")
    assert args.config is None and args.overwrite is False


# ------------------------------------------------------------------------------------------------- convert chat


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {path.name: (path.stat().st_size, path.stat().st_mtime_ns) for path in folder.iterdir()}


def convert_argv(checkpoint, vocab, output, *extra) -> list:
    """`convert chat` with the checkpoint folder's own original-format config (the fixtures' dimensions)."""
    argv = ["convert", "chat", "--checkpoint", checkpoint, "--vocab", vocab, "--output", output, *extra]
    config = Path(checkpoint).parent / "config.json"
    return argv + ["--config", config] if config.is_file() and "--config" not in extra else argv


@pytest.mark.golden
def test_convert_chat_writes_a_loadable_folder(capsys, golden_dir, chat_checkpoint, converted_chat, tmp_path):
    output = tmp_path / "converted"
    output.mkdir()
    (output / "stale.txt").write_text("from an earlier run", encoding="utf-8")
    vocab, config = golden_dir / "vocab" / "bee.txt", golden_dir / "chat" / "config.json"
    code, out, err = run_cli(capsys, *convert_argv(chat_checkpoint, vocab, output, "--config", config, "--overwrite"))
    assert code == 0, err
    assert str(output) in out
    assert sorted(_listing(output)) == sorted(_listing(converted_chat)), "--overwrite replaces the whole folder"
    assert load_json(output / "config.json") == load_json(converted_chat / "config.json")


@pytest.mark.golden
def test_convert_chat_refuses_an_existing_output(capsys, golden_dir, chat_checkpoint, converted_chat):
    before = _listing(converted_chat)
    siblings = sorted(converted_chat.parent.iterdir())
    code, out, err = run_cli(capsys, *convert_argv(chat_checkpoint, golden_dir / "vocab" / "bee.txt", converted_chat))
    assert_one_error_line(code, out, err, str(converted_chat), "exists", "--overwrite")
    assert _listing(converted_chat) == before
    assert sorted(converted_chat.parent.iterdir()) == siblings


def test_convert_chat_missing_checkpoint(capsys, golden_dir, tmp_path):
    missing, output = tmp_path / "missing.pt", tmp_path / "out"
    code, out, err = run_cli(capsys, *convert_argv(missing, golden_dir / "vocab" / "bee.txt", output))
    assert_one_error_line(code, out, err, "--checkpoint", str(missing), "no such file")
    assert sorted(tmp_path.iterdir()) == []


def test_convert_chat_checkpoint_that_is_not_viscpm_chat(capsys, golden_dir, tmp_path):
    checkpoint = tmp_path / "other.pt"
    torch.save({"unet.conv_in.weight": torch.zeros(2, 2), "step": torch.tensor(3)}, checkpoint)
    output = tmp_path / "out"
    code, out, err = run_cli(capsys, *convert_argv(checkpoint, golden_dir / "vocab" / "bee.txt", output))
    assert_one_error_line(code, out, err, "VisCPM-Chat checkpoint")
    assert sorted(tmp_path.iterdir()) == [checkpoint]


@pytest.mark.golden
def test_convert_chat_vocab_of_the_wrong_size(capsys, golden_dir, chat_checkpoint, tmp_path):
    vocab = tmp_path / "bee.txt"
    data = (golden_dir / "vocab" / "bee.txt").read_bytes()
    vocab.write_bytes(data + (b"" if data.endswith(b"\n") else b"\n") + b"an-extra-token-the-model-lacks\n")
    output = tmp_path / "out"
    code, out, err = run_cli(capsys, *convert_argv(chat_checkpoint, vocab, output))
    assert_one_error_line(code, out, err, str(vocab), "tokens", "rows")
    assert sorted(tmp_path.iterdir()) == [vocab]


@pytest.mark.golden
def test_convert_paint_command(golden_dir, tmp_path, capsys):
    from viscpm.cli import main

    paint = golden_dir / "paint"
    argv = [
        "convert",
        "paint",
        "--checkpoint",
        str(only_checkpoint(paint)),
        "--vocab",
        str(golden_dir / "vocab" / "bee.txt"),
    ]
    argv += ["--config", str(paint / "config.json"), "--output", str(tmp_path / "out")]
    assert main(argv + ["--vae", str(paint / "vae")]) == 0
    assert (tmp_path / "out" / "model_index.json").is_file()
    assert main(argv + ["--vae", str(tmp_path / "missing"), "--overwrite"]) == 2
    assert "AutoencoderKL" in capsys.readouterr().err
