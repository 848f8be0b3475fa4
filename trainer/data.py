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
from data_prep.report import Report

from .args import DataArguments, data_files
from .packing import collate_packed, pack


def build_datasets(data: DataArguments, tokenizer, seed: int, verbose: bool = True,
                   records: bool = False) -> tuple[list[dict], list[dict], dict]:
    """(training units, held-out samples, data report). The units are samples (with
    `--train_on_prompt` every token a label), or packed rows with `--packing` (trainer.packing);
    held-out samples stay unpacked, keep the assistant-only labels and carry `prompt_ids` (the tokens
    before the first assistant token) for the before/after sample generation. `verbose`: print the
    summary, per file; `records`: log every skipped record as it comes."""
    samples, reports = _load(data.data_path, data, tokenizer, records, "--data_path")
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    held_reports = {}
    if data.eval_data_path:
        held, held_reports = _load(data.eval_data_path, data, tokenizer, records, "--eval_data_path")
        held = held[:data.eval_samples or None]
        train = [samples[i] for i in order]
    else:
        if len(samples) <= data.eval_samples:
            raise UsageError(f"{data.data_path}: {len(samples)} usable samples, need more than --eval_samples "
                             f"{data.eval_samples}: lower --eval_samples or add data\n{_summary(reports, True)}")
        held = [samples[i] for i in order[:data.eval_samples]]
        train = [samples[i] for i in order[data.eval_samples:]]
    for s in held:
        s["prompt_ids"] = s["input_ids"][:next(i for i, x in enumerate(s["labels"]) if x != IGNORE_INDEX)]
    if data.max_train_samples:
        train = train[:data.max_train_samples]
    if data.train_on_prompt:  # the shift (and packing) drops each sample's first label: never across samples
        train = [{**s, "labels": list(s["input_ids"])} for s in train]
    out = {**_report_dict(reports), "train_samples": len(train), "heldout_samples": len(held)}
    if held_reports:
        out["eval_data"] = _report_dict(held_reports)
    if data.packing:
        train = pack(train, data.model_max_length, seed)
        out["packed_rows"] = len(train)
    if verbose:
        packed = f", packed into {len(train)} rows of <= {data.model_max_length} tokens" if data.packing else ""
        hint = any(r.dropped for r in (*reports.values(), *held_reports.values())) and not records
        print(_summary({**reports, **held_reports}) + f"\n  train {out['train_samples']}{packed}, held-out {len(held)}"
              + (f" from {data.eval_data_path}" if data.eval_data_path else "")
              + ("\n  (--verbose lists every skipped record)" if hint else ""))
    return train, held, out


def _load(spec: str, data: DataArguments, tokenizer, records: bool, flag: str) -> tuple[list[dict], dict[str, Report]]:
    """The samples of every file of `spec` (comma-separated), in order, and each file's report; a
    conversation that an earlier file holds too is dropped (duplicate_content)."""
    samples, reports, seen = [], {}, {}
    for path in data_files(spec):
        try:
            found, reports[path] = load_dataset_for_training(path, tokenizer, data.template, data.model_max_length,
                                                             data.strict, seen=seen, verbose=records)
        except ValueError as e:  # nothing usable, or a bad record under --strict: the message names the file
            raise UsageError(f"train_sft.py: {flag}: {e}") from None
        samples += found
    return samples, reports


def _report_dict(reports: dict[str, Report]) -> dict:
    """One file's report as args.json records it; several: {"files": {path: report}}."""
    if len(reports) == 1:
        return next(iter(reports.values())).to_dict()
    return {"files": {path: report.to_dict() for path, report in reports.items()}}


def _summary(reports: dict[str, Report], examples: bool = False) -> str:
    return "\n".join(f"data {path}: {report.summary(examples)}" for path, report in reports.items())


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
