"""Raw records from a JSON array file, a JSON Lines file or a hub dataset, each with its location.

`iter_records(source, report)` yields `(where, index, record)`: `record` a dict, `index` its position
among the source's records (array index; n-th non-blank line, from 0), `where` its name for error
messages (see `report.DataError`). The file kind is decided by content, not by extension: a file
whose first non-blank character is `[` is a JSON array, anything else is JSON Lines (one object per
line, blank lines ignored).

What can be skipped is skipped through `report` (strict: raised): in JSON Lines a line that is not
UTF-8, not JSON or not an object; in a JSON array an element that is not an object. A JSON array
that is not valid UTF-8 or not valid JSON cannot be resynchronised, so that error is always raised,
with the line (and column) where decoding failed.

A source that is not an existing path but looks like a hub id (`owner/name`, no .json/.jsonl
suffix) is loaded with `datasets.load_dataset(name, split=split)`.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from .report import DataError, Report

_DECODER = json.JSONDecoder()
_WS = " \t\r\n"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_JSONISH = (".json", ".jsonl")


def iter_records(source: str | Path, report: Report,
                 split: str = "train") -> Iterator[tuple[str, int, dict]]:
    """Records of a local file, or of a hub dataset when `source` is a hub id (see module doc)."""
    path = Path(source)
    if path.is_file():
        yield from _iter_file(path, report)
    elif not path.exists() and _HUB_ID.match(str(source)) and path.suffix.lower() not in _JSONISH:
        yield from _iter_hub(str(source), split, report)
    elif path.exists():
        raise FileNotFoundError(f"{source}: not a data file")
    else:
        raise FileNotFoundError(f"{source}: no such data file (a hub dataset is written owner/name)")


def _iter_file(path: Path, report: Report) -> Iterator[tuple[str, int, dict]]:
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a UTF-8 byte-order mark, as some Windows editors write
    if raw.lstrip()[:1] == b"[":
        yield from _iter_json_array(path, raw, report)
    else:
        yield from _iter_json_lines(path, raw, report)


def _iter_json_lines(path: Path, raw: bytes, report: Report) -> Iterator[tuple[str, int, dict]]:
    index = -1
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        index += 1
        where = f"{path}:{lineno}"
        report.read += 1
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            report.drop(DataError("not_utf8", where,
                                  f"not valid UTF-8 (byte 0x{line[e.start]:02x} at byte {e.start + 1} of the line)"))
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            report.drop(DataError("bad_json", where, f"invalid JSON: {e.msg} (column {e.colno})"
                                  + (_NOT_JSONL_HINT if lineno == 1 else "")))
            continue
        if not isinstance(obj, dict):
            report.drop(DataError("not_object", where, f"expected a JSON object, got {json_type(obj)}"))
            continue
        yield where, index, obj


_NOT_JSONL_HINT = "; a data file is a JSON array of records or JSON Lines, one object per line"


def _iter_json_array(path: Path, raw: bytes, report: Report) -> Iterator[tuple[str, int, dict]]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError("not_utf8", f"{path}:{line}",
                        f"not valid UTF-8 (byte 0x{raw[e.start]:02x}); the whole JSON file is unusable") from e
    # Decode the array element by element (instead of one json.loads) to know each record's line.
    pos, line, index = text.index("[") + 1, 1, 0
    line_at = 0  # `line` is the line number of text position `line_at`
    while True:
        pos = _skip_ws(text, pos)
        if index and pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
        elif pos < len(text) and text[pos] == "]":
            if text[pos + 1:].strip(_WS):
                _raise_bad_json(path, text, pos + 1, "extra data after the closing ]")
            return
        elif index:
            _raise_bad_json(path, text, pos, "expected ',' or ']' after a record")
        line += text.count("\n", line_at, pos)
        line_at = pos
        try:
            obj, end = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            _raise_bad_json(path, text, e.pos, e.msg)
        where = f"{path}:{line} (record {index})"
        report.read += 1
        if isinstance(obj, dict):
            yield where, index, obj
        else:
            report.drop(DataError("not_object", where, f"expected a JSON object, got {json_type(obj)}"))
        pos, index = end, index + 1


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WS:
        pos += 1
    return pos


def _raise_bad_json(path: Path, text: str, pos: int, msg: str):
    line = text.count("\n", 0, pos) + 1
    column = pos - (text.rfind("\n", 0, pos) + 1) + 1
    raise DataError("bad_json", f"{path}:{line}",
                    f"invalid JSON: {msg} (column {column}); the whole JSON file is unusable")


def json_type(obj) -> str:
    """The JSON name of a decoded value's type, for messages (`an array`, not `list`)."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number"}
    return "null" if obj is None else names.get(type(obj), type(obj).__name__)


def _iter_hub(name: str, split: str, report: Report) -> Iterator[tuple[str, int, dict]]:
    import datasets  # imported here: slow, and only hub sources need it

    for index, row in enumerate(datasets.load_dataset(name, split=split)):
        report.read += 1
        yield f"{name}[{split}][{index}]", index, dict(row)
