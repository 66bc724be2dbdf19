"""`viscpm chat`: golden answers with the chat defaults and one beam, in-process through `main()` plus one real
subprocess, and one error line for each bad input.

The golden tests ask the converted tiny VisCPM-Chat the original's questions and compare answers, next contexts and
generated ids with `chat/generate_beam.json`; every value (answers, ids, settings, limits) comes from the fixtures or
the converted folder.
"""

import json
import math
import os
import subprocess
import sys

import pytest
from PIL import Image

from cli_support import assert_matches_case, assert_one_error_line, chat_argv, chat_error, run_cli
from conftest import REPO_ROOT, load_json
from viscpm import budgets, defaults

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
    code, out, _ = run_cli(
        capsys,
        "chat",
        "--image",
        REPO_ROOT / "examples" / "circle.png",
        "--question",
        "图中是什么形状？",
        "--max-tokens",
        "1",
        "--json",
    )
    assert code == 0 and len(json.loads(out)["token_ids"]) == 1
