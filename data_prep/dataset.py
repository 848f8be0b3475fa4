"""What the trainer calls: encoded samples from a data file, and the batch collator.

    samples, report = load_dataset_for_training(path, tokenizer, template="auto", max_length=2048)
        samples: list of {"input_ids": list[int], "labels": list[int]} (unpadded, in file order)
        report:  report.Report; print(report.summary()), save report.to_dict()
    batch = collate(samples[i:i + n], pad_token_id)
        {"input_ids": LongTensor[n, T], "attention_mask": LongTensor[n, T], "labels": LongTensor[n, T]}

`path` is one source or a list: Alpaca / ShareGPT / unified JSON or JSONL files (format detected
per file) or hub dataset ids. `BUNDLED_ALPACA` is the default training data shipped in the package.

Records that cannot be used (malformed, no complete round, no label left after truncation to
`max_length`, a chat template that refuses the conversation or cannot be split into turns) are
counted in the report by reason and skipped, or raised with `strict=True`. Truncations that keep a sample are counted in
`report.notes` ("dropped_rounds", "cut_first_round"). If nothing usable remains, ValueError.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .clean import deduplicate
from .encode import FULL, IGNORE_INDEX, NO_LABEL, encode_with_status
from .formats import iter_conversations
from .report import DataError, Report
from .templates import resolve_template

BUNDLED_ALPACA = Path(__file__).resolve().parent / "samples" / "alpaca_en_demo.json"


def load_dataset_for_training(path: str | Path | Sequence[str | Path], tokenizer, template: str = "auto",
                              max_length: int | None = 2048, strict: bool = False, fmt: str = "auto",
                              split: str = "train", dedupe: bool = True, seen: dict | None = None,
                              verbose: bool = False) -> tuple[list[dict], Report]:
    """Encoded samples of every usable conversation in `path` and the report of what was dropped.
    With `dedupe`, repeated ids and repeated conversations are dropped (a duplicate would otherwise
    land on both sides of a train / held-out split); `seen` (updated) carries the conversations of
    sources loaded before, whose repeats here are dropped too. `verbose`: log every skipped record."""
    template = resolve_template(tokenizer, template)
    report = Report(strict=strict, verbose=verbose)
    samples = []
    conversations = list(iter_conversations(path, report, fmt=fmt, split=split))
    if dedupe:
        conversations = deduplicate(conversations, report, seen)
    for where, conv in conversations:
        try:
            sample, status = encode_with_status(conv["messages"], tokenizer, template, max_length)
        except ValueError as e:
            report.drop(DataError("template_error", where, str(e)))
            continue
        if sample is None:
            report.drop(DataError(NO_LABEL, where, f"no assistant token left within max_length={max_length}"
                                  " (the prompt alone fills it)"))
            continue
        if status != FULL:
            report.note(status)
        samples.append(sample)
    report.kept = len(samples)
    if not samples:
        raise ValueError(f"no usable samples in {path}:\n{report.summary()}")
    return samples, report


def collate(batch: Sequence[dict], pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """Right-pad a list of samples into LongTensors; padded labels are IGNORE_INDEX."""
    import torch

    if pad_token_id is None:
        raise ValueError("collate needs a pad_token_id (set tokenizer.pad_token, e.g. to the EOS token)")
    width = max(len(s["input_ids"]) for s in batch)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, sample in enumerate(batch):
        n = len(sample["input_ids"])
        input_ids[row, :n] = torch.tensor(sample["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(sample["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
