"""The unified conversation and the rules that make any parsed conversation canonical.

A conversation is `{"id": str, "messages": [{"role", "content"}, ...], "source": str}` with roles
`system`, `user`, `assistant`. It is *canonical* when it is an optional system message followed by
one or more rounds, a round being a user message then an assistant message, every content a
non-blank string. Everything downstream (splitting, templates, truncation) relies on that shape.

`normalize(messages, where, report)` turns a parsed conversation into canonical form by these rules,
in this order, counting each change in `report.notes`:

1. a message whose content is empty or whitespace only is removed (`empty_turn_removed`);
2. consecutive messages with the same role are merged into one, joined by a blank line
   (`merged_turns`); ShareGPT exports split long answers ("continue") into several turns this way,
   and a removed empty reply leaves two user turns that belong together;
3. assistant messages before the first user message are removed (`leading_assistant_removed`),
   as FastChat does for conversations captured mid-way;
4. a final user message with no reply is removed (`trailing_user_removed`).

It raises `DataError` (a dropped record) for a system message anywhere but first
(`system_not_first`) and for a conversation left without a complete round (`no_complete_round`).
"""
from __future__ import annotations

from collections import Counter

from .report import DataError, Report

ROLES = ("system", "user", "assistant")


def normalize(messages: list[dict], where: str, report: Report) -> list[dict]:
    """Canonical copy of `messages` (roles already mapped to ROLES); see the module doc for rules.
    Changes are counted in `report.notes` only for conversations that are kept."""
    notes = Counter()
    kept = [m for m in messages if m["content"].strip()]
    notes["empty_turn_removed"] = len(messages) - len(kept)

    merged: list[dict] = []
    for m in kept:
        if merged and merged[-1]["role"] == m["role"]:
            merged[-1] = {**merged[-1], "content": merged[-1]["content"] + "\n\n" + m["content"]}
            notes["merged_turns"] += 1
        else:
            merged.append(dict(m))

    system = merged[:1] if merged and merged[0]["role"] == "system" else []
    turns = merged[len(system):]
    if any(m["role"] == "system" for m in turns):
        raise DataError("system_not_first", where, "a system message may only be the first message")
    leading = next((i for i, m in enumerate(turns) if m["role"] == "user"), len(turns))
    notes["leading_assistant_removed"] = leading
    turns = turns[leading:]
    if turns and turns[-1]["role"] == "user":
        turns = turns[:-1]
        notes["trailing_user_removed"] = 1
    if not turns:
        raise DataError("no_complete_round", where,
                        "no user message followed by an assistant reply (after removing empty turns)")
    for what, count in notes.items():
        report.note(what, count)
    return system + turns


def rounds(messages: list[dict]) -> tuple[list[dict], list[list[dict]]]:
    """Split a canonical conversation into (system messages, [[user, assistant], ...])."""
    head = 1 if messages[0]["role"] == "system" else 0
    body = messages[head:]
    return messages[:head], [body[i:i + 2] for i in range(0, len(body), 2)]


def is_canonical(messages: list[dict]) -> bool:
    """An optional system message, then user/assistant rounds, all contents non-blank strings."""
    if not messages or not all(isinstance(m.get("content"), str) and m["content"].strip() for m in messages):
        return False
    system, pairs = rounds(messages)
    return all([m["role"] for m in pair] == ["user", "assistant"] for pair in pairs) and bool(pairs)
