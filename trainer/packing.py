"""Sequence packing: samples concatenated into rows of up to `max_length` tokens.

    rows = pack(samples, max_length, seed)        # row "samples" with position_ids
    batch = collate_packed(rows[i:i + n], pad_id) # input_ids, labels, position_ids; no attention_mask

Each sample keeps its own positions (0, 1, ... restarting inside the row), and the batch carries
no attention mask: with position ids that restart and no 2-D mask, transformers (5.23,
`masking_utils.find_packed_sequence_indices`) builds a block-diagonal causal mask for sdpa / eager
and flash-attention takes its varlen path, so no token attends across a sample boundary. Restarted
position ids are not enough next to a 2-D padding mask, nor with a KV cache (`use_cache=True`, the
default of a model in eval mode): transformers then skips the detection and the mask is only
causal; trainer.loss calls the decoder with `use_cache=False` and no mask for packed rows. The first
label of every sample is dropped, as the shift drops it in an unpacked row: the previous sample's
last token would otherwise learn to predict it.

Rows are packed once, first fit over the samples in a seeded shuffle (so each row mixes samples of
every length), and are then the units of the deterministic epoch order in trainer.data: resume and
multi-rank sharding work on rows as they work on samples. The same rows recur every epoch, in a new
order.
"""
from __future__ import annotations

import torch

from data_prep.encode import IGNORE_INDEX

OPEN_ROWS = 64


def pack(samples: list[dict], max_length: int, seed: int) -> list[dict]:
    """Rows of whole samples, each at most `max_length` tokens (a sample is never split)."""
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    rows: list[list[dict]] = []
    room: list[int] = []  # free tokens per row
    for i in order:
        n = len(samples[i]["input_ids"])
        # first fit among the last OPEN_ROWS rows: O(n) on 50 K samples, and rows further back are
        # nearly full anyway
        start = max(0, len(rows) - OPEN_ROWS)
        slot = next((r for r in range(start, len(rows)) if room[r] >= n), None)
        if slot is None:
            rows.append([])
            room.append(max_length)
            slot = len(rows) - 1
        rows[slot].append(samples[i])
        room[slot] -= n
    return [_concat(row) for row in rows]


def _concat(row: list[dict]) -> dict:
    out = {"input_ids": [], "labels": [], "position_ids": [], "n_samples": len(row)}
    for s in row:
        out["input_ids"] += s["input_ids"]
        out["labels"] += [IGNORE_INDEX] + s["labels"][1:]
        out["position_ids"] += list(range(len(s["input_ids"])))
    return out


def collate_packed(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad packed rows; the padding is one more "sample" (positions from 0, no labels)."""
    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.arange(width).repeat(len(rows), 1)
    for r, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[r, :n] = torch.tensor(row["input_ids"])
        labels[r, :n] = torch.tensor(row["labels"])
        position_ids[r, :n] = torch.tensor(row["position_ids"])
        position_ids[r, n:] -= n
    # num_tokens: the real tokens, for the log (not a model input: trainer.loss passes MODEL_INPUTS only)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "num_tokens": torch.tensor(sum(len(r["input_ids"]) for r in rows))}


def padding_share(rows: list[dict], batch_size: int) -> float:
    """Fraction of the padded batch grid that is padding, batching `rows` in order."""
    total = real = 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        total += len(chunk) * max(len(r["input_ids"]) for r in chunk)
        real += sum(len(r["input_ids"]) for r in chunk)
    return 1 - real / total if total else 0.0
