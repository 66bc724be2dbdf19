"""Writing Hub-ready folders from original checkpoints, and back.

A converted folder holds sharded safetensors (with an index), the configs, tokenizer and processor files, the
`modeling/` files as remote code (`auto_map` entries point at them), a model card rendered from `model_card.md`,
and `original_extras.safetensors`: the original tensors the model does not use, kept so that
`to_original` can write the original layout back bit for bit.

Memory: the original checkpoint is memory-mapped; each shard is cast and written on its own, and the pages of the
source tensors it read are handed back to the kernel (`madvise(MADV_DONTNEED)`: the mapping is read-only and backed
by the file, so they are simply re-read if touched again). Peak memory is about one shard plus the largest tensor,
not the checkpoint (measured in `benchmarks/conversion_memory.py`, docs/performance.md).
"""

import ctypes
import ctypes.util
import json
import mmap
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from tqdm.auto import tqdm

from .checkpoint import CheckpointError

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
EXTRAS_FILE = "original_extras.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
CHUNK_BYTES = 64 * 1024**2
# the repository's model_card.md, linked into this package so that a wheel carries it
MODEL_CARD_TEMPLATE = Path(__file__).with_name("model_card.md")
# each model's sections of the card, package data beside it
CHAT_CARD = Path(__file__).with_name("model_card_chat.md")
PAINT_CARD = Path(__file__).with_name("model_card_paint.md")
_MADV_DONTNEED = 4
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def release_pages(tensor: torch.Tensor) -> None:
    """Hand the pages under a contiguous tensor that views a memory-mapped file back to the kernel (they stay
    readable: the kernel reads them from the file again if touched)."""
    start = tensor.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
    end = tensor.data_ptr() + tensor.numel() * tensor.element_size()
    if end > start:
        _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


def row_chunks(tensor: torch.Tensor, max_bytes: int = CHUNK_BYTES) -> Iterator[torch.Tensor]:
    """Contiguous views of at most ``max_bytes`` (at least one row) along the first dimension: the largest tensors
    (CPM-Bee's 86583 x 4096 embedding) are cast, written and compared a chunk at a time."""
    if tensor.dim() == 0:
        yield tensor
        return
    row_bytes = max(1, tensor[0].numel() * tensor.element_size())
    rows = max(1, max_bytes // row_bytes)
    yield from torch.split(tensor, rows)


def parse_dtype(name: str | None, source: Mapping[str, torch.Tensor]) -> torch.dtype:
    """`fp16` / `bf16` / `fp32`, or (None) the dtype the original's floating tensors are stored in."""
    if name is not None:
        if name not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
        return DTYPES[name]
    dtypes = {tensor.dtype for tensor in source.values() if tensor.is_floating_point()}
    if len(dtypes) != 1:
        raise CheckpointError(
            f"the checkpoint mixes floating dtypes {sorted(map(str, dtypes))}: choose one with --dtype"
        )
    return dtypes.pop()


# safetensors' dtype codes (https://github.com/huggingface/safetensors, format description)
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def save_safetensors_streaming(
    path: Path,
    tensors: Mapping[str, torch.Tensor],
    dtype: torch.dtype | None,
    release: bool,
    metadata: dict | None = None,
) -> None:
    """Write one safetensors file a chunk at a time, cast to ``dtype`` (None: each tensor's own).

    safetensors' `save_file` reads every tensor of a shard in one call, so all of a shard's source pages are
    resident at once (measured: peak RSS = shard size, 5 GB by default). Written here in the same format (8-byte
    header length, JSON header, raw little-endian data), each chunk's pages are released before the next is read.
    The files are read back with safetensors itself (`verify_weights`, `from_pretrained`).
    """
    header, offset = {"__metadata__": dict(metadata or {})}, 0
    for key, tensor in tensors.items():
        target = dtype or tensor.dtype
        size = tensor.numel() * torch.empty((), dtype=target).element_size()
        header[key] = {
            "dtype": SAFETENSORS_DTYPES[target],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as file:
        file.write(len(encoded).to_bytes(8, "little"))
        file.write(encoded)
        for source in tensors.values():
            for chunk in row_chunks(source.contiguous()):
                file.write(chunk.to(dtype or chunk.dtype).contiguous().view(torch.uint8).numpy().data)
                if release:
                    release_pages(chunk)


def write_weights(
    output: Path,
    weights: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
    max_shard_size: str | int,
    release: bool,
) -> None:
    """Write ``weights`` (our key -> original tensor) as safetensors shards of at most ``max_shard_size``, cast
    to ``dtype``; with ``release``, each source's pages are handed back once written."""
    planned = {key: torch.empty(tensor.shape, dtype=dtype, device="meta") for key, tensor in weights.items()}
    split = split_torch_state_dict_into_shards(planned, max_shard_size=max_shard_size)
    progress = tqdm(total=len(weights), desc="Writing shards", unit="tensor")
    for filename, keys in split.filename_to_tensors.items():
        shard = {key: weights[key] for key in keys}
        save_safetensors_streaming(output / filename, shard, dtype, release, metadata={"format": "pt"})
        progress.update(len(keys))
    progress.close()
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (output / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def weight_files(folder: Path, stem: str = "model") -> list[Path]:
    """The safetensors files of a saved model: ``model*`` (transformers) or ``diffusion_pytorch_model*`` (diffusers)."""
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [folder / f"{stem}.safetensors"]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality: a NaN the checkpoint holds is written as read, and must verify as such."""
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
    )


def verify_weights(
    output: Path, weights: Mapping[str, torch.Tensor], dtype: torch.dtype, release: bool, stem: str = "model"
) -> None:
    """Read every written tensor back with safetensors and compare it with its source cast to ``dtype``, bit for
    bit, a chunk at a time (each through its own short-lived memory map, so no shard piles up in memory)."""
    seen, mismatched = set(), []
    progress = tqdm(total=len(weights), desc="Verifying", unit="tensor")
    for path in weight_files(output, stem):
        with safe_open(path, framework="pt") as shard:
            keys = list(shard.keys())
        for key in keys:
            source = weights.get(key)
            if source is None:
                mismatched.append(key)
                continue
            start = 0
            for chunk in row_chunks(source.contiguous()):
                with safe_open(path, framework="pt") as shard:
                    written = shard.get_slice(key)[start : start + len(chunk)] if chunk.dim() else shard.get_tensor(key)
                if not same_bits(written, chunk.to(dtype)):
                    mismatched.append(key)
                    break
                start += len(chunk) if chunk.dim() else 0
                if release:
                    release_pages(chunk)
            seen.add(key)
            progress.update(1)
    progress.close()
    missing = sorted(set(weights) - seen)
    if mismatched or missing:
        raise CheckpointError(f"verification failed: written tensors differ {mismatched[:10]}, missing {missing[:10]}")


def model_card_sections(card: Path) -> dict[str, str]:
    """A model's values for `model_card.md` (`model_card_chat.md`, `model_card_paint.md`): each `<!-- name -->` line
    starts the value of the template's `{{ name }}`."""
    pieces = re.split(r"^<!-- (\w+) -->\n", card.read_text(encoding="utf-8"), flags=re.MULTILINE)
    if pieces[0].strip():
        raise ValueError(f"{card.name}: text before its first `<!-- name -->` section line")
    return {name: value.strip() for name, value in zip(pieces[1::2], pieces[2::2])}


def render_model_card(card: Path, model_name: str, template: Path = MODEL_CARD_TEMPLATE) -> str:
    """`model_card.md` with its `{{ name }}` placeholders filled from `card`'s sections and `model_name` (which the
    sections may use too: the repository id in the usage examples); an unknown or unfilled placeholder is an error."""
    text = template.read_text(encoding="utf-8")
    # the name goes in last, so that it also fills the sections' own `{{ model_name }}`
    for name, value in {**model_card_sections(card), "model_name": model_name}.items():
        placeholder = "{{ " + name + " }}"
        if placeholder not in text:
            raise KeyError(f"model_card.md has no placeholder {placeholder}")
        text = text.replace(placeholder, value)
    if "{{" in text:
        raise KeyError(f"model_card.md placeholder left unfilled: {text[text.index('{{') :].split('}}')[0]}}}}}")
    return text


# A folder being written for `output` is a sibling named `.{output.name}.viscpm-partial-{pid}-{random}`: the pid says
# whether the run that made it is still alive, so a later run knows which ones a killed run left behind.
PARTIAL = re.compile(r"^\.(?P<name>.+)\.viscpm-partial-(?P<pid>\d+)-[^.]+$")
_RENAME_EXCHANGE = 2  # renameat2 flag: swap two paths in one step
_AT_FDCWD = -100


def check_output(output: str | Path, inputs: Mapping[str, str | Path | None], overwrite: bool) -> Path:
    """Refuse, before any work, an ``output`` folder whose writing (or ``overwrite``) would destroy something: one
    that is or holds an input (``inputs`` maps each input's flag to its path), lies inside an input folder, is or
    holds the home or current folder, or is a symbolic link; an existing one without ``overwrite``."""
    output = Path(output)
    if output.is_symlink():
        raise ValueError(f"--output {output} is a symbolic link: give the real folder's path, or a new one")
    target = output.resolve()
    for what, folder in (("your home folder", Path.home()), ("the current folder", Path.cwd())):
        if folder.resolve().is_relative_to(target):
            raise ValueError(f"--output {output} is or holds {what}, which --overwrite would delete: name a new folder")
    for flag, path in inputs.items():
        if path is None:
            continue
        source = Path(path).resolve()
        if source.is_relative_to(target) or (source.is_dir() and target.is_relative_to(source)):
            raise ValueError(
                f"--output {output} would hold or replace {flag} {path}: write the converted model to a folder of "
                "its own, outside the inputs"
            )
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file, not a folder: choose another --output")
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists: choose another --output or pass --overwrite")
    return output


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clear_killed_runs(output: Path) -> None:
    """Remove what killed runs for ``output`` left beside it: half-written folders, and old versions a replace had
    already moved aside. If a run died between moving the old folder aside and moving the new one in (only where the
    file system cannot swap two paths in one step), the old folder goes back to ``output`` first."""
    if not output.parent.is_dir():
        return
    for sibling in sorted(output.parent.iterdir()):
        match = PARTIAL.match(sibling.name)
        if not match or match["name"] != output.name or _running(int(match["pid"])):
            continue
        if sibling.name.endswith("-old") and not output.exists():
            sibling.rename(output)
            continue
        shutil.rmtree(sibling, ignore_errors=True)


def _swap(staging: Path, output: Path) -> None:
    """Put ``staging`` at ``output``, the old ``output`` at ``staging``; at every instant one of them is at ``output``
    (Linux `renameat2(RENAME_EXCHANGE)`; elsewhere two renames, which `clear_killed_runs` repairs if cut between)."""
    renameat2 = getattr(_libc, "renameat2", None)
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, bytes(staging), _AT_FDCWD, bytes(output), _RENAME_EXCHANGE) == 0:
            return
    aside = staging.with_name(staging.name + "-old")
    output.rename(aside)
    staging.rename(output)
    aside.rename(staging)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def staged_output(output: Path, overwrite: bool) -> Iterator[Path]:
    """A new folder beside ``output`` that replaces it only once the block completes (call `check_output` first).

    The replace swaps the complete new folder with the old one and then deletes the old one, so that a kill at any
    instant leaves a complete folder at ``output``, the old or the new; what a killed run leaves beside it is removed
    by the next run (`clear_killed_runs`). The folder gets the permissions of the umask, as `mkdir` would give."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists: choose another --output or pass --overwrite")
    output.parent.mkdir(parents=True, exist_ok=True)
    clear_killed_runs(output)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.viscpm-partial-{os.getpid()}-", dir=output.parent))
    try:
        staging.chmod(0o777 & ~_umask())
        yield staging
        if output.exists():
            _swap(staging, output)
        else:
            staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_original_extras(
    output: Path, extras: Mapping[str, torch.Tensor], source_dtypes: Mapping[str, str], release: bool
) -> None:
    """Original tensors the model does not use, and the original dtype of every tensor, for `to_original`."""
    # in the original's key order, which `to_original` restores
    metadata = {"source_dtypes": json.dumps(dict(source_dtypes))}
    save_safetensors_streaming(output / EXTRAS_FILE, extras, None, release, metadata=metadata)


# a saved component of a converted folder: (subfolder, file stem, our key -> original key)
Component = tuple[str, str, Callable[[str], str]]


def to_original(folder: str | Path, output: str | Path, components: list[Component]) -> Path:
    """Write a converted folder back as an original ``torch.save`` state dict: the keys (in their original order),
    dtypes and values of the original checkpoint the folder was converted from."""
    folder, output = Path(folder), Path(output)
    extras_path = folder / EXTRAS_FILE
    if not extras_path.is_file():
        raise CheckpointError(f"{folder} has no {EXTRAS_FILE}: it was not written by `viscpm convert`")
    state_dict = {}
    with safe_open(extras_path, framework="pt") as extras:
        source_dtypes = json.loads(extras.metadata()["source_dtypes"])
        for key in extras.keys():
            state_dict[key] = extras.get_tensor(key)
    for subfolder, stem, original_key in components:
        for path in weight_files(folder / subfolder, stem):
            with safe_open(path, framework="pt") as shard:
                for key in shard.keys():
                    name = original_key(key)
                    state_dict[name] = shard.get_tensor(key).to(getattr(torch, source_dtypes[name]))
    missing = [name for name in source_dtypes if name not in state_dict]
    if missing:
        raise CheckpointError(f"{folder} lacks {len(missing)} tensor(s) of the original: {missing[:10]}")
    state_dict = {name: state_dict[name] for name in source_dtypes}
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(f".{output.name}.partial")
    torch.save(state_dict, staging)
    staging.rename(output)
    return output
