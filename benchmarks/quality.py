"""Held-out loss at equal trainable-parameter counts (the paper's SIFT >= LoRA >> random).

SmolLM2-135M-Instruct on the bundled Alpaca sample (chat template, loss on assistant tokens), a
fixed held-out split, and per seed: full fine-tuning, LoRA at each rank, SIFT with gradient
selection and SIFT with random selection at the rate that matches each LoRA rank's count
(methods.sift_rate_for_rank). Every run starts from the same weights, sees the same batches in the
same order for a given seed (the seed also draws LoRA's A and SIFT-random's indices) and is scored
by the token-level mean loss over all assistant tokens of the held-out split.
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from .data import encoded_alpaca, padded_batches, split
from .methods import Method, Trainee, sift_rate_for_rank


@dataclass(frozen=True)
class QualityConfig:
    """One study's setting; its defaults are the `quality` stage's (benchmarks/stages.py)."""
    steps: int               # optimizer steps per run
    batch_size: int          # conversations per step
    max_length: int          # tokens per conversation (later ones cut)
    n_heldout: int           # held-out conversations scored after training
    n_val: int               # validation conversations for the learning-rate probe
    seeds: tuple[int, ...]   # data order / init seeds
    ranks: tuple[int, ...]   # LoRA ranks = trainable budgets
    lr_grid: dict            # {family: learning rates probed (seed 0, largest rank)}
    max_grad_norm: float     # global clipping for every method


def family_method(model, family: str, rank: int, lr: float, selection: str = "grad") -> Method:
    """full | lora | sift, at LoRA rank `rank`'s trainable count (full: every parameter)."""
    if family == "full":
        return Method("full", "full", lr=lr)
    if family == "lora":
        return Method(f"LoRA r={rank}", "lora", rank=rank, lr=lr)
    rate = sift_rate_for_rank(model, rank)
    return Method(f"SIFT {selection} {rate:.2%}", "sift", rate=rate, selection=selection, lr=lr)


def methods_for(model, cfg: QualityConfig, lrs: dict[str, float]) -> list[Method]:
    """Full fine-tuning, then per rank: LoRA, SIFT-grad and SIFT-random at LoRA's count.
    SIFT-random uses SIFT-grad's learning rate: same optimizer, only the entries differ."""
    out = [family_method(model, "full", 0, lrs["full"])]
    for rank in cfg.ranks:
        out += [family_method(model, "lora", rank, lrs["lora"]),
                family_method(model, "sift", rank, lrs["sift"]),
                family_method(model, "sift", rank, lrs["sift"], selection="random")]
    return out


@torch.no_grad()
def heldout_loss(model, batches: list[dict]) -> float:
    """Mean loss over every label token of the held-out set (not a mean of batch means)."""
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        n = (b["labels"][:, 1:] != -100).sum().item()  # HF shifts labels by one inside the loss
        total += model(**b).loss.item() * n
        count += n
    model.train()
    return total / count


def train_and_score(pristine, method: Method, seed: int, batches: list[dict], scored: list[dict],
                    max_grad_norm: float) -> dict:
    model = copy.deepcopy(pristine)
    model.train()
    trainee = Trainee(method, model, seed=seed, max_grad_norm=max_grad_norm)
    t0 = time.perf_counter()
    losses = [trainee.train_step(b).item() for b in batches]
    loss = heldout_loss(trainee.model, scored)
    trainee.close()
    return {"method": method.name, "kind": method.kind, "selection": method.selection, "rank": method.rank,
            "rate": method.rate, "lr": method.lr, "seed": seed, "trainable_entries": trainee.entries,
            "train_losses": losses, "heldout_loss": loss, "seconds": time.perf_counter() - t0}


def run(pristine, tokenizer, cfg: QualityConfig, log=print) -> dict:
    samples = encoded_alpaca(tokenizer, cfg.max_length)
    train, held = split(samples, cfg.n_heldout)
    val, train = train[:cfg.n_val], train[cfg.n_val:]
    held_batches = padded_batches(held, 8, tokenizer.pad_token_id)
    val_batches = padded_batches(val, 8, tokenizer.pad_token_id)
    base = heldout_loss(pristine, held_batches)
    log(f"  base model held-out loss {base:.4f} ({len(train)} train / {len(val)} val / {len(held)} held-out)")

    def batches_for(seed):
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
        chosen = [train[i] for i in order[:cfg.steps * cfg.batch_size]]
        return padded_batches(chosen, cfg.batch_size, tokenizer.pad_token_id)

    # 1. learning rate per family: seed 0, the largest budget, scored on the validation split
    probe, lrs = [], {}
    rank = max(cfg.ranks)
    for family, grid in cfg.lr_grid.items():
        for lr in grid:
            method = family_method(pristine, family, rank, lr)
            r = train_and_score(pristine, method, 0, batches_for(0), val_batches, cfg.max_grad_norm)
            probe.append(r)
            log(f"  lr probe {method.name:22s} lr {lr:.0e}: validation loss {r['heldout_loss']:.4f}")
        lrs[family] = min((r for r in probe if r["kind"] == family), key=lambda r: r["heldout_loss"])["lr"]
    log(f"  chosen learning rates {lrs} (rank {rank} budget)")

    # 2. every method, every seed, scored on the held-out split
    runs = []
    jobs = [(seed, method) for seed in cfg.seeds for method in methods_for(pristine, cfg, lrs)]
    for seed, method in tqdm(jobs, desc="quality runs", unit="run", leave=False, disable=None):
        runs.append(train_and_score(pristine, method, seed, batches_for(seed), held_batches, cfg.max_grad_norm))
        r = runs[-1]
        log(f"  seed {seed} {method.name:22s} {r['trainable_entries'] / 1e6:6.2f} M trainable  "
            f"held-out {r['heldout_loss']:.4f}  ({r['seconds']:.0f} s)")
    return {"config": asdict(cfg), "base_heldout_loss": base, "n_train": len(train), "n_val": len(val),
            "n_heldout": len(held), "lr_probe": probe, "lrs": lrs, "runs": runs, "summary": summarize(runs)}


def summarize(runs: list[dict]) -> list[dict]:
    by = {}
    for r in runs:
        by.setdefault(r["method"], []).append(r)
    out = []
    for name, rs in by.items():
        losses = [r["heldout_loss"] for r in rs]
        out.append({"method": name, "kind": rs[0]["kind"], "selection": rs[0]["selection"],
                    "trainable_entries": rs[0]["trainable_entries"], "seeds": len(rs),
                    "mean": statistics.fmean(losses), "std": statistics.stdev(losses) if len(rs) > 1 else 0.0,
                    "losses": losses})
    return out
