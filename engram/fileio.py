"""Files that are whole or absent: atomic writes, sha256 and manifests, for every format the project writes
(checkpoints, exported tables, prepared data and token shards, the compressed tokenizer, sweep records).

The rules every writer here follows:
  - a file is written under a temporary name in its own directory and renamed into place
    (``os.replace``), so a reader sees the old bytes or the new ones, never a mixture, and a crash
    leaves at most a ``*.tmp*`` file behind;
  - a directory of several files is complete once its manifest exists: the manifest is written last
    and lists each file's size and sha256, and readers check against it (``check_file``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Callable

CHUNK_BYTES = 64 << 20  # read and write big files in slices: no second full copy in RAM


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupted, or incompatible with the tokenizer or model in
    use. Defined here, below every package that reads checkpoints (``engram.train``, ``engram.distributed``),
    so each raises the same error."""


def temporary_path(path: str | os.PathLike) -> Path:
    """Where ``path`` is written before it is renamed into place: same directory (so the rename is
    atomic), a name no other process uses."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any], fsync: bool = False) -> Path:
    """Create or replace ``path`` with what ``write(file)`` writes; ``fsync`` also forces the bytes to
    disk before the rename (for big files whose loss after a power cut would go unnoticed)."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: str | os.PathLike, data: Any, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """JSON with a trailing newline, written atomically."""
    return atomic_write_text(path, json.dumps(data, indent=indent, sort_keys=sort_keys) + "\n")


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file, read in slices."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def file_entry(path: str | os.PathLike) -> dict[str, Any]:
    """A manifest entry: the file's size and sha256."""
    return {"bytes": Path(path).stat().st_size, "sha256": sha256_file(path)}


def check_file(path: str | os.PathLike, expected_bytes: int, expected_sha256: str | None = None,
               error: type[Exception] = ValueError) -> None:
    """Raise ``error`` naming ``path`` when it is missing, has another size than its manifest says (a
    cheap check that catches truncation) or, with ``expected_sha256``, other bytes."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path} is missing")
    size = path.stat().st_size
    if size != expected_bytes:
        raise error(f"{path} has {size} bytes, the manifest says {expected_bytes}: {path.name} is truncated or altered")
    if expected_sha256 is not None and sha256_file(path) != expected_sha256:
        raise error(f"{path}: sha256 mismatch with the manifest; {path.name} is corrupted or replaced")


def read_manifest(path: str | os.PathLike, expected_format: str, error: type[Exception] = ValueError,
                  missing_hint: str = "it is written last, so the directory is incomplete") -> dict:
    """The manifest at ``path``, checked to be JSON of ``expected_format``; ``error`` names the problem."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path} is missing: {missing_hint}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path} is not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != expected_format:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise error(f"{path} has format {got!r}, expected {expected_format!r}")
    return manifest


def write_manifest(path: str | os.PathLike, expected_format: str, **fields: Any) -> Path:
    """Write a manifest ``{"format": ..., **fields}`` atomically; call it after every file it describes."""
    return atomic_write_json(path, {"format": expected_format, **fields}, sort_keys=True)


class LockBusy(RuntimeError):
    """Another live process holds the lock; ``holder`` is what it wrote there ("host pid ...")."""

    def __init__(self, path: Path, holder: str):
        self.path, self.holder = path, holder
        super().__init__(f"{path} is held by {holder or 'another process'}")


class FileLock:
    """An exclusive advisory lock on ``path`` (``fcntl.flock``), with its holder written inside.

    The kernel drops the lock when its process dies, however it dies, so a dead holder's lock is
    simply taken by the next process; the file itself stays (removing it would let two processes lock
    two different files of one name). Local filesystems only: flock is not reliable over some NFS
    setups. ``acquire(wait=False)`` raises ``LockBusy`` naming the holder; ``wait=True`` blocks,
    calling ``on_wait(holder)`` once first.
    """

    def __init__(self, path: str | os.PathLike, purpose: str = ""):
        self.path = Path(path)
        self.purpose = purpose
        self._fd: int | None = None

    def holder(self) -> str:
        try:
            return self.path.read_text().strip()
        except OSError:
            return ""

    def acquire(self, wait: bool = False, on_wait: Callable[[str], None] | None = None) -> "FileLock":
        import fcntl
        import socket
        import time

        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this object")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise LockBusy(self.path, self.holder()) from None
                if on_wait is not None:
                    on_wait(self.holder())
                fcntl.flock(fd, fcntl.LOCK_EX)
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()} since {stamp}"
                          f"{' (' + self.purpose + ')' if self.purpose else ''}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)  # no stale holder shown to the next reader
            finally:
                os.close(fd)  # closing the descriptor drops the flock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "FileLock":
        return self if self.held else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
