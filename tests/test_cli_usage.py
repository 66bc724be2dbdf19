"""The `viscpm` command line as a careless user meets it: usage errors, missing extras, broken model folders, and
no command line that ends in a traceback (fuzzed).
"""

import json
import shutil
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli_support import assert_one_error_line, run_cli
from conftest import REPO_ROOT, load_json
from viscpm import defaults
from viscpm.cli import CommandError
from viscpm.cli import _needs_extra as needs_extra

# ------------------------------------------------------------------------------------------------------ parser


def test_usage_errors_exit_2(capsys):
    for argv in ([], ["convert"], ["nonsense"], ["chat", "--model", "m", "--image", "i"]):
        code, out, err = run_cli(capsys, *argv)
        assert code == 2, argv
        assert "usage: viscpm" in err and "error:" in err, argv
    code, out, _ = run_cli(capsys, "chat", "--model", "m", "--image", "i", "--question", "q", "--max-new-tokens", "0")
    assert code == 2
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "convert" in out and "chat" in out


@pytest.mark.parametrize(
    "argv", [["train", "chat-sft", "--config", "\0"], ["chat", "--image", "a\0.png", "--question", "q"]]
)
def test_a_nul_character_in_an_argument_is_one_error_line(capsys, argv):
    assert_one_error_line(*run_cli(capsys, *argv), "NUL character")


def test_only_a_missing_module_is_reported_as_a_missing_extra():
    with pytest.raises(CommandError, match=r"training needs the train extra \(peft is missing\): pip install"):
        with needs_extra("training", "train"):
            raise ModuleNotFoundError("No module named 'peft'", name="peft")
    with pytest.raises(ImportError, match="cannot import name 'no_such_name'"):  # installed, another version
        with needs_extra("training", "train"):
            from json import no_such_name  # noqa: F401


@pytest.mark.parametrize("name", ["mpm-mini", "paint-mini"])
def test_an_experiment_without_its_extra_says_so_and_leaves_no_folder(capsys, monkeypatch, tmp_path, name):
    monkeypatch.setitem(sys.modules, "easy_vqa", None)  # `import easy_vqa` fails as if it were not installed
    code, _, err = run_cli(capsys, "experiment", name, "--quick", "--output", str(tmp_path / "run"))
    assert code == 2 and "needs the experiment extra (easy_vqa is missing)" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv, missing, message",
    [
        (["paint", "a red circle", "-o", "x.png"], "diffusers", "viscpm paint needs the paint extra"),
        (
            ["convert", "paint", "--checkpoint", "p", "--output", "o"],
            "diffusers",
            "converting Paint needs the paint extra",
        ),
        (["train", "chat-pretrain", "--set", "model=m"], "datasets", "training needs the train extra"),
        (["train", "chat-sft", "--set", "model=m"], "peft", "training needs the train extra"),
        (["merge-lora", "adapter", "--output", "o"], "peft", "merge-lora needs the train extra"),
    ],
)
def test_a_command_without_its_extra_says_so(capsys, monkeypatch, tmp_path, argv, missing, message):
    """A wheel installed without extras: a library the command imports only once it runs (found that way) is one
    line naming the extra, not a traceback, and nothing is written."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, missing, None)  # importing it fails as if it were not installed
    for module in ("viscpm.modeling.pipeline_viscpm_paint", "viscpm.conversion.paint", "viscpm.training.merge"):
        monkeypatch.delitem(sys.modules, module, raising=False)  # imported again, as in a fresh process
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and f"{message} ({missing} is missing)" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------ careless input (issue 16)


@pytest.mark.parametrize("command", [["chat", "--image", "x.png", "--question", "q"], ["paint", "a", "-o", "x.png"]])
@pytest.mark.parametrize("seed", ["100000000000000000000000", "-1"])
def test_a_seed_out_of_range_is_a_usage_error(capsys, command, seed):
    code, out, err = run_cli(capsys, *command, "--seed", seed)
    assert code == 2 and out == "" and "argument --seed: expected a seed from 0 to 2**64 - 1" in err
    assert "Traceback" not in err


def broken_copy(tmp_path: Path, break_it) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(defaults.CHAT, folder)
    break_it(folder)
    return folder


def truncate_weights(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def config_value_of_the_wrong_type(folder: Path) -> None:
    config = load_json(folder / "config.json")
    config["query_num"] = "many"
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")


@pytest.mark.parametrize("break_it", [truncate_weights, config_value_of_the_wrong_type])
def test_a_broken_model_folder_is_one_error_line(capsys, tmp_path, break_it):
    folder = broken_copy(tmp_path, break_it)
    image = REPO_ROOT / "examples" / "circle.png"
    code, out, err = run_cli(capsys, "chat", "--model", folder, "--image", image, "--question", "图中是什么形状？")
    assert_one_error_line(code, out, err, str(folder), "cannot load")


FUZZ_COMMANDS = {
    "chat": (["--image", "--question", "--context", "--model", "--num-beams", "--seed"], ["--max-new-tokens", "1"]),
    "paint": (["--model", "--negative", "--seed", "--guidance", "--height", "--width", "-o"], ["--steps", "1"]),
    "convert chat": (["--checkpoint", "--vocab", "--config", "--output", "--dtype", "--max-shard-size"], []),
    "convert paint": (["--checkpoint", "--vocab", "--vae", "--config", "--output"], []),
    "train chat-sft": (["--config", "--set"], []),
    "merge-lora": (["--output", "--base"], []),
    "assemble-chat": (["--pivot", "--vision", "--output", "--query-num"], []),
}
fuzz_value = st.one_of(
    st.text(max_size=12), st.integers(-(2**70), 2**70).map(str), st.sampled_from(["", ".", "/", "/proc", "x.png", "-1"])
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(sorted(FUZZ_COMMANDS)), data=st.data())
def test_no_command_line_ends_in_a_traceback(capsys, tmp_path, monkeypatch, command, data):
    """Any flags with any values: exit status 0 or 2, and an error is a `... error: ...` line, never a traceback."""
    monkeypatch.chdir(tmp_path)
    flags, quick = FUZZ_COMMANDS[command]
    chosen = data.draw(st.lists(st.sampled_from(flags), max_size=4, unique=True))
    argv = command.split() + [item for flag in chosen for item in (flag, data.draw(fuzz_value))]
    if command == "paint":
        argv.insert(1, data.draw(st.text(max_size=12)))
    code, out, err = run_cli(capsys, *argv, *quick)
    assert code in (0, 2) and "Traceback" not in err, (argv, err)
    if code == 2:
        assert "error: " in err.strip().splitlines()[-1], (argv, err)
