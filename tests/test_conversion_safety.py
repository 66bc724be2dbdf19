"""A conversion never destroys a user's files: outputs that would swallow an input, the home or the current folder are
refused before any work; `--overwrite` replaces crash-safely; killed runs leave nothing behind for good."""

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModel

from viscpm.cli import main
from viscpm.conversion import export
from viscpm.conversion.chat import chat_key, convert_chat
from viscpm.conversion.export import check_output, clear_killed_runs, staged_output


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1 and lines[0].startswith("viscpm: error: "), captured.err
    return lines[0]


def listing(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture
def sources(golden_dir, tmp_path) -> Path:
    """A user's folder holding the original checkpoint, its vocabulary and config, and a file of their own."""
    folder = tmp_path / "s"
    folder.mkdir()
    (checkpoint,) = sorted((golden_dir / "chat").glob("*.pt"))
    shutil.copy(checkpoint, folder / "x.pt")
    shutil.copy(golden_dir / "vocab" / "bee.txt", folder / "bee.txt")
    shutil.copy(golden_dir / "chat" / "config.json", folder / "config.json")
    (folder / "notes.txt").write_text("mine")
    return folder


@pytest.mark.golden
@pytest.mark.parametrize("output", ["s", ".", "s/..", "s/x.pt"])
def test_an_output_that_would_swallow_the_inputs_is_refused(sources, tmp_path, capsys, monkeypatch, output):
    """`--output s --overwrite` used to delete the checkpoint, the vocabulary and everything else in `s`, exit 0."""
    monkeypatch.chdir(tmp_path)
    before = listing(sources)
    argv = ["convert", "chat", "--checkpoint", "s/x.pt", "--vocab", "s/bee.txt", "--config", "s/config.json"]
    assert main([*argv, "--output", output, "--overwrite"]) == 2
    assert "--output" in one_error_line(capsys)
    assert listing(sources) == before


def test_home_current_folder_input_folders_and_links_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for output in (Path("."), Path.home(), tmp_path.parent, Path("/")):
        with pytest.raises(ValueError, match="holds (your home folder|the current folder)"):
            check_output(output, {}, overwrite=True)
    vae = tmp_path / "vae"
    vae.mkdir()
    with pytest.raises(ValueError, match="--vae"):
        check_output(vae / "converted", {"--vae": vae}, overwrite=True)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(ValueError, match="symbolic link"):
        check_output(tmp_path / "link", {}, overwrite=True)
    # beside the inputs is fine: the usual layout
    assert check_output(tmp_path / "converted", {"--vae": vae}, overwrite=False) == tmp_path / "converted"


def write_version(folder: Path, version: str, files: int = 5) -> None:
    for index in range(files):
        (folder / f"part-{index}.txt").write_text(version)


def killed_at(output: Path, point: str) -> None:
    """Replace `output` in a forked child that dies at `point` (os._exit: no cleanup runs, as under SIGKILL)."""
    pid = os.fork()
    if pid == 0:
        try:
            if point == "after the exchange":
                swap = export._swap

                def swap_then_die(staging, target):
                    swap(staging, target)
                    os._exit(9)

                export._swap = swap_then_die
            if point == "between the two renames":
                export._libc = None  # no renameat2: the two-rename fallback
                rename = Path.rename

                def rename_then_die_once_moved_aside(self, target):
                    rename(self, target)
                    if str(target).endswith("-old"):
                        os._exit(9)

                Path.rename = rename_then_die_once_moved_aside
            with staged_output(output, overwrite=True) as staging:
                write_version(staging, "new")
                if point == "while writing":
                    os._exit(9)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 9


@pytest.mark.parametrize("point", ["while writing", "after the exchange", "between the two renames"])
def test_a_killed_replace_leaves_a_complete_folder_and_the_next_run_clears_the_rest(tmp_path, point):
    output = tmp_path / "out"
    output.mkdir()
    write_version(output, "old")
    killed_at(output, point)
    clear_killed_runs(output)
    contents = set(listing(output).values())
    assert len(listing(output)) == 5 and contents in ({b"old"}, {b"new"})
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"], "nothing left beside it"


def test_a_replace_swaps_in_the_new_folder_with_the_umask_permissions(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    write_version(output, "old", files=7)
    stale = tmp_path / ".out.viscpm-partial-999999999-gone"  # no such process: a killed run's
    stale.mkdir()
    alive = tmp_path / f".out.viscpm-partial-{os.getpid()}-busy"  # a run still going: left alone
    alive.mkdir()
    previous = os.umask(0o022)
    try:
        with staged_output(output, overwrite=True) as staging:
            write_version(staging, "new")
    finally:
        os.umask(previous)
    assert set(listing(output).values()) == {b"new"} and len(listing(output)) == 5
    assert output.stat().st_mode & 0o777 == 0o755
    assert not stale.exists() and alive.exists()


@pytest.mark.golden
def test_a_nan_in_the_checkpoint_is_converted_as_it_is(sources, tmp_path):
    """Verification compares bits: a NaN read from the checkpoint verifies (it used to be "verification failed")."""
    state = torch.load(sources / "x.pt", weights_only=True)
    key = next(key for key in state if key.startswith("llm.") and state[key].dim() == 2)
    state[key][0, 0] = float("nan")
    torch.save(state, sources / "x.pt")
    convert_chat(sources / "x.pt", sources / "bee.txt", tmp_path / "out", config=sources / "config.json")
    assert torch.isnan(AutoModel.from_pretrained(tmp_path / "out").state_dict()[chat_key(key)][0, 0])


@pytest.mark.golden
def test_a_full_disk_and_a_config_value_of_the_wrong_type_are_one_line(sources, tmp_path, capsys, monkeypatch):
    argv = ["convert", "chat", "--checkpoint", str(sources / "x.pt"), "--vocab", str(sources / "bee.txt")]
    config = json.loads((sources / "config.json").read_text())
    config["cpmbee"]["position_bias_num_buckets"] = None  # the weights cannot tell this one
    (tmp_path / "null.json").write_text(json.dumps(config))
    assert main([*argv, "--config", str(tmp_path / "null.json"), "--output", str(tmp_path / "a")]) == 2
    assert "--config" in one_error_line(capsys)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "b" / "model.safetensors"))

    monkeypatch.setattr("viscpm.conversion.chat.write_weights", disk_full)
    assert main([*argv, "--config", str(sources / "config.json"), "--output", str(tmp_path / "b")]) == 2
    assert "No space left on device" in one_error_line(capsys)
    assert not (tmp_path / "b").exists() and not [path for path in tmp_path.iterdir() if "partial" in path.name]
