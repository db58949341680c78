"""Model weights as safetensors shards (merge, compress): find the shards, read tensors lazily, write shards.

Reading uses `safetensors.safe_open` (memory-mapped, one tensor at a time); writing uses `ShardWriter`, which
writes the safetensors header first (shapes and dtypes are known in advance) and then each tensor's bytes as it is
produced, so at most one tensor is held in memory. The format is: 8-byte little-endian header length, a JSON header
{name: {dtype, shape, data_offsets}}, padded to 8 bytes, then the raw little-endian data.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from peftkit.errors import PeftkitError
from peftkit.io.fs import read_json_object
from peftkit.io.models import EMBEDDED_NAMES, embedded_folder, safetensors_keys

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# torch dtype <-> the dtype names of safetensors headers (the one map; both directions)
ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}
TORCH_DTYPES = {name: dtype for dtype, name in ST_DTYPES.items()}
# Files copied next to the merged weights so the folder is a complete model (weights and indices are rewritten).
_SKIP_COPY = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", INDEX_NAME, "pytorch_model.bin.index.json")


def resolve_base(name_or_path: str | None) -> Path:
    """Folder of a base model: a local folder, the embedded default (None), or a hub id from the local HF cache."""
    if name_or_path is None or name_or_path.lower() in EMBEDDED_NAMES:
        return embedded_folder()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.suffix == ".gguf":
        raise PeftkitError("a .gguf base cannot be merged shard by shard; convert it to a safetensors folder first")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as exc:  # noqa: BLE001 - network, auth, unknown id: all mean "cannot get the base"
        raise PeftkitError(f"base model {name_or_path!r} is neither a folder nor a downloadable hub id ({type(exc).__name__})") from None


@dataclass
class Checkpoint:
    """A safetensors checkpoint: which shard file holds each tensor (in file order)."""

    folder: Path
    key_to_shard: dict[str, str]

    @property
    def shards(self) -> list[str]:
        """Shard file names in the order they are listed."""
        return list(dict.fromkeys(self.key_to_shard.values()))

    def keys_of(self, shard: str) -> list[str]:
        return [k for k, s in self.key_to_shard.items() if s == shard]


def open_checkpoint(folder: Path) -> Checkpoint:
    """Read the index (or the single file's header); every shard the index names must exist."""
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = read_json_object(index, "a safetensors index with a weight_map").get("weight_map")
        if not isinstance(weight_map, dict):
            raise PeftkitError(f"{index} has no weight_map object; it is not a safetensors index")
        for shard in dict.fromkeys(weight_map.values()):
            inside(folder, shard, index)
            if not (folder / shard).is_file():
                raise PeftkitError(f"shard {shard!r} named in {index} is missing; the checkpoint is incomplete")
            held = set(safetensors_keys(folder / shard))  # every header checked before any work
            missing = [key for key, name in weight_map.items() if name == shard and key not in held]
            if missing:
                raise PeftkitError(f"{index} puts {missing[0]!r} in {shard}, which does not hold it; the "
                                   "checkpoint is damaged or its index belongs to another one")
        return Checkpoint(folder, dict(weight_map))
    single = folder / SINGLE_NAME
    if not single.is_file():
        raise PeftkitError(f"{str(folder)!r} has no {SINGLE_NAME} or {INDEX_NAME}; streaming needs safetensors weights")
    return Checkpoint(folder, dict.fromkeys(safetensors_keys(single), SINGLE_NAME))


def inside(folder: Path, name: object, source: Path) -> Path:
    """`folder / name` for a file name read from `source` (an index's weight_map), refused unless it is a plain file
    name: not absolute, no folder part, no '..'. An index naming '/etc/passwd' or '../x' is neither read nor, since
    the merge writes shards under the same names into its own new folder, written. The file itself may be a
    symlink: Hugging Face's cache stores every snapshot file as a link into its blob store."""
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        raise PeftkitError(f"{source} names the file {name!r}, which is not a plain file name inside {folder}; "
                           "a checkpoint's shards sit beside its index")
    return folder / name


def shapes(checkpoint: Checkpoint) -> dict[str, tuple[tuple[int, ...], str]]:
    """{key: (shape, safetensors dtype)} from the shard headers only (no tensor is read)."""
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for shard in checkpoint.shards:
        with safe_open(str(checkpoint.folder / shard), framework="pt") as f:
            names = f.keys()  # a safe_open handle is not iterable itself
            for key in names:
                sl = f.get_slice(key)
                out[key] = (tuple(sl.get_shape()), sl.get_dtype())
    return out


def iter_tensors(checkpoint: Checkpoint, shard: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) of one shard, read one at a time from the memory-mapped file.

    The file is mapped anew for each tensor: pages of a mapping count in the process's resident memory until it is
    unmapped, so keeping one mapping open over a whole shard would hold the shard's size in RSS by the end.
    Re-opening costs only a header parse.
    """
    for key in checkpoint.keys_of(shard):
        with safe_open(str(checkpoint.folder / shard), framework="pt") as f:
            tensor = f.get_tensor(key)
        yield key, tensor


class ShardWriter:
    """Writes one safetensors file tensor by tensor; the layout (names, shapes, dtypes) is declared up front."""

    def __init__(self, path: Path, layout: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        self.expected: list[tuple[str, int]] = []
        for name, (shape, dtype) in layout.items():
            nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.expected.append((name, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.file.write(struct.pack("<Q", len(raw)) + raw)
        self.position = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; it must be the next one declared, with the declared size."""
        want, nbytes = self.expected[self.position]
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
        if name != want or data.numel() != nbytes:
            raise RuntimeError(f"ShardWriter expected {want} ({nbytes} bytes), got {name} ({data.numel()} bytes)")
        self.file.write(data.numpy().data)  # the array's buffer as a memoryview, no copy
        self.position += 1

    def close(self) -> None:
        self.file.close()
        if self.position != len(self.expected):
            raise RuntimeError(f"ShardWriter closed after {self.position} of {len(self.expected)} tensors")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def write_index(folder: Path, weight_map: dict[str, str], total_bytes: int) -> None:
    """model.safetensors.index.json as transformers writes it."""
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def copy_aux_files(src: Path, dst: Path) -> list[str]:
    """Copy config, tokenizer and generation config (every small non-weight file); returns the names copied."""
    copied = []
    for item in sorted(src.iterdir()):
        if item.is_file() and not item.name.endswith(_SKIP_COPY) and not item.name.startswith("."):
            shutil.copy2(item, dst / item.name)
            copied.append(item.name)
    return copied


def read_tensor(checkpoint: Checkpoint, key: str) -> torch.Tensor:
    """One tensor by name (opens its shard)."""
    with safe_open(str(checkpoint.folder / checkpoint.key_to_shard[key]), framework="pt") as f:
        return f.get_tensor(key)


def limit_heap_growth(threshold: int = 1 << 20) -> bool:
    """Make glibc serve every allocation above `threshold` bytes with its own mmap, returned to the OS on free.

    glibc raises its mmap threshold dynamically (up to 32 MiB) after large blocks are freed; from then on tensors of
    that size come from the heap, and freed heap memory is often not returned. Streaming hundreds of tensors of
    mixed sizes then grew resident memory to ~2x the largest shard in one of three runs. Fixing the threshold
    (mallopt M_MMAP_THRESHOLD) keeps the peak near one tensor. Process-wide, so only the CLI commands call it.
    Returns whether it applied (glibc only).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        return False
