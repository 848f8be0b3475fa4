"""Alpaca, ShareGPT and unified records → canonical unified conversations, with validation.

    read_conversations(sources, report, fmt="auto", role_map=None, transform=None, split="train")
        -> list[{"id": str, "messages": [{"role", "content"}], "source": str}]

Formats (`fmt="auto"` decides per source from its first recognisable record):

- unified: `{"id"?, "messages": [{"role": "system"|"user"|"assistant", "content": str}], "source"?}`
- ShareGPT: `{"id"?, "conversations": [{"from": str, "value": str}], "system"?: str}`; `from` is mapped
  by `SHAREGPT_ROLES` (human/user → user; gpt/assistant/chatgpt/bard/bing/model → assistant;
  system → system), extended by `role_map` (e.g. `{"function_call": "assistant"}`). Other names are
  `unknown_role` errors, never guessed.
- Alpaca: `{"instruction": str, "input"?: str, "output": str, "system"?: str}`. The user message is
  the instruction, followed by a blank line and the input when there is one, as FastChat converts
  Alpaca. The in-memory user message also keeps `instruction` and `input` so that the Alpaca
  template can render Stanford's exact `prompt_input`; unified JSONL files store only role/content.

Missing `id` → `<file stem>-<record index>`; missing `source` → the file name (or hub id).
Each record is validated (field presence and types, roles), optionally `transform`ed (content
only, e.g. HTML → markdown), then made canonical by `conversation.normalize`. Bad records go to
`report` (see `report.py`): counted and skipped, or raised when the report is strict.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .conversation import ROLES, normalize
from .records import iter_records, json_type
from .report import DataError, Report

FORMATS = ("auto", "alpaca", "sharegpt", "unified")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
                  "model": "assistant", "system": "system"}


def detect_format(record: dict) -> str | None:
    """The format a record's keys say it is in, or None."""
    if "messages" in record:
        return "unified"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record or "output" in record:
        return "alpaca"
    return None


def read_conversations(sources: str | Path | Iterable[str | Path], report: Report, fmt: str = "auto",
                       role_map: dict[str, str] | None = None,
                       transform: Callable[[str], str] | None = None,
                       split: str = "train") -> list[dict]:
    """Canonical conversations from files or hub datasets (see the module doc)."""
    return [conv for _, conv in iter_conversations(sources, report, fmt, role_map, transform, split)]


def iter_conversations(sources: str | Path | Iterable[str | Path], report: Report, fmt: str = "auto",
                       role_map: dict[str, str] | None = None,
                       transform: Callable[[str], str] | None = None,
                       split: str = "train") -> Iterator[tuple[str, dict]]:
    """`read_conversations` as a stream of (where, conversation), `where` naming the record."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if isinstance(sources, (str, Path)):
        sources = [sources]
    roles = {**SHAREGPT_ROLES, **{k.lower(): v for k, v in (role_map or {}).items()}}
    bad = sorted(set(roles.values()) - set(ROLES))
    if bad:
        raise ValueError(f"role_map targets must be one of {', '.join(ROLES)}, got {', '.join(bad)}")
    for source in sources:
        source_fmt = None if fmt == "auto" else fmt
        name = Path(source).name if Path(source).is_file() else str(source)  # file name or hub id
        for where, index, record in iter_records(source, report, split=split):
            try:
                source_fmt = source_fmt or detect_format(record)
                if source_fmt is None:
                    raise DataError("unknown_format", where, "neither 'messages' (unified), "
                                    "'conversations' (ShareGPT) nor 'instruction'/'output' (Alpaca)")
                conv = _PARSERS[source_fmt](record, where, roles)
                conv["id"] = _string_field(record, "id", where, default=f"{Path(name).stem}-{index}")
                conv["source"] = _string_field(record, "source", where, default=name)
                if transform is not None:
                    conv["messages"] = _transformed(conv["messages"], transform, where)
                conv["messages"] = normalize(conv["messages"], where, report)
            except DataError as err:
                report.drop(err)
                continue
            yield where, conv


def _parse_unified(record: dict, where: str, roles: dict) -> dict:
    messages = _field(record, "messages", list, where)
    parsed = []
    for i, m in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(m, dict):
            raise DataError("wrong_type", where, f"field '{at}': expected an object, got {json_type(m)}")
        role = _field(m, "role", str, where, at)
        if role not in ROLES:
            raise DataError("unknown_role", where,
                            f"field '{at}.role': unknown role {role!r} (expected one of {', '.join(ROLES)})")
        parsed.append({"role": role, "content": _field(m, "content", str, where, at)})
    return {"messages": parsed}


def _parse_sharegpt(record: dict, where: str, roles: dict) -> dict:
    turns = _field(record, "conversations", list, where)
    parsed = []
    system = _field(record, "system", str, where, optional=True)
    if system:
        parsed.append({"role": "system", "content": system})
    for i, t in enumerate(turns):
        at = f"conversations[{i}]"
        if not isinstance(t, dict):
            raise DataError("wrong_type", where, f"field '{at}': expected an object, got {json_type(t)}")
        name = _field(t, "from", str, where, at)
        role = roles.get(name.lower())
        if role is None:
            raise DataError("unknown_role", where, f"field '{at}.from': unknown role {name!r} (known: "
                            f"{', '.join(sorted(roles))}; others can be mapped with a role map, --role_map)")
        parsed.append({"role": role, "content": _field(t, "value", str, where, at)})
    return {"messages": parsed}


def _parse_alpaca(record: dict, where: str, roles: dict) -> dict:
    instruction = _field(record, "instruction", str, where)
    extra = _field(record, "input", str, where, optional=True) or ""
    output = _field(record, "output", str, where)
    system = _field(record, "system", str, where, optional=True)
    user = {"role": "user", "content": "\n\n".join(p for p in (instruction, extra) if p.strip())}
    if extra != "":  # Stanford's own test for choosing prompt_input
        user.update(instruction=instruction, input=extra)
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": messages + [user, {"role": "assistant", "content": output}]}


_PARSERS = {"unified": _parse_unified, "sharegpt": _parse_sharegpt, "alpaca": _parse_alpaca}


def _field(obj: dict, key: str, kind: type, where: str, at: str = "", optional: bool = False):
    """obj[key] checked to be a `kind`; a missing (or, if optional, null) field is None."""
    name = f"{at}.{key}" if at else key
    if key not in obj or (optional and obj[key] is None):
        if optional:
            return None
        hint = ""
        if not at and detect_format(obj) not in (None, _FORMAT_OF_KEY.get(key)):
            hint = f" (this record looks like {detect_format(obj)} data)"
        raise DataError("missing_field", where, f"missing field '{name}'{hint}")
    value = obj[key]
    if not isinstance(value, kind):
        raise DataError("wrong_type", where, f"field '{name}': expected {_KIND_NAMES[kind]}, "
                        f"got {json_type(value)}")
    return value


_FORMAT_OF_KEY = {"messages": "unified", "conversations": "sharegpt", "instruction": "alpaca",
                  "output": "alpaca"}
_KIND_NAMES = {str: "a string", list: "an array", dict: "an object"}


def _string_field(record: dict, key: str, where: str, default: str) -> str:
    value = record.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError("wrong_type", where, f"field '{key}': expected a string, got {json_type(value)}")
    return str(value)


def _transformed(messages: list[dict], transform: Callable[[str], str], where: str) -> list[dict]:
    out = []
    for i, m in enumerate(messages):
        try:
            out.append({**m, "content": transform(m["content"])})
        except ValueError as e:
            raise DataError("transform_failed", where, f"message {i}: {e}") from e
    return out
