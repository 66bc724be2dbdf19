"""Helpers and fixtures of the `viscpm` command-line tests (a pytest plugin, see conftest.py): `main()` run
in-process, and the golden chat cases with the chat defaults.
"""

from pathlib import Path

import pytest

from conftest import load_json, only_checkpoint
from viscpm.cli import main

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
    return only_checkpoint(golden_dir / "chat")


@pytest.fixture(scope="module")
def converted_chat(converted_golden_chat) -> Path:
    """The session's conversion of the golden checkpoint (read-only)."""
    return converted_golden_chat


@pytest.fixture(scope="module")
def chat_generate_cases(golden_dir) -> list[dict]:
    return load_json(golden_dir / "chat" / "generate_beam.json")


@pytest.fixture(scope="module")
def chat_defaults(converted_chat) -> dict:
    """The decoding settings `viscpm chat` uses when no flag is given: the folder's generation_config.json."""
    generation_config = load_json(converted_chat / "generation_config.json")
    return {setting: generation_config[name] for setting, name in SETTING_NAMES.items()}


def _settings_except_length(case) -> dict:
    return {key: value for key, value in case["settings"].items() if key in SETTING_NAMES}


@pytest.fixture(scope="module")
def default_cases(chat_generate_cases, chat_defaults) -> list[dict]:
    """Golden generations with the chat defaults (only max_length differs)."""
    cases = [case for case in chat_generate_cases if _settings_except_length(case) == chat_defaults]
    assert cases, f"no case of chat/generate_beam.json uses the chat defaults {chat_defaults}"
    return cases


@pytest.fixture(scope="module")
def greedy_cases(chat_generate_cases, chat_defaults) -> list[dict]:
    """Golden generations with the chat defaults but one beam."""
    greedy = {**chat_defaults, "beam_size": 1}
    return [case for case in chat_generate_cases if _settings_except_length(case) == greedy]


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


# ---------------------------------------------------------------------------------------------- chat, bad input


@pytest.fixture
def image_file(golden_dir) -> Path:
    return sorted((golden_dir / "chat" / "images").iterdir())[0]


def chat_error(capsys, model, image, question="What is this?", *extra):
    return run_cli(capsys, "chat", "--model", model, "--image", image, "--question", question, *extra)
