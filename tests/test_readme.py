"""The README's code blocks run as written, on the shipped toy models, offline.

A block runs unless an HTML comment right above it marks it: `set-up (CI runs it)` (install and test: CI runs exactly
these), `template` (it names files the user brings) or `needs `viscpm serve`` (run here against a server on a free
port). Each block runs in a fresh process, in a temporary folder holding the repository's `examples/`.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

pytestmark = pytest.mark.slow

BLOCK = re.compile(r"(?:<!-- readme-test: (?P<mark>[^\n]*?) -->\n)?```(?P<language>\w*)\n(?P<code>.*?)```", re.S)
SET_UP, TEMPLATE, NEEDS_SERVER = "set-up (CI runs it)", "template", "needs `viscpm serve`"
SERVED_AT = "127.0.0.1:8000"


def readme_blocks() -> list[dict]:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    blocks = []
    for match in BLOCK.finditer(text):
        line = text.count("\n", 0, match.start("code"))
        blocks.append({"mark": match["mark"], "language": match["language"], "code": match["code"], "line": line})
    return blocks


def blocks_marked(mark):
    return [pytest.param(block, id=f"line-{block['line']}") for block in readme_blocks() if block["mark"] == mark]


@pytest.fixture
def workdir(tmp_path) -> Path:
    (tmp_path / "examples").symlink_to(REPO_ROOT / "examples")
    return tmp_path


def environment() -> dict:
    # the `viscpm` command of the Python running the tests, offline
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "HF_HUB_OFFLINE": "1"}


def run_block(block: dict, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    command = {"bash": ["bash", "-euo", "pipefail", "-c"], "python": [sys.executable, "-c"]}[block["language"]]
    return subprocess.run(
        [*command, block["code"]], cwd=cwd, env=environment(), capture_output=True, text=True, timeout=timeout
    )


def test_every_block_runs_or_says_why_not():
    blocks = readme_blocks()
    assert len(blocks) >= 8
    for block in blocks:
        assert block["language"] in {"bash", "python"}, f"README line {block['line']}: a block without a language"
        assert block["mark"] in {None, SET_UP, TEMPLATE, NEEDS_SERVER}, f"README line {block['line']}: {block['mark']}"
    set_up = [block["code"] for block in blocks if block["mark"] == SET_UP]
    ci = (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert len(set_up) == 2 and all(code.strip() in ci for code in set_up), "CI runs the README's two set-up commands"


@pytest.mark.parametrize("block", blocks_marked(None))
def test_block_runs_as_written(block, workdir):
    result = run_block(block, workdir)
    assert result.returncode == 0, f"README line {block['line']}:\n{result.stdout}\n{result.stderr}"


@pytest.mark.parametrize("block", blocks_marked(NEEDS_SERVER))
def test_block_runs_against_a_served_model(block, workdir):
    assert SERVED_AT in block["code"]
    server = subprocess.Popen(
        [sys.executable, "-m", "viscpm", "serve", "--port", "0"],
        cwd=workdir,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        banner = server.stdout.readline()
        served = re.search(r"http://([\d.]+:\d+)/v1", banner)
        assert served, f"viscpm serve printed {banner!r}"
        block = {**block, "code": block["code"].replace(SERVED_AT, served[1])}
        result = run_block(block, workdir)
        assert result.returncode == 0, f"README line {block['line']}:\n{result.stdout}\n{result.stderr}"
        assert result.stdout.strip()
    finally:
        server.terminate()
        server.wait(timeout=30)
