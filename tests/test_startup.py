"""What a user meets first: `--help` fast (no torch, no transformers), `import viscpm` light yet teaching the Auto
classes, and one-shot commands that print only their result (the libraries' noise behind `--verbose`)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

HEAVY = ("torch", "transformers", "diffusers", "bitsandbytes")
# every command and subcommand of the parser
HELP_COMMANDS = [
    [],
    ["convert"],
    ["convert", "chat"],
    ["convert", "paint"],
    ["chat"],
    ["paint"],
    ["train"],
    ["merge-lora"],
    ["experiment"],
    ["serve"],
    ["demo"],
]


def python(code: str, *arguments: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", code, *arguments], capture_output=True, text=True, env=environment, timeout=300
    )


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=lambda command: " ".join(command) or "viscpm")
def test_help_imports_neither_torch_nor_transformers(command):
    result = python(
        "import json, runpy, sys\n"
        "sys.argv = ['viscpm', *sys.argv[1:], '--help']\n"
        "try:\n    runpy.run_module('viscpm', run_name='__main__')\n"
        "except SystemExit as exit_:\n    code = exit_.code\n"
        f"print(json.dumps([code, [name for name in {HEAVY!r} if name in sys.modules]]), file=sys.stderr)",
        *command,
    )
    code, heavy = json.loads(result.stderr.strip().splitlines()[-1])
    assert code in (0, None) and result.stdout.startswith("usage: viscpm")
    assert heavy == []


@pytest.mark.slow
def test_import_viscpm_is_light_and_still_registers_the_auto_classes():
    result = python(
        "import sys\n"
        "import viscpm\n"
        f"assert not [name for name in {HEAVY!r} if name in sys.modules], sys.modules.keys()\n"
        "from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer\n"
        "config = AutoConfig.from_pretrained(viscpm.defaults.CPMBEE)\n"
        "assert type(config).__name__ == 'CpmBeeConfig'\n"
        "assert type(AutoModelForCausalLM.from_config(config)).__name__ == 'CpmBeeForCausalLM'\n"
        "assert type(AutoTokenizer.from_pretrained(viscpm.defaults.CPMBEE)).__name__ == 'CpmBeeTokenizer'\n"
        # a chat needs neither diffusers nor bitsandbytes
        "assert 'diffusers' not in sys.modules and 'bitsandbytes' not in sys.modules\n"
        "print('ok')"
    )
    assert result.stdout.strip() == "ok", result.stderr


@pytest.mark.slow
def test_auto_classes_learn_viscpm_after_a_library_asked_whether_transformers_is_installed():
    # diffusers, accelerate and peft look transformers up (importlib.util.find_spec) before anything imports it
    result = python(
        "import importlib.util\n"
        "import viscpm\n"
        "assert importlib.util.find_spec('transformers') is not None\n"
        "from transformers import AutoProcessor\n"
        "print(type(AutoProcessor.from_pretrained(viscpm.defaults.CHAT)).__name__)"
    )
    assert result.stdout.strip() == "VisCPMChatProcessor", result.stderr


@pytest.mark.slow
def test_auto_classes_learn_viscpm_when_transformers_came_first():
    result = python(
        "from transformers import AutoConfig\n"
        "import viscpm\n"
        "print(type(AutoConfig.from_pretrained(viscpm.defaults.CHAT)).__name__)"
    )
    assert result.stdout.strip() == "VisCPMChatConfig", result.stderr


@pytest.mark.slow
def test_chat_prints_only_the_answer_unless_verbose():
    arguments = ["chat", "--image", str(REPO_ROOT / "examples" / "circle.png"), "--question", "图中是什么形状？"]
    run = "import sys; from viscpm.cli import main; sys.exit(main(sys.argv[1:]))"
    quiet = python(run, *arguments, "--num-beams", "1")  # greedy: transformers would warn about the beam settings
    assert quiet.returncode == 0 and quiet.stdout.strip() and quiet.stderr == "", quiet.stderr
    verbose = python(run, *arguments, "--verbose")
    assert verbose.returncode == 0 and verbose.stdout == quiet.stdout
    assert "Loading weights" in verbose.stderr


@pytest.mark.slow
def test_paint_shows_its_steps_only_on_a_terminal_or_when_verbose(tmp_path):
    """The denoising steps' bar is the command's own progress: on a terminal, or with --verbose. A script reading
    stderr (no terminal here) gets nothing but the image's path on stdout: no bar, and none of the note about a
    missing optional kernel that bitsandbytes (imported by diffusers) logs on this CPU."""
    run = "import sys; from viscpm.cli import main; sys.exit(main(sys.argv[1:]))"
    arguments = ["paint", "一个红色的圆形", "--steps", "2", "--seed", "0", "-o", str(tmp_path / "circle.png")]
    quiet = python(run, *arguments)
    assert quiet.returncode == 0 and quiet.stdout.strip() == str(tmp_path / "circle.png"), quiet.stderr
    assert quiet.stderr == ""
    verbose = python(run, *arguments, "--verbose")
    assert verbose.returncode == 0 and "2/2" in verbose.stderr, verbose.stderr
