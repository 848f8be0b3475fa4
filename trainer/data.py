"""Training samples and their deterministic order: the data position is just the step number.

Epoch e visits the samples in `randperm(n, seed + e)` order; optimizer step s takes micro-batches
s*accum ... s*accum + accum - 1 of the endless sequence of epochs. Resuming at step s therefore
needs nothing but s, and every rank (DeepSpeed) can compute its own share.
"""
from __future__ import annotations

import torch

from common.cli import UsageError
from data_prep.dataset import collate, load_dataset_for_training
from data_prep.encode import IGNORE_INDEX

from .args import DataArguments
from .packing import collate_packed, pack


def build_datasets(data: DataArguments, tokenizer, seed: int, verbose: bool = True) -> tuple[list[dict], list[dict], dict]:
    """(training units, held-out samples, data report). The units are samples, or packed rows with
    `--packing` (trainer.packing); held-out samples stay unpacked and carry `prompt_ids` (the tokens
    before the first assistant token) for the before/after sample generation."""
    samples, report = _load(data.data_path, data, tokenizer, "--data_path")
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    if data.eval_data_path:
        held, held_report = _load(data.eval_data_path, data, tokenizer, "--eval_data_path")
        held = held[:data.eval_samples or None]
        train = [samples[i] for i in order]
    else:
        if len(samples) <= data.eval_samples:
            raise UsageError(f"{data.data_path}: {len(samples)} usable samples, need more than --eval_samples "
                             f"{data.eval_samples}: lower --eval_samples or add data\n{report.summary()}")
        held, held_report = [samples[i] for i in order[:data.eval_samples]], None
        train = [samples[i] for i in order[data.eval_samples:]]
    for s in held:
        s["prompt_ids"] = s["input_ids"][:next(i for i, x in enumerate(s["labels"]) if x != IGNORE_INDEX)]
    if data.max_train_samples:
        train = train[:data.max_train_samples]
    out = {**report.to_dict(), "train_samples": len(train), "heldout_samples": len(held)}
    if held_report is not None:
        out["eval_data"] = held_report.to_dict()
    if data.packing:
        train = pack(train, data.model_max_length, seed)
        out["packed_rows"] = len(train)
    if verbose:
        packed = f", packed into {len(train)} rows of <= {data.model_max_length} tokens" if data.packing else ""
        print(f"data {data.data_path}: {report.summary()}\n  train {out['train_samples']}{packed}, "
              f"held-out {len(held)}" + (f" from {data.eval_data_path}" if data.eval_data_path else ""))
    return train, held, out


def _load(path: str, data: DataArguments, tokenizer, flag: str) -> tuple[list[dict], object]:
    try:
        return load_dataset_for_training(path, tokenizer, data.template, data.model_max_length, data.strict)
    except ValueError as e:  # nothing usable, or a bad record under --strict: the message names the file
        raise UsageError(f"train_sft.py: {flag}: {e}") from None


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
                       rank: int = 0, world: int = 1, packed: bool = False) -> list[dict[str, torch.Tensor]]:
    """The collated micro-batches of optimizer step `step` (of packed rows with `packed`)."""
    batch = collate_packed if packed else collate
    return [batch(micro_batch(samples, step * accum + i, batch_size, seed, rank, world), pad_id)
            for i in range(accum)]
