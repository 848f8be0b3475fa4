"""A canonical conversation → `input_ids` and `labels` in one pass, truncated by whole rounds.

    IGNORE_INDEX = -100
    encode_conversation(messages, tokenizer, template="auto", max_length=None)
        -> {"input_ids": list[int], "labels": list[int]} | None

`labels[i]` is `input_ids[i]` where token i belongs to an assistant reply (its content and the
end-of-turn token after it, every assistant turn of the conversation), else IGNORE_INDEX. The
unshifted convention of HF causal LMs: the model shifts labels by one inside its loss.

One pass: the template renders the conversation once into text plus the character spans of the
replies (`templates.py`); the *whole* text is tokenized once with offsets, and a token is a label
when its characters overlap a reply span. The ids are therefore exactly the tokenization of the
rendered text (for "chat": exactly `tokenizer.apply_chat_template(messages)`), and the mask cannot
drift from it the way separately tokenized prompt/answer pieces do. Tokenizers without offsets
(no fast backend) fall back to tokenizing span by span, whose ids can differ from whole-text
tokenization at the span edges; all HF "fast" tokenizers use the exact path.

Truncation to `max_length` keeps the longest run of whole leading rounds that fits (later rounds
are dropped first). When not even the first round fits, that round is cut at `max_length` tokens.
A result without any label token (the prompt alone fills `max_length`) is None, for the caller to
count: a sample never trains on nothing.
"""
from __future__ import annotations

from bisect import bisect_right

from .conversation import is_canonical
from .templates import Rendered, render, resolve_template

IGNORE_INDEX = -100

# Status of encode_with_status: kept whole, later rounds dropped, first round cut, no label left.
FULL, DROPPED_ROUNDS, CUT_ROUND, NO_LABEL = "full", "dropped_rounds", "cut_first_round", "no_label"


def encode_conversation(messages: list[dict], tokenizer, template: str = "auto",
                        max_length: int | None = None) -> dict | None:
    """input_ids and labels of a canonical conversation, or None if truncation leaves no label."""
    return encode_with_status(messages, tokenizer, template, max_length)[0]


def encode_with_status(messages: list[dict], tokenizer, template: str = "auto",
                       max_length: int | None = None) -> tuple[dict | None, str]:
    """`encode_conversation` plus what truncation did: FULL, DROPPED_ROUNDS, CUT_ROUND or NO_LABEL."""
    if not is_canonical(messages):
        raise ValueError("not a canonical conversation: an optional system message, then user/assistant "
                         "rounds with non-blank contents (see data_prep.conversation.normalize)")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    rendered = render(messages, tokenizer, resolve_template(tokenizer, template))
    ids, labels, ends = _tokenize(tokenizer, rendered)
    if max_length is None or len(ids) <= max_length:
        return _result(ids, labels, FULL)

    for cut in reversed(rendered.round_ends[:-1]):
        # Estimate from the full tokenization (cheap), then re-tokenize the kept text to be exact.
        if bisect_right(ends, cut) > max_length:
            continue
        kept = Rendered(rendered.text[:cut], [(s, min(e, cut)) for s, e in rendered.label_spans if s < cut],
                        rendered.round_ends, rendered.prefix_ids)
        ids_k, labels_k, _ = _tokenize(tokenizer, kept)
        if len(ids_k) <= max_length:
            return _result(ids_k, labels_k, DROPPED_ROUNDS)
    return _result(ids[:max_length], labels[:max_length], CUT_ROUND)


def encoded_length(messages: list[dict], tokenizer, template: str = "auto") -> int:
    """Number of tokens of the untruncated encoding (the token budget used when splitting)."""
    rendered = render(messages, tokenizer, resolve_template(tokenizer, template))
    return len(_tokenize(tokenizer, rendered)[0])


def _result(ids: list[int], labels: list[int], status: str) -> tuple[dict | None, str]:
    if all(label == IGNORE_INDEX for label in labels):
        return None, NO_LABEL
    return {"input_ids": ids, "labels": labels}, status


def _tokenize(tokenizer, rendered: Rendered) -> tuple[list[int], list[int], list[int]]:
    """(ids, labels, end offsets) of prefix_ids + the tokenized text; ends are character offsets
    into the text (0 for prefix tokens), non-decreasing, for estimating truncation points."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        is_label = _overlaps(offsets, rendered.label_spans)
    else:
        ids, offsets, is_label = _tokenize_by_span(tokenizer, rendered)
    prefix = list(rendered.prefix_ids)
    labels = [t if lab else IGNORE_INDEX for t, lab in zip(ids, is_label)]
    return prefix + ids, [IGNORE_INDEX] * len(prefix) + labels, [0] * len(prefix) + _running_max_end(offsets)


def _running_max_end(offsets: list[tuple[int, int]]) -> list[int]:
    out, best = [], 0
    for _, end in offsets:
        best = max(best, end)
        out.append(best)
    return out


def _overlaps(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """For each token (start, end), whether it shares a character with a span. Both sorted."""
    out, j = [], 0
    for start, end in offsets:
        end = max(end, start + 1)  # a zero-width token counts as the character it sits on
        while j < len(spans) and spans[j][1] <= start:
            j += 1
        out.append(j < len(spans) and spans[j][0] < end)
    return out


def _tokenize_by_span(tokenizer, rendered: Rendered):
    """Fallback without offsets: tokenize the pieces between span edges separately."""
    edges = sorted({0, len(rendered.text), *(p for span in rendered.label_spans for p in span)})
    ids, offsets, is_label = [], [], []
    for a, b in zip(edges, edges[1:]):
        piece = tokenizer(rendered.text[a:b], add_special_tokens=False)["input_ids"]
        inside = any(s <= a and b <= e for s, e in rendered.label_spans)
        ids += piece
        offsets += [(a, b)] * len(piece)
        is_label += [inside] * len(piece)
    return ids, offsets, is_label
