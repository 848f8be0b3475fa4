"""Training samples and their deterministic order: the data position is just the step number.

Epoch e visits the samples in `randperm(n, seed + e)` order; optimizer step s takes micro-batches
s*accum ... s*accum + accum - 1 of the endless sequence of epochs. Resuming at step s therefore
needs nothing but s, and every rank (DeepSpeed) can compute its own share.
"""
from __future__ import annotations

import torch

from data_prep.dataset import collate, load_dataset_for_training
from data_prep.encode import IGNORE_INDEX


def build_datasets(d, tokenizer, seed: int, verbose: bool = True) -> tuple[list[dict], list[dict], dict]:
    """(train samples, held-out samples, data report); held-out samples carry `prompt_ids` (the
    tokens before the first assistant token) for the before/after sample generation."""
    samples, report = load_dataset_for_training(d.data_path, tokenizer, d.template, d.model_max_length, d.strict)
    if len(samples) <= d.eval_samples:
        raise ValueError(f"{d.data_path}: {len(samples)} usable samples, need more than --eval_samples "
                         f"{d.eval_samples}: lower --eval_samples or add data\n{report.summary()}")
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    held = [samples[i] for i in order[:d.eval_samples]]
    for s in held:
        s["prompt_ids"] = s["input_ids"][:next(i for i, x in enumerate(s["labels"]) if x != IGNORE_INDEX)]
    train = [samples[i] for i in order[d.eval_samples:]]
    if d.max_train_samples:
        train = train[:d.max_train_samples]
    if verbose:
        print(f"data {d.data_path}: {report.summary()}\n  train {len(train)}, held-out {len(held)}")
    return train, held, report.to_dict()


def micro_batches_per_epoch(n_samples: int, batch_size: int) -> int:
    """Full micro-batches of one epoch (the ragged remainder waits for the next epoch's shuffle)."""
    return max(n_samples // batch_size, 1)


def micro_batch(samples: list[dict], index: int, batch_size: int, seed: int, rank: int = 0,
                world: int = 1) -> list[dict]:
    """The `index`-th micro-batch of the endless epoch sequence; with `world` ranks each rank takes
    its interleaved share of the same global micro-batch (batch_size is per rank)."""
    per_epoch = micro_batches_per_epoch(len(samples), batch_size * world)
    epoch, within = divmod(index, per_epoch)
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed + epoch))
    chunk = order[within * batch_size * world:(within + 1) * batch_size * world]
    return [samples[i] for i in chunk[rank::world].tolist()]


def batches_for_window(samples, step: int, batch_size: int, accum: int, seed: int, pad_id: int,
                       rank: int = 0, world: int = 1) -> list[dict[str, torch.Tensor]]:
    """The collated micro-batches of optimizer step `step`."""
    return [collate(micro_batch(samples, step * accum + i, batch_size, seed, rank, world), pad_id)
            for i in range(accum)]
