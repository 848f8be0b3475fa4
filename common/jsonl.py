"""JSON Lines reading for every part of the project: a bad line names its file and line, and an
append cut short by a crash (a torn last line) can be dropped instead of failing every later read."""
from __future__ import annotations

import json
import os


def read_jsonl(path: str | os.PathLike, tolerate_torn_tail: bool = False) -> list[tuple[int, dict]]:
    """[(line number, object)]; a bad line raises naming file and line. With `tolerate_torn_tail`, a
    malformed *last* line (an append cut short by a crash) is dropped instead: the caller redoes it."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    rows = []
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if tolerate_torn_tail and i == last:
                print(f"warning: {path}:{i + 1}: dropping a truncated last line (interrupted write)")
                continue
            raise ValueError(f"{path}:{i + 1}: not valid JSON: {e}") from e
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{i + 1}: expected a JSON object, got {type(obj).__name__}")
        rows.append((i + 1, obj))
    return rows
