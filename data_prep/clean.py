"""ShareGPT-style cleaning of canonical conversations: HTML → markdown, duplicates, splitting.

- `html_to_markdown(text)`: FastChat's clean_sharegpt recipe for ShareGPT's scraped HTML (drop the
  `<div>`/`<span>` wrappers that break code blocks, markdownify, turn ChatGPT's
  "```pythonCopy code..." blocks into fenced code with the language, strip the "1 / 2" regenerate
  counter and "Copy N chars / N words" noise). Underscores and asterisks are not escaped (code and
  identifiers stay as written). Raises ValueError when the HTML cannot be parsed.
- `deduplicate(conversations, report)`: keeps the first of conversations with the same id
  (`duplicate_id`) or the same messages (`duplicate_content`), as FastChat drops both.
- `split_conversation(conv, max_tokens, count_tokens, report)`: whole rounds packed greedily into
  chunks of at most `max_tokens` tokens. Unlike FastChat's splitter it keeps the final round, every
  chunk starts with a user turn (chunks are whole user/assistant rounds), and a leading system
  message is repeated in every chunk. A single round longer than the budget becomes a chunk of its
  own (`round_over_budget`), left for the trainer's truncation rather than dropped. Concatenating
  the chunks' rounds gives back the conversation.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable

from .conversation import rounds
from .report import DataError, Report

_OPEN_DIV_SPAN = re.compile(r"<(?:div|span)\b[^>]*>")
_CODE_WITH_LANG = re.compile(r"```[ \t]*\n?([^\n`]*?)\s*(?:Copy code)+\s*(.+?)\s*```", re.DOTALL)
_REGENERATE_COUNTER = re.compile(r"^\d+ / \d+")
_COPY_CHARS = re.compile(r"Copy\d+ chars / \d+ words")
_EMPTY_COPY_CODE = re.compile(r"```[^`]*?Copy code\s*```")


def html_to_markdown(text: str) -> str:
    """Markdown for one ShareGPT HTML message (see the module doc)."""
    import markdownify

    text = _OPEN_DIV_SPAN.sub("", text)
    try:
        text = markdownify.markdownify(text, heading_style="ATX", escape_underscores=False,
                                       escape_asterisks=False).strip()
    except Exception as e:  # bs4 raises its own ParserRejectedMarkup, AssertionError, ...
        raise ValueError(f"HTML could not be parsed: {type(e).__name__}: {e}") from e
    text = _CODE_WITH_LANG.sub(lambda m: f"```{m[1]}\n{m[2]}\n```", text)
    text = _REGENERATE_COUNTER.sub("", text)
    text = _COPY_CHARS.sub("", text)
    text = _EMPTY_COPY_CODE.sub("", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def deduplicate(items: list[tuple[str, dict]], report: Report,
                seen_content: dict[str, str] | None = None) -> list[tuple[str, dict]]:
    """First occurrence of each id and of each message list among (where, conversation) pairs;
    later ones are dropped and counted. `seen_content` ({message list key: where}, updated): the
    conversations of earlier sources, whose repeats are dropped too (ids are each source's own)."""
    seen_ids: set[str] = set()
    seen_content = {} if seen_content is None else seen_content
    kept = []
    for where, conv in items:
        key = json.dumps(conv["messages"], sort_keys=True, ensure_ascii=False)
        if conv["id"] in seen_ids:
            report.drop(DataError("duplicate_id", where, f"id {conv['id']!r} already seen"))
        elif key in seen_content:
            report.drop(DataError("duplicate_content", where, f"same messages as {seen_content[key]}"))
        else:
            seen_ids.add(conv["id"])
            seen_content[key] = where
            kept.append((where, conv))
    return kept


def split_conversation(conv: dict, max_tokens: int, count_tokens: Callable[[list[dict]], int],
                       report: Report) -> list[dict]:
    """Chunks of whole rounds within `max_tokens` as measured by `count_tokens(messages)`."""
    system, pairs = rounds(conv["messages"])
    chunks: list[list[list[dict]]] = [[]]
    for pair in pairs:
        current = chunks[-1]
        if current and count_tokens(system + _flat(current + [pair])) > max_tokens:
            chunks.append([])
        chunks[-1].append(pair)
    for chunk in chunks:
        if len(chunk) == 1 and count_tokens(system + _flat(chunk)) > max_tokens:
            report.note("round_over_budget")
    if len(chunks) == 1:
        return [conv]
    report.note("split_conversations")
    report.note("chunks_added", len(chunks) - 1)
    return [{**conv, "id": f"{conv['id']}_{k}", "messages": system + _flat(chunk)}
            for k, chunk in enumerate(chunks)]


def _flat(pairs: list[list[dict]]) -> list[dict]:
    return [m for pair in pairs for m in pair]
