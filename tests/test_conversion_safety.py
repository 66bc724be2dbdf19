"""A conversion never destroys a user's files: outputs that would swallow an input, the home or the current folder are
refused before any work; `--overwrite` replaces crash-safely; killed runs leave nothing behind for good."""

import os
import shutil
from pathlib import Path

import pytest

from viscpm.cli import main
from viscpm.conversion import export
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
