"""Benchmark batches from the bundled Alpaca sample, encoded by data_prep (chat template, labels on
assistant tokens only). Nothing here reads outside the repository."""
from __future__ import annotations

import torch

from data_prep import BUNDLED_ALPACA, IGNORE_INDEX, collate, load_dataset_for_training


def encoded_alpaca(tokenizer, max_length: int | None) -> list[dict]:
    samples, _report = load_dataset_for_training(BUNDLED_ALPACA, tokenizer, max_length=max_length)
    return samples


def fixed_batches(tokenizer, n: int, batch_size: int, seq_len: int, vocab_size: int | None = None) -> list[dict]:
    """`n` batches of shape [batch_size, seq_len] with no padding: the first samples at least
    `seq_len` tokens long, truncated to it (data_prep cuts the reply, so labels remain). No
    attention_mask, so every method runs the same unpadded causal kernel. With `vocab_size`
    smaller than the tokenizer's (random-init shapes), ids are folded into range."""
    long = [s for s in encoded_alpaca(tokenizer, seq_len) if len(s["input_ids"]) == seq_len]
    need = n * batch_size
    if len(long) < need:
        raise ValueError(f"only {len(long)} Alpaca samples reach {seq_len} tokens; {need} needed")
    batches = []
    for i in range(n):
        ids = torch.tensor([s["input_ids"] for s in long[i * batch_size:(i + 1) * batch_size]])
        labels = torch.tensor([s["labels"] for s in long[i * batch_size:(i + 1) * batch_size]])
        if vocab_size is not None:
            ids = ids % vocab_size
            labels = torch.where(labels == IGNORE_INDEX, labels, labels % vocab_size)
        batches.append({"input_ids": ids, "labels": labels})
    return batches


def split(samples: list[dict], n_heldout: int, seed: int = 1234) -> tuple[list[dict], list[dict]]:
    """(train, held-out): a fixed random held-out set, independent of the training seed."""
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    held = [samples[i] for i in order[:n_heldout]]
    train = [samples[i] for i in order[n_heldout:]]
    return train, held


def padded_batches(samples: list[dict], batch_size: int, pad_token_id: int) -> list[dict]:
    return [collate(samples[i:i + batch_size], pad_token_id) for i in range(0, len(samples), batch_size)]
