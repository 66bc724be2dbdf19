"""The `viscpm` command line: `convert chat` and `chat`, in-process through `main()` plus one real subprocess.

The golden tests ask the converted tiny VisCPM-Chat the original's questions and compare answers, next contexts and
generated ids with `chat/generate_beam.json`; every value (answers, ids, settings, limits) comes from the fixtures or
the converted folder.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import REPO_ROOT, load_json
from viscpm import budgets, defaults
from viscpm.cli import CommandError, build_parser, main
from viscpm.cli import _needs_extra as needs_extra
from viscpm.conversion.chat import convert_chat

# the original's `VisCPMChat.chat` settings as the fixtures name them -> generation_config.json's names
SETTING_NAMES = {
    "beam_size": "num_beams",
    "temperature": "cpmbee_temperature",
    "repetition_penalty": "repetition_penalty",
    "length_penalty": "length_penalty",
}


def run_cli(capsys, *argv):
    """`main(argv)` in-process: (exit status, stdout, stderr)."""
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(code, out, err, *fragments):
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("viscpm: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# --------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def chat_checkpoint(golden_dir) -> Path:
    (checkpoint,) = sorted((golden_dir / "chat").glob("*.pt"))
    return checkpoint


@pytest.fixture(scope="module")
def converted_chat(tmp_path_factory, golden_dir, chat_checkpoint) -> Path:
    output = tmp_path_factory.mktemp("cli") / "viscpm-chat"
    return convert_chat(
        chat_checkpoint, golden_dir / "vocab" / "bee.txt", output, config=golden_dir / "chat" / "config.json"
    )


@pytest.fixture(scope="module")
def generate_cases(golden_dir) -> list[dict]:
    return load_json(golden_dir / "chat" / "generate_beam.json")


@pytest.fixture(scope="module")
def chat_defaults(converted_chat) -> dict:
    """The decoding settings `viscpm chat` uses when no flag is given: the folder's generation_config.json."""
    generation_config = load_json(converted_chat / "generation_config.json")
    return {setting: generation_config[name] for setting, name in SETTING_NAMES.items()}


def _settings_except_length(case) -> dict:
    return {key: value for key, value in case["settings"].items() if key in SETTING_NAMES}


@pytest.fixture(scope="module")
def default_cases(generate_cases, chat_defaults) -> list[dict]:
    """Golden generations with the chat defaults (only max_length differs)."""
    cases = [case for case in generate_cases if _settings_except_length(case) == chat_defaults]
    assert cases, f"no case of chat/generate_beam.json uses the chat defaults {chat_defaults}"
    return cases


@pytest.fixture(scope="module")
def greedy_cases(generate_cases, chat_defaults) -> list[dict]:
    """Golden generations with the chat defaults but one beam."""
    greedy = {**chat_defaults, "beam_size": 1}
    return [case for case in generate_cases if _settings_except_length(case) == greedy]


def chat_argv(model, golden_dir, case) -> list[str]:
    image = sorted((golden_dir / "chat" / "images").iterdir())[case["image_index"]]
    return [
        "chat",
        "--model",
        str(model),
        "--image",
        str(image),
        "--question",
        case["extra_inp_dict"]["question"],
        "--context",
        case["extra_inp_dict"]["context"],
        # the original decodes at most max_length + 2 tokens
        "--max-new-tokens",
        str(case["settings"]["max_length"] + 2),
    ]


def assert_matches_case(result: dict, case: dict) -> None:
    name = f"prompt {case['prompt_index']}, image {case['image_index']}, settings {case['settings']}"
    assert set(result) == {"answer", "context", "token_ids"}
    assert result["token_ids"] == [raw_id for raw_id, _ in case["result_ids"][0]], name
    assert result["answer"] == case["answer"], name
    assert result["context"] == case["next_context_as_VisCPMChat_builds"], name


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


def test_only_a_missing_module_is_reported_as_a_missing_extra():
    with pytest.raises(CommandError, match=r"training needs the train extra \(peft is missing\): pip install"):
        with needs_extra("training", "train"):
            raise ModuleNotFoundError("No module named 'peft'", name="peft")
    with pytest.raises(ImportError, match="cannot import name 'no_such_name'"):  # installed, another version
        with needs_extra("training", "train"):
            from json import no_such_name  # noqa: F401


def test_convert_takes_a_model_name():
    """`convert` has one sub-subcommand per model, so `convert paint` can join `convert chat`."""
    args = build_parser().parse_args(["convert", "chat", "--checkpoint", "a.pt", "--vocab", "v.txt", "--output", "o"])
    assert (args.command, args.model) == ("convert", "chat")
    assert args.config is None and args.overwrite is False


# ---------------------------------------------------------------------------------------------------- chat, golden


@pytest.mark.golden
def test_chat_json_matches_the_original_with_chat_defaults(capsys, converted_chat, golden_dir, default_cases):
    """The acceptance check: `viscpm chat --json` answers exactly like the original's VisCPMChat.chat."""
    for case in default_cases:
        code, out, err = run_cli(capsys, *chat_argv(converted_chat, golden_dir, case), "--json")
        assert code == 0, err
        assert out.endswith("\n") and out.count("\n") == 1, "--json prints exactly one line"
        assert_matches_case(json.loads(out), case)


@pytest.mark.golden
def test_chat_with_one_beam_matches_the_original(capsys, converted_chat, golden_dir, greedy_cases):
    if not greedy_cases:
        pytest.skip("no beam_size-1 case with the other chat defaults in chat/generate_beam.json")
    # answers that end with </s> (its id is the last token id) and answers cut at max_length alike
    for case in greedy_cases:
        code, out, err = run_cli(capsys, *chat_argv(converted_chat, golden_dir, case), "--num-beams", "1", "--json")
        assert code == 0, err
        assert_matches_case(json.loads(out), case)


@pytest.mark.golden
def test_chat_prints_the_answer(capsys, converted_chat, golden_dir, default_cases):
    case = default_cases[0]
    code, out, err = run_cli(capsys, *chat_argv(converted_chat, golden_dir, case))
    assert code == 0, err
    assert out == case["answer"] + "\n"


@pytest.mark.slow
@pytest.mark.golden
def test_python_m_viscpm_chat_json(converted_chat, golden_dir, default_cases):
    """The real entry point, in a fresh interpreter: `python -m viscpm chat ... --json`."""
    case = default_cases[0]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    completed = subprocess.run(
        [sys.executable, "-m", "viscpm", *chat_argv(converted_chat, golden_dir, case), "--json"],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        cwd=REPO_ROOT,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    assert_matches_case(json.loads(completed.stdout), case)


@pytest.mark.golden
def test_chat_sampling_is_reproducible_with_a_seed(capsys, converted_chat, golden_dir, default_cases):
    argv = [*chat_argv(converted_chat, golden_dir, default_cases[0]), "--do-sample", "--seed", "0", "--json"]
    argv[argv.index("--max-new-tokens") + 1] = "4"
    results = []
    for _ in range(2):
        code, out, err = run_cli(capsys, *argv)
        assert code == 0, err
        results.append(json.loads(out))
    assert results[0] == results[1]
    assert 1 <= len(results[0]["token_ids"]) <= 4


# ---------------------------------------------------------------------------------------------- chat, bad input


@pytest.fixture
def image_file(golden_dir) -> Path:
    return sorted((golden_dir / "chat" / "images").iterdir())[0]


def chat_error(capsys, model, image, question="What is this?", *extra):
    return run_cli(capsys, "chat", "--model", model, "--image", image, "--question", question, *extra)


@pytest.mark.golden
def test_chat_missing_image(capsys, converted_chat, tmp_path):
    missing = tmp_path / "missing.png"
    assert_one_error_line(*chat_error(capsys, converted_chat, missing), "--image", str(missing), "does not exist")


@pytest.mark.golden
def test_chat_file_that_is_not_an_image(capsys, converted_chat, tmp_path):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image", encoding="utf-8")
    assert_one_error_line(*chat_error(capsys, converted_chat, not_an_image), "--image", "not an image")


@pytest.mark.golden
def test_chat_image_over_the_pixel_limit(capsys, converted_chat, tmp_path):
    limit = load_json(converted_chat / "processor_config.json")["image_processor"]["max_image_pixels"]
    side = math.isqrt(limit) + 1
    huge = tmp_path / "huge.png"
    Image.new("1", (side, side)).save(huge)  # compresses to a few KiB
    assert_one_error_line(*chat_error(capsys, converted_chat, huge), "--image", "over the limit", str(limit))


@pytest.mark.golden
def test_chat_empty_question(capsys, converted_chat, image_file):
    for question in ("", "  \n"):
        assert_one_error_line(*chat_error(capsys, converted_chat, image_file, question), "--question", "empty")


def test_chat_missing_model_folder(capsys, tmp_path, golden_dir):
    missing = tmp_path / "no-such-model"
    image = sorted((golden_dir / "chat" / "images").iterdir())[0]
    assert_one_error_line(*chat_error(capsys, missing, image), "--model", str(missing), "no such folder")


def test_chat_folder_that_is_not_viscpm_chat(capsys, tmp_path, golden_dir):
    image = sorted((golden_dir / "chat" / "images").iterdir())[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_error_line(*chat_error(capsys, empty, image), "--model", "not a converted VisCPM-Chat folder")
    other = tmp_path / "cpmbee"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "cpmbee"}), encoding="utf-8")
    assert_one_error_line(*chat_error(capsys, other, image), "--model", "'cpmbee'", "not VisCPM-Chat")
    a_file = tmp_path / "model.safetensors"
    a_file.write_bytes(b"")
    assert_one_error_line(*chat_error(capsys, a_file, image), "--model", "not a folder")


@pytest.mark.golden
def test_chat_folder_without_weights(capsys, converted_chat, image_file, tmp_path):
    folder = tmp_path / "no-weights"
    folder.mkdir()
    for path in converted_chat.iterdir():
        if path.suffix != ".safetensors":
            (folder / path.name).write_bytes(path.read_bytes())
    assert_one_error_line(*chat_error(capsys, folder, image_file), "--model", "cannot load the model")


@pytest.mark.golden
def test_chat_prompt_too_long(capsys, converted_chat, image_file):
    limit = load_json(converted_chat / "processor_config.json")["max_prompt_length"]
    context = "User: hi\nAI: hello\n" * limit  # several tokens per turn: well over the limit
    code, out, err = chat_error(capsys, converted_chat, image_file, "What is this?", "--context", context)
    assert_one_error_line(code, out, err, f"more than the limit of {limit}", "--max-prompt-tokens")


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


# ------------------------------------------------------------------------------------ careless input (issue 16)


@pytest.mark.parametrize("command", [["chat", "--image", "x.png", "--question", "q"], ["paint", "a", "-o", "x.png"]])
@pytest.mark.parametrize("seed", ["100000000000000000000000", "-1"])
def test_a_seed_out_of_range_is_a_usage_error(capsys, command, seed):
    code, out, err = run_cli(capsys, *command, "--seed", seed)
    assert code == 2 and out == "" and "argument --seed: expected a seed from 0 to 2**64 - 1" in err
    assert "Traceback" not in err


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


@pytest.mark.parametrize("size", [["--height", "100000", "--width", "100000"], ["--num-images", "100000"]])
def test_paint_refuses_work_beyond_its_budget_before_drawing(capsys, tmp_path, size):
    """`--height 100000 --width 100000` grew to 23 GB before the OOM killer ended it."""
    code, out, err = run_cli(capsys, "paint", "一个红色的圆形", *size, "-o", tmp_path / "x.png")
    assert_one_error_line(code, out, err, "pixel-steps", "--max-pixel-steps")
    assert not (tmp_path / "x.png").exists()


TOY_PROMPT_LIMIT = load_json(defaults.CHAT / "processor_config.json")["max_prompt_length"]


@pytest.mark.parametrize(
    ("arguments", "fragments"),
    [
        (
            ["--question", "what ?", "--max-new-tokens", str(budgets.DEFAULT_MAX_TOKENS + 1)],
            [f"from 1 to {budgets.DEFAULT_MAX_TOKENS}", "--max-tokens"],
        ),
        (["--question", "what ?", "--max-new-tokens", "9", "--max-tokens", "8"], ["from 1 to 8", "--max-tokens"]),
        (
            ["--question", "a b " * TOY_PROMPT_LIMIT],
            [f"more than the limit of {TOY_PROMPT_LIMIT}", "--max-prompt-tokens"],
        ),
        (
            ["--question", "what is it ?", "--max-prompt-tokens", "8"],
            ["more than the limit of 8", "--max-prompt-tokens"],
        ),
    ],
)
def test_chat_refuses_work_beyond_its_budget_before_loading_the_model(capsys, monkeypatch, arguments, fragments):
    from transformers import AutoModel

    monkeypatch.setattr(AutoModel, "from_pretrained", lambda *a, **k: pytest.fail("loaded the model"))
    code, out, err = run_cli(capsys, "chat", "--image", REPO_ROOT / "examples" / "circle.png", *arguments)
    assert_one_error_line(code, out, err, *fragments)


def test_chat_without_max_new_tokens_stays_within_the_limit(capsys):
    code, out, _ = run_cli(capsys, "chat", "--image", REPO_ROOT / "examples" / "circle.png", "--question",
                           "图中是什么形状？", "--max-tokens", "1", "--json")  # fmt: skip
    assert code == 0 and len(json.loads(out)["token_ids"]) == 1


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
