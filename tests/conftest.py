"""Shared test helpers.

Golden-parity tests (marker ``golden``) run once per golden fixture folder: the folders named by ``VISCPM_GOLDEN``
(separated by ``os.pathsep``, relative to the repository root), by default the repository's own sets
(``tests/fixtures/golden*``) and every ``../shared/golden*`` folder. Every dimension, file name and expected value
comes from the folder, so the same tests run unchanged on any folder of the same layout.

A test reaches its folder through the ``golden_dir`` fixture (directly or through other fixtures); a test whose
cases are listed in a fixture file declares them with ``golden_cases(argname, load)``, ``load(folder)`` returning
that folder's cases.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# fixtures and helpers shared by the test files of one subject
pytest_plugins = ["cli_support", "paint_support", "serving_support"]

REPO_ROOT = Path(__file__).resolve().parent.parent
OWN_GOLDEN = REPO_ROOT / "tests" / "fixtures"
SHARED = REPO_ROOT.parent / "shared"


def golden_folders() -> list[Path]:
    named = os.environ.get("VISCPM_GOLDEN")
    if named:
        return [(REPO_ROOT / Path(part).expanduser()).resolve() for part in named.split(os.pathsep) if part]
    own = [folder.resolve() for folder in sorted(OWN_GOLDEN.glob("golden*")) if (folder / "MANIFEST.md").is_file()]
    shared = [folder.resolve() for folder in sorted(SHARED.glob("golden*")) if (folder / "MANIFEST.md").is_file()]
    return own + shared or [(SHARED / "golden").resolve()]


def golden_labels(folders: list[Path]) -> list[str]:
    """Short test-id labels: each folder's name, with its parents' names where names repeat."""
    for depth in range(1, max(len(folder.parts) for folder in folders) + 1):
        labels = ["/".join(folder.parts[-depth:]) for folder in folders]
        if len(set(labels)) == len(labels):
            return labels
    return [str(folder) for folder in folders]


def golden_cases(argname: str, load, ids=None):
    """Parametrize ``argname`` with ``load(folder)``'s cases for every golden folder (``ids(case)`` names them)."""
    return pytest.mark.golden_cases(argname, load, ids)


def pytest_configure(config):
    config.addinivalue_line("markers", "golden_cases(argname, load, ids): cases read from each golden folder")


def pytest_generate_tests(metafunc):
    if "golden_dir" not in metafunc.fixturenames:
        return
    folders = golden_folders()
    labels = golden_labels(folders)
    marker = metafunc.definition.get_closest_marker("golden_cases")
    if marker is None:
        metafunc.parametrize("golden_dir", folders, indirect=True, ids=labels)
        return
    argname, load, ids = marker.args
    params = []
    for folder, label in zip(folders, labels):
        if not (folder / "MANIFEST.md").is_file():
            params.append(pytest.param(folder, None, id=f"{label}-missing"))  # golden_dir fails, naming the folder
            continue
        for index, case in enumerate(load(folder)):
            params.append(pytest.param(folder, case, id=f"{label}-{ids(case) if ids else index}"))
    metafunc.parametrize(["golden_dir", argname], params, indirect=["golden_dir"])


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    """All tests of one golden folder, then the next: each folder's models are built once."""
    order = {folder: index for index, folder in enumerate(golden_folders())}

    def folder_index(item):
        callspec = getattr(item, "callspec", None)
        return order.get(callspec.params.get("golden_dir"), -1) if callspec else -1

    items.sort(key=folder_index)


@pytest.fixture(scope="session")
def golden_dir(request) -> Path:
    root = Path(request.param)
    if not (root / "MANIFEST.md").is_file():
        pytest.fail(
            f"golden fixture folder {root} not found (no MANIFEST.md): set VISCPM_GOLDEN to the folder(s), or "
            "deselect these tests with -m 'not golden'"
        )
    return root


@pytest.fixture(scope="session")
def golden_vocab_file(golden_dir) -> Path:
    return golden_dir / "vocab" / "bee.txt"


def only_checkpoint(folder: Path) -> Path:
    """The one original checkpoint (``*.pt``) of a golden folder's model folder."""
    checkpoints = sorted(folder.glob("*.pt"))
    assert len(checkpoints) == 1, f"expected one original checkpoint (*.pt) in {folder}, found {checkpoints}"
    return checkpoints[0]


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

    output = tmp_path_factory.mktemp("golden-chat") / "converted"
    convert_chat(
        only_checkpoint(golden_dir / "chat"),
        golden_dir / "vocab" / "bee.txt",
        output,
        config=golden_dir / "chat" / "config.json",
    )
    return output


def chat_as_remote_code(folder: Path, image: Path, question: str, workdir: Path, max_new_tokens: int = 6) -> dict:
    """Load ``folder`` with ``trust_remote_code=True`` in a fresh process where viscpm cannot be imported, as on a
    machine without it, and ask one question: {"answer", "ids", "modules"} (the classes' modules)."""
    script = f"""
import json, sys, torch
sys.modules["viscpm"] = None  # `import viscpm` fails from here on
from PIL import Image
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor
folder = {str(folder)!r}
model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
other = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
answer, _, _, ids = model.chat(Image.open({str(image)!r}), {question!r}, processor, num_beams=1,
                               max_new_tokens={max_new_tokens}, return_token_ids=True)
modules = [type(obj).__module__ for obj in (model, other, processor, processor.tokenizer, processor.image_processor)]
print(json.dumps({{"answer": answer, "ids": ids, "modules": modules}}))
"""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(workdir / "hf_home")}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=environment, cwd=workdir, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
