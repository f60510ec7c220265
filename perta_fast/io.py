"""Checkpoint I/O: lazy mmap-backed reading, streamed sharded writing (how outputs are published: outputs.py).

Nothing here imports transformers: the merge path needs only torch and safetensors.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import PertaError
from .faults import kill_point

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _inside(folder: Path, name: str) -> Path:
    """Resolve a file named by an index, refusing anything that escapes the folder."""
    path = (folder / name).resolve()
    if os.path.isabs(name) or not path.is_relative_to(folder.resolve()):
        raise PertaError(f"{folder}: index.json points outside its folder ({name!r})")
    return path


def read_json(path: Path) -> dict:
    """A JSON object from a file, or a one-line PertaError naming the file and the problem."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise PertaError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise PertaError(f"{path}: cannot read ({e})") from None
    except OSError as e:
        raise PertaError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(data, dict):
        raise PertaError(f"{path}: expected a JSON object")
    return data


class SafetensorsFile:
    """One safetensors file opened lazily (mmap); errors name the file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise PertaError(f"{self.path}: no such file")
        try:
            self._handle = safe_open(str(self.path), framework="pt")
        except Exception as e:  # safetensors raises its own error type for bad headers and short files
            raise PertaError(f"{self.path}: corrupt or truncated safetensors file ({e})") from None
        self.metadata = self._handle.metadata() or {}

    def keys(self) -> list[str]:
        return list(self._handle.keys())

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        sl = self._handle.get_slice(name)
        dtype = SAFETENSORS_DTYPES.get(sl.get_dtype())
        if dtype is None:
            raise PertaError(f"{self.path}: tensor {name} has unsupported dtype {sl.get_dtype()}")
        return tuple(sl.get_shape()), dtype

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._handle.get_tensor(name)
        except Exception as e:
            raise PertaError(f"{self.path}: cannot read tensor {name} ({e})") from None


class _PickleFile:
    """A torch pickle checkpoint, loaded with weights_only=True (no code execution) and mmap."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise PertaError(f"{path}: cannot load pickle checkpoint safely ({str(e).splitlines()[0]})") from None
        if not isinstance(self._sd, dict):
            raise PertaError(f"{path}: pickle checkpoint is not a state dict")
        self.metadata = {}

    def keys(self):
        return list(self._sd.keys())

    def info(self, name):
        t = self._sd[name]
        return tuple(t.shape), t.dtype

    def get(self, name):
        return self._sd[name]


class Checkpoint:
    """A Hugging Face model folder: config plus weights in one file or shards with an index.

    Only headers are read on open; `get` reads one tensor (from the mmap) when asked.
    """

    def __init__(self, folder: str | Path, allow_pickle: bool = False):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise PertaError(f"{self.folder}: checkpoint folder not found")
        config_path = self.folder / "config.json"
        if not config_path.is_file():
            raise PertaError(f"{self.folder}: not a model folder (no config.json)")
        self.config = read_json(config_path)
        self._files: dict[Path, SafetensorsFile | _PickleFile] = {}
        self._where: dict[str, Path] = {}
        self.weight_files = self._locate(allow_pickle)
        for path in self.weight_files:
            f = self._open(path)
            for name in f.keys():
                self._where.setdefault(name, path)

    def _locate(self, allow_pickle: bool) -> list[Path]:
        for index_name in INDEX_NAMES:
            index_path = self.folder / index_name
            if index_path.is_file():
                if index_name.endswith(".bin.index.json") and not allow_pickle:
                    raise self._pickle_refused(index_path)
                weight_map = read_json(index_path).get("weight_map")
                if not isinstance(weight_map, dict) or not weight_map:
                    raise PertaError(f"{index_path}: no weight_map")
                bad = [v for v in weight_map.values() if not isinstance(v, str) or not v or "\0" in v]
                if bad:
                    raise PertaError(f"{index_path}: weight_map names a shard {bad[0]!r}, not a file name")
                files = []
                for name in dict.fromkeys(weight_map.values()):
                    path = _inside(self.folder, name)
                    if not path.is_file():
                        raise PertaError(f"{index_path}: shard {name} is missing")
                    files.append(path)
                return files
        single = self.folder / "model.safetensors"
        if single.is_file():
            return [single]
        shards = sorted(self.folder.glob("*.safetensors"))
        if shards:
            return shards
        pickles = sorted(p for p in self.folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        if pickles:
            if not allow_pickle:
                raise self._pickle_refused(pickles[0])
            return pickles
        raise PertaError(f"{self.folder}: no weights found (expected model.safetensors or an index)")

    @staticmethod
    def _pickle_refused(path: Path) -> PertaError:
        return PertaError(f"{path}: pickle checkpoints can run code when loaded; refused (convert it to "
                          "safetensors; only `merge --allow-pickle` reads it, with weights_only=True)")

    def _open(self, path: Path):
        if path not in self._files:
            self._files[path] = SafetensorsFile(path) if path.suffix == ".safetensors" else _PickleFile(path)
        return self._files[path]

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        return self._open(self._where[name]).info(name)

    def get(self, name: str) -> torch.Tensor:
        return self._open(self._where[name]).get(name)

    def file_of(self, name: str) -> Path:
        return self._where[name]

    @property
    def architecture(self) -> tuple:
        return tuple(self.config.get("architectures") or ()), self.config.get("model_type")

    @property
    def ties_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))


_digests: dict[tuple, str] = {}
DESCRIBING = ("config.json", "adapter_config.json") + INDEX_NAMES


def content_sha256(path: str | Path) -> str:
    """sha256 of what a checkpoint or adapter folder (or a file) holds: its weight, index and config
    files' bytes, by name. What a run is keyed on, so that a model replaced at the same path is never
    mistaken for the old one; remembered per file state for the rest of the process."""
    path = Path(path).resolve()
    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir() if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name in DESCRIBING))
    state = tuple((str(p), s.st_size, s.st_mtime_ns, s.st_ino) for p in files for s in [p.stat()])
    if state not in _digests:
        whole = hashlib.sha256()
        for p in files:
            with open(p, "rb") as f:
                whole.update(f"{p.name}:{hashlib.file_digest(f, 'sha256').hexdigest()}\n".encode())
        _digests[state] = whole.hexdigest()
    return _digests[state]


def copy_aux_files(src: Path, dst: Path) -> None:
    """Copy everything but the weights (config, tokenizer, generation config, templates) and our
    perta_*.json records, which describe how their own folder was made."""
    for p in Path(src).iterdir():
        if p.is_file() and p.suffix not in WEIGHT_SUFFIXES and p.name not in INDEX_NAMES \
                and not (p.name.startswith("perta_") and p.suffix == ".json"):
            shutil.copy2(p, dst / p.name)


class SafetensorsWriter:
    """Writes one safetensors file tensor by tensor, never holding more than the tensor in hand: the layout
    (names, shapes, dtypes, in order) is known up front, so the header goes first and each tensor's bytes
    are appended as it is produced."""

    def __init__(self, path: Path, layout: list[tuple[str, tuple, torch.dtype]], metadata: dict | None = None,
                 reserve: dict[str, int] | None = None, done: int = 0):
        """`reserve` {key: width}: metadata values only known at the end (a duration), written by `close`.
        `done` > 0 continues a file whose first `done` tensors were written (and flushed) by an earlier
        writer with the same layout and metadata: whatever was appended after them is cut off."""
        self.path = Path(path)
        self.reserve = reserve or {}
        metadata = {**(metadata or {}), **{k: " " * w for k, w in self.reserve.items()}}
        self.entries = [(name, tuple(shape), dtype, int(torch.Size(shape).numel()) * dtype.itemsize)
                        for name, shape, dtype in layout]
        header, offset = {"__metadata__": {"format": "pt", **(metadata or {})}}, 0
        for name, shape, dtype, nbytes in self.entries:
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the format pads the header to 8-byte alignment
        slot = {k: f'{json.dumps(k)}:"{" " * w}"'.encode() for k, w in self.reserve.items()}
        self._slots = {k: 8 + blob.index(slot[k]) + len(json.dumps(k)) + 2 for k in self.reserve}
        head = struct.pack("<Q", len(blob)) + blob
        if done:
            self._file = open(self.path, "r+b")
            if self._file.read(len(head)) != head:
                self._file.close()
                raise PertaError(f"{self.path}: partial file has another layout or metadata; cannot continue it")
            self._file.seek(len(head) + sum(e[3] for e in self.entries[:done]))
            self._file.truncate()
        else:
            self._file = open(self.path, "wb")
            self._file.write(head)
        self._pos = done

    @property
    def written(self) -> int:
        return self._pos

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        if kind is None:
            self.close()
        else:
            self.abort()

    def abort(self) -> None:
        """Close the file without completing it (a failed run's temp output, removed by its caller)."""
        self._file.close()

    def flush(self) -> None:
        """Make what was written so far durable (a later writer may continue from here)."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def write(self, name: str, tensor: torch.Tensor) -> None:
        exp_name, shape, dtype, nbytes = self.entries[self._pos]
        if name != exp_name or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(f"writer expected {exp_name} {shape} {dtype}, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        if nbytes:
            self._file.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        self._pos += 1
        kill_point("tensor")

    def close(self, final: dict[str, str] | None = None) -> None:
        """`final`: the reserved metadata values, each at most its reserved width (padded with spaces)."""
        try:
            if self._pos != len(self.entries):
                raise RuntimeError(f"writer got {self._pos} of {len(self.entries)} tensors")
            for key, value in (final or {}).items():
                width = self.reserve[key]
                if len(value) > width or not value.isascii():
                    raise ValueError(f"metadata {key}={value!r} does not fit its {width} reserved characters")
                self._file.seek(self._slots[key])
                self._file.write(value.ljust(width).encode())
        finally:
            self._file.close()


class ShardedWriter:
    """A checkpoint in shards of at most `max_shard_bytes` with an index, written tensor by tensor."""

    def __init__(self, folder: Path, layout: list[tuple[str, tuple, torch.dtype]],
                 max_shard_bytes: int = 2 * 1024**3, metadata: dict | None = None):
        self.folder = Path(folder)
        self.metadata = metadata or {}
        self.shards: list[list[tuple[str, tuple, torch.dtype]]] = [[]]
        size = 0
        for name, shape, dtype in layout:
            nbytes = int(torch.Size(shape).numel()) * dtype.itemsize
            if self.shards[-1] and size + nbytes > max_shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append((name, tuple(shape), dtype))
            size += nbytes
        n = len(self.shards)
        self.shard_names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._shard_of = {e[0]: i for i, shard in enumerate(self.shards) for e in shard}
        self._total = sum(int(torch.Size(shape).numel()) * dtype.itemsize for _, shape, dtype in layout)
        self._writer: SafetensorsWriter | None = None
        self._current = -1

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        if kind is None:
            self.close()
        elif self._writer:
            self._writer.abort()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        s = self._shard_of.get(name, self._current)
        if s != self._current:
            self._next_shard(s)
        self._writer.write(name, tensor)

    def _next_shard(self, s: int) -> None:
        if self._writer:
            self._writer.close()
        if s != self._current + 1:
            raise RuntimeError(f"writer expected shard {self._current + 1}, got a tensor of shard {s}")
        self._current = s
        self._writer = SafetensorsWriter(self.folder / self.shard_names[s], self.shards[s], self.metadata)

    def close(self) -> None:
        while self._current < len(self.shards) - 1:  # an empty checkpoint still gets its (empty) shard
            if self._writer and self._writer._pos < len(self._writer.entries):
                break
            self._next_shard(self._current + 1)
        if self._writer:
            self._writer.close()
        weight_map = {e[0]: self.shard_names[i] for i, shard in enumerate(self.shards) for e in shard}
        with open(self.folder / "model.safetensors.index.json", "w") as f:
            json.dump({"metadata": {"total_size": self._total}, "weight_map": weight_map}, f, indent=2)
