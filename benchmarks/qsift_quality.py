"""QSIFT vs QLoRA vs SIFT (full-precision base) vs LoRA: held-out loss at equal trainable counts.

SmolLM2-135M-Instruct on the bundled Alpaca sample with a fixed held-out split (benchmarks.quality's
data, scoring and per-run procedure). For each LoRA rank (= trainable budget) and seed: LoRA and
QLoRA at that rank, SIFT and QSIFT (gradient selection) at the rate with the same count. The 4-bit
runs quantize the same weights (NF4, double quantization) through benchmarks.methods, as the planner
does. Every run of a seed sees the same batches in the same order. One learning rate per family, no
probe here: the `quality` stage's probe on this data chose 3e-4 for SIFT and 1e-3 for LoRA, used for
the 4-bit variants too.
"""
from __future__ import annotations

import copy
import time

import torch
from tqdm import tqdm

from .data import encoded_alpaca, padded_batches, split
from .methods import Method, sift_rate_for_rank
from .models import SMOLLM2, load_pristine
from .quality import heldout_loss, summarize, train_and_score


def methods_for(model, rank: int, lr_sift: float, lr_lora: float, quantization: str) -> dict[str, Method]:
    rate = sift_rate_for_rank(model, rank)
    return {"qsift": Method(f"QSIFT {rate:.2%}", "sift", rate=rate, lr=lr_sift, quantization=quantization),
            "qlora": Method(f"QLoRA r={rank}", "lora", rank=rank, lr=lr_lora, quantization=quantization),
            "sift": Method(f"SIFT {rate:.2%}", "sift", rate=rate, lr=lr_sift),
            "lora": Method(f"LoRA r={rank}", "lora", rank=rank, lr=lr_lora)}


def run(setting: dict, checkpoint=None, log=print) -> dict:
    """Every (seed, rank, method) run of `setting` (the `qsift_quality` stage's parameters). Each
    finished run is saved to `checkpoint` (when given), and a restarted study skips the runs it holds."""
    pristine, tokenizer = load_pristine(SMOLLM2)
    train, held = split(encoded_alpaca(tokenizer, setting["max_length"]), setting["n_heldout"])
    held_batches = padded_batches(held, 8, tokenizer.pad_token_id)
    from sift.quantize import quantize  # the 4-bit base before training: what quantization alone costs

    out = (checkpoint.load() if checkpoint else None) or {
        "setting": setting, "base_heldout_loss": heldout_loss(pristine, held_batches),
        "quantized_base_heldout_loss": heldout_loss(quantize(copy.deepcopy(pristine), setting["quantization"]),
                                                    held_batches),
        "n_train": len(train), "n_heldout": len(held), "runs": []}
    log(f"base held-out loss {out['base_heldout_loss']:.4f}, {setting['quantization']} base "
        f"{out['quantized_base_heldout_loss']:.4f} ({len(train)} train / {len(held)} held-out); "
        f"{len(out['runs'])} runs already done")
    done = {(r["seed"], r["method"]) for r in out["runs"]}
    jobs = [(seed, method) for seed in setting["seeds"] for rank in setting["ranks"]
            for method in (methods_for(pristine, rank, setting["lr_sift"], setting["lr_lora"],
                                       setting["quantization"])[k] for k in setting["methods"])]
    for seed, method in tqdm(jobs, desc="qsift_quality runs", unit="run", leave=False, disable=None):
        if (seed, method.name) in done:
            continue
        t0 = time.perf_counter()
        r = train_and_score(pristine, method, seed, seed_batches(train, seed, setting, tokenizer.pad_token_id),
                            held_batches, max_grad_norm=1.0)
        r["quantization"] = method.quantization
        out["runs"].append(r)
        out["summary"] = summarize(out["runs"])
        log(f"seed {seed} {method.name:16s} {r['trainable_entries'] / 1e6:6.3f} M trainable  held-out "
            f"{r['heldout_loss']:.4f}  ({time.perf_counter() - t0:.0f} s)")
        if checkpoint:
            checkpoint.save(out)
    out["summary"] = summarize(out["runs"])
    return out


def seed_batches(train: list[dict], seed: int, setting: dict, pad_token_id: int) -> list[dict]:
    """The seed's batches: the training split in a seeded order, repeated as often as the steps need."""
    n = setting["steps"] * setting["batch_size"]
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = [train[i % len(train)] for i in (order * (1 + n // len(train)))]
    return padded_batches(chosen[:n], setting["batch_size"], pad_token_id)
