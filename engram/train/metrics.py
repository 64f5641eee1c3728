"""The metrics log of a run (``metrics.jsonl``): one JSON record per line, one history."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from engram.fileio import atomic_write_text


class MetricsLog:
    """Append-only JSONL; on resume, entries after the resumed step are dropped (one history)."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            atomic_write_text(path, "")
        elif path.exists():  # rewritten whole: a crash here keeps the old history, never half of it
            lines = [line for line in path.read_text().splitlines() if line.strip()]
            kept = []
            for number, line in enumerate(lines, start=1):
                try:
                    record = json.loads(line)
                except ValueError:
                    if number == len(lines):  # a line cut by a crash mid-write: it was never complete
                        print(f"[engram] dropping the torn last line of {path}", file=sys.stderr)
                        break
                    raise ValueError(f"{path}:{number} is not valid JSON; repair or remove that line") from None
                if record.get("step", 0) <= resume_step:
                    kept.append(line)
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: Path, tail_bytes: int | None = None) -> list[dict]:
    """The records of a metrics log, oldest first. A line that does not parse (a write cut by a crash,
    or the cut first line of a tail) is skipped. ``tail_bytes``: read only the file's last bytes, for
    the latest records of a long log."""
    with open(path, "rb") as f:
        if tail_bytes is not None:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - tail_bytes))
        lines = f.read().decode("utf-8", "replace").splitlines()
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
