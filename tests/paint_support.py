"""Helpers and fixtures of the VisCPM-Paint golden tests (a pytest plugin, see conftest.py): the golden original
checkpoint converted as users convert it, its pipeline, and comparisons at the manifest's tolerances.
"""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import load_json, only_checkpoint
from viscpm.conversion.paint import convert_paint
from viscpm.modeling.pipeline_viscpm_paint import VisCPMPaintPipeline

ATOL = RTOL = 1e-4


def assert_close(actual, expected, name, atol=ATOL, rtol=RTOL):
    actual = torch.as_tensor(actual).float()
    torch.testing.assert_close(actual, expected.float(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def assert_uint8_close(actual: np.ndarray, expected: np.ndarray, name: str):
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    difference = np.abs(actual.astype(np.int16) - expected.astype(np.int16)).max()
    assert difference <= 1, f"{name}: uint8 values differ by {difference}"


# ---------------------------------------------------------------- golden parity


@pytest.fixture(scope="session")
def converted_paint(golden_dir, tmp_path_factory):
    """The golden original checkpoint through the conversion users run."""
    folder = golden_dir / "paint"
    output = tmp_path_factory.mktemp("paint") / "converted"
    convert_paint(
        only_checkpoint(folder), golden_dir / "vocab" / "bee.txt", folder / "vae", output, config=folder / "config.json"
    )
    return output


@pytest.fixture(scope="module")
def paint_pipeline(converted_paint):
    pipeline = VisCPMPaintPipeline.from_pretrained(converted_paint)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def viscpmpaint_generate_settings(golden_dir: Path) -> tuple[str, int]:
    """Prompt and seed of `paint/viscpmpaint_generate.*`, which only its MANIFEST entry gives."""
    manifest = (golden_dir / "MANIFEST.md").read_text(encoding="utf-8")
    entry = manifest.split("### `paint/viscpmpaint_generate.safetensors`", 1)[1].split("\n### ", 1)[0]
    prompt_index = int(re.search(r"generate\(paint_prompts\[(\d+)\]", entry).group(1))
    seed = int(re.search(r"manual_seed\((\d+)\)", entry).group(1))
    return load_json(golden_dir / "paint" / "text_hidden.json")["prompts"][prompt_index], seed


def paint_generate_cases(golden_dir: Path) -> list[dict]:
    return load_json(golden_dir / "paint" / "generate.json")
