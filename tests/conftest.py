"""Shared test helpers.

Golden-parity tests (marker ``golden``) read the fixture folder named by ``VISCPM_GOLDEN``
(default ``../shared/golden`` relative to the repository root). Every dimension, file name and
expected value comes from that folder, so the same tests run against other fixture folders of
the same layout.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def golden_root() -> Path:
    return (REPO_ROOT / os.environ.get("VISCPM_GOLDEN", "../shared/golden")).resolve()


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    root = golden_root()
    if not (root / "MANIFEST.md").is_file():
        pytest.fail(
            f"golden fixture folder {root} not found (no MANIFEST.md): set VISCPM_GOLDEN to the "
            "folder, or deselect these tests with -m 'not golden'"
        )
    return root


@pytest.fixture(scope="session")
def golden_vocab_file(golden_dir) -> Path:
    return golden_dir / "vocab" / "bee.txt"


def load_json(path: Path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def json_array(entry) -> np.ndarray:
    """A fixture array stored as ``{dtype, shape, data}``."""
    return np.asarray(entry["data"], dtype=entry["dtype"]).reshape(entry["shape"])


def pairs_to_dict(pairs) -> dict:
    """Dicts with int keys are stored as ``[key, value]`` pair lists in insertion order."""
    return {key: value for key, value in (pairs or [])}


def assert_tensor_equal(actual, expected, name=""):
    actual = torch.as_tensor(np.asarray(actual) if not isinstance(actual, torch.Tensor) else actual)
    expected = torch.as_tensor(np.asarray(expected) if not isinstance(expected, torch.Tensor) else expected)
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    assert torch.equal(actual.long(), expected.long()), f"{name}: values differ"


@pytest.fixture(scope="session")
def converted_golden_chat(golden_dir, tmp_path_factory) -> Path:
    """The golden original VisCPM-Chat checkpoint through the conversion users run (read-only for tests)."""
    from viscpm.conversion.chat import convert_chat

    (checkpoint,) = sorted((golden_dir / "chat").glob("*.pt"))
    output = tmp_path_factory.mktemp("golden-chat") / "converted"
    convert_chat(checkpoint, golden_dir / "vocab" / "bee.txt", output, config=golden_dir / "chat" / "config.json")
    return output
