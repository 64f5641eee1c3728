"""Saved model folders that are whole or refused: written atomically, with every file's sha256 recorded.

    checksums.json       {"format": FORMAT, "files": {relative path: {"bytes", "sha256"}}}, written last
    .engram-incomplete   present only while files are being moved into a folder that already held files

``write_folder(directory, write)`` runs ``write(tmp)`` into a fresh temporary directory, records the
checksums there, then puts the result in place: by one ``rename`` when the target is absent (so an
interrupted save leaves no folder at all), or, into a folder that exists (an earlier export, a Trainer
checkpoint, the working directory, a mount point), file by file under the ``.engram-incomplete`` marker,
removing the files the folder's previous checksums listed, and any transformers weight file, that this
save did not write. Two saves into one folder at once are not supported. ``verify_folder`` refuses a folder whose marker is
there, or whose listed files are missing or differ; files the list does not name (a README) are not
checked. Folders written before checksums existed load with a warning.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable

from engram.fileio import atomic_write_json, check_file, file_entry

FORMAT = "engram.hf_folder/1"
CHECKSUMS = "checksums.json"
INCOMPLETE = ".engram-incomplete"


class FolderError(ValueError):
    """A saved folder that is incomplete, altered or unreadable."""


# transformers' weight files: a save removes those it did not write (an earlier save's shards, a folder
# written before checksums existed), and a verified folder may hold no weight file its checksums do not list
WEIGHT_FILES = ("model*.safetensors", "model*.safetensors.index.json", "pytorch_model*.bin",
                "pytorch_model*.bin.index.json", "tf_model*.h5", "flax_model*.msgpack")
SAVING = ".saving"  # suffix of the temporary folders a save writes into


def _files(directory: Path) -> list[Path]:
    """Every file under ``directory`` except the checksums and the temporary folders of a save."""
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != CHECKSUMS
                  and not any(part.endswith(SAVING) for part in p.relative_to(directory).parts))


def write_checksums(directory: Path) -> None:
    """Record the size and sha256 of every file under ``directory`` (by relative path), the checksums last."""
    files = {p.relative_to(directory).as_posix(): file_entry(p) for p in _files(directory)}
    atomic_write_json(directory / CHECKSUMS, {"format": FORMAT, "files": files}, sort_keys=True)


def listed_files(directory: Path) -> dict | None:
    """The checksums' file list of ``directory``, or None for a folder written without one."""
    path = directory / CHECKSUMS
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise FolderError(f"{path} is unreadable ({err}): the folder is damaged; save or export it again") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("files"), dict):
        raise FolderError(f"{path} is not an engram checksum list (format {FORMAT!r})")
    return data["files"]


def _weight_files(directory: Path) -> set[str]:
    return {p.name for pattern in WEIGHT_FILES for p in directory.glob(pattern) if p.is_file()}


def write_folder(directory, write: Callable[[Path], None]) -> Path:
    """Save into ``directory`` atomically (see the module docstring); ``write(tmp)`` writes the files.

    A new folder is written beside it and renamed into place. An existing one is written into a temporary
    folder inside it (the same filesystem, whatever is mounted where, and no write access to its parent
    needed), then its files are moved in under the marker, which goes up only once everything is written."""
    directory = Path(directory).absolute()
    if directory.exists() and not directory.is_dir():
        raise FolderError(f"{directory} is a file, not a directory")
    exists = directory.is_dir()
    if not exists:
        directory.parent.mkdir(parents=True, exist_ok=True)
    where = directory if exists else directory.parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=SAVING, dir=where))
    try:
        write(tmp)
        write_checksums(tmp)
        if not exists:
            os.replace(tmp, directory)  # one rename: the folder appears whole, or not at all
            return directory
        for old in directory.glob(f".*{SAVING}"):  # an earlier save's, killed before its cleanup
            if old != tmp:
                shutil.rmtree(old, ignore_errors=True)
        stale = (_previous_files(directory) | _weight_files(directory)) - set(listed_files(tmp))
        marker = directory / INCOMPLETE
        marker.write_text("files are being replaced; if this stays, the save was interrupted\n")
        new = sorted(tmp.iterdir(), key=lambda p: p.name == CHECKSUMS)  # the checksums last
        for path in new:
            target = directory / path.name
            if path.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            os.replace(path, target)
        written = {p.name for p in new}
        for name in stale:  # files of an earlier save that this one did not write (old shards)
            if name.split("/")[0] not in written:
                (directory / name).unlink(missing_ok=True)
        marker.unlink()
        return directory
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _previous_files(directory: Path) -> set[str]:
    try:
        listed = listed_files(directory)
    except FolderError:
        return set()
    return set(listed or ())


def verify_folder(directory, what: str = "model folder") -> bool:
    """Check a saved folder against its checksums; FolderError names what is wrong. True when checked, False
    for a local folder written without checksums (warned) or a folder that is not local (a hub name)."""
    directory = Path(directory)
    if not directory.is_dir():
        return False
    if (directory / INCOMPLETE).exists():
        raise FolderError(f"{directory} was being written when the save stopped ({INCOMPLETE} is there): the "
                          f"{what} is incomplete; save or export it again")
    files = listed_files(directory)
    if files is None:
        warnings.warn(f"{directory} has no {CHECKSUMS} (written by an earlier version): its files are not "
                      "verified; save it again to add them", stacklevel=3)
        return False
    for name, entry in sorted(files.items()):
        check_file(directory / name, entry["bytes"], entry["sha256"], error=FolderError)
    unlisted = sorted(_weight_files(directory) - set(files))
    if unlisted:  # transformers would load them, maybe instead of the listed ones
        raise FolderError(f"{directory} holds weight files its {CHECKSUMS} does not list: {unlisted}; they are not "
                          "this save's: remove them or save the folder again")
    return True
