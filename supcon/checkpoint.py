"""Checkpoints that survive crashes and load with ``torch.load(weights_only=True)``.

Written like timm's CheckpointSaver: to a temporary file in the same folder, flushed to disk,
then renamed over the target, so a crash mid-write leaves the previous file intact. Only tensors,
numbers, strings, lists and dicts go in, so loading never unpickles arbitrary objects.
A file's identity (:class:`FileStamp`, its content hash) says whether a checkpoint is still the one a
result was computed from.

The checkpoint schemas (what a supcon-train or baseline checkpoint holds) are :mod:`supcon.rundir`'s,
which builds on this module.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from supcon.errors import UserError


def _atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(file)`` on a temp file beside ``path``, fsync it, rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    """Write ``data`` to ``path`` atomically."""
    _atomic_write(path, lambda f: f.write(data))


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically; a crash mid-write leaves any previous file intact."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    atomic_write_bytes(text.encode(), path)


class CorruptCheckpoint(UserError):
    """A file that cannot be read back: truncated, or damaged bytes (not an unsafe one)."""


class MissingCheckpoint(UserError):
    """A checkpoint that is not there (any more: e.g. deleted by a training's ``--keep-last`` meanwhile)."""


def _damaged_member(path: Path) -> str | None:
    """The first entry of a zip-format checkpoint whose bytes fail their CRC (None when all pass).

    ``torch.load`` does not check the CRCs, so damaged tensor bytes (bit rot, a bad copy) would
    load as silently wrong weights. Files that are not zips are left to ``torch.load``.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError):
        return None  # truncated or not a zip: torch.load says so
    except (zipfile.LargeZipFile, NotImplementedError, RuntimeError, ValueError):  # pragma: no cover
        return None
    except Exception as exc:  # zlib errors of a damaged compressed entry
        return f"an entry ({type(exc).__name__})"


def safe_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint with ``weights_only=True``; refuse anything else with a one-line error.

    Raises:
        UserError: a file that would need arbitrary unpickling (nothing in it runs).
        MissingCheckpoint: no such file (also when it is deleted while being read).
        CorruptCheckpoint: a truncated/corrupt file.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingCheckpoint(f"checkpoint not found: {path}")
    damaged = _damaged_member(path)
    if damaged:
        raise CorruptCheckpoint(f"checkpoint {path} is corrupt: damaged bytes in {damaged} (CRC mismatch)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise MissingCheckpoint(f"checkpoint not found: {path}")
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if "weights_only" in str(exc) or "Unsupported global" in str(exc) or "GLOBAL" in str(exc):
            raise UserError(
                f"refusing to load {path}: it needs arbitrary unpickling (not a plain-tensor checkpoint); "
                "nothing in it was run"
            )
        raise CorruptCheckpoint(f"checkpoint {path} is corrupt: {first}")
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CorruptCheckpoint(f"checkpoint {path} is corrupt or truncated ({first})")


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as plain lists/tensors (weights_only-loadable)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, torch.from_numpy(np.asarray(np_keys, dtype=np.int64)), int(np_pos), int(np_has_gauss),
                  float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only where devices match)."""
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (remembered per path, size and modification time in this process)."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_MEMO:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        _SHA_MEMO[key] = digest.hexdigest()
    return _SHA_MEMO[key]


@dataclass(frozen=True)
class FileStamp:
    """A file's identity: content hash, plus size and mtime for a quick "unchanged" check."""

    sha256: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str | os.PathLike) -> FileStamp:
        stat = Path(path).stat()
        return cls(file_sha256(path), stat.st_size, stat.st_mtime_ns)

    def matches(self, path: str | os.PathLike) -> bool:
        """True when ``path`` still holds this content (same size and mtime, or else same hash)."""
        path = Path(path)
        if not path.is_file():
            return False
        stat = path.stat()
        if stat.st_size != self.size:
            return False
        return stat.st_mtime_ns == self.mtime_ns or file_sha256(path) == self.sha256

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size, "mtime_ns": self.mtime_ns}
