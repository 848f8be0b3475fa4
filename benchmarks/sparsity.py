"""Gradient quasi-sparsity, the paper's motivating observation, on the real model and data.

For each target weight and each of `n_batches` batches of the bundled Alpaca sample (labels on the
assistant tokens), the dense gradient is examined inside its post-accumulate-grad hook and freed
there (one dense gradient alive at a time, as in SIFT). Per tensor and rate r (1 %, 5 %):

- energy share of the top-r entries: ||g_S||^2 / ||g||^2 with S the r*n largest |g| (a uniform
  gradient gives r; "the top 1 % carries most of the gradient" means this is far above r);
- the same share on batch i >= 2 of the entries chosen on batch 1: what SIFT's fixed selection
  captures of later gradients;
- overlap |S_i ∩ S_j| / k of the top-r sets of two batches, averaged over pairs (chance: r).
"""
from __future__ import annotations

import math
import statistics
from collections import defaultdict

import torch

from .methods import targets_of

RATES = (0.01, 0.05)


def module_type(name: str) -> str:
    return name.split(".")[-2]


def layer_of(name: str) -> int:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1])


def measure(model: torch.nn.Module, batches: list[dict], rates=RATES, log=print) -> dict:
    """Per-tensor statistics (see module doc) over `batches`; the model's weights are not changed."""
    targets = targets_of(model)
    keep = {id(p) for _, p in targets}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    stats = {name: {"numel": p.numel(), "share": defaultdict(list), "first_share": defaultdict(list),
                    "sets": defaultdict(list)} for name, p in targets}
    first_sets = {}

    def hook_for(name):
        @torch.no_grad()
        def hook(p):
            g, p.grad = p.grad.reshape(-1), None
            sq = g.float().square()
            total = sq.sum()
            for rate in rates:
                k = math.ceil(rate * g.numel())
                top = torch.topk(sq, k, sorted=False)
                stats[name]["share"][rate].append((top.values.sum() / total).item())
                chosen = top.indices.sort().values.to(torch.int32)
                key = (name, rate)
                if key not in first_sets:
                    first_sets[key] = chosen
                else:
                    first = first_sets[key].long()
                    stats[name]["first_share"][rate].append((sq[first].sum() / total).item())
                stats[name]["sets"][rate].append(chosen)
        return hook

    hooks = [p.register_post_accumulate_grad_hook(hook_for(n)) for n, p in targets]
    model.train()
    try:
        for i, batch in enumerate(batches):
            model(**batch).loss.backward()
            log(f"  quasi-sparsity: batch {i + 1}/{len(batches)}")
    finally:
        for h in hooks:
            h.remove()

    per_tensor = []
    for name, st in stats.items():
        row = {"name": name, "module": module_type(name), "layer": layer_of(name), "numel": st["numel"]}
        for rate in rates:
            row[f"top{rate:g}_share"] = statistics.fmean(st["share"][rate])
            row[f"top{rate:g}_share_min"] = min(st["share"][rate])
            row[f"first_batch_top{rate:g}_share"] = statistics.fmean(st["first_share"][rate])
            row[f"top{rate:g}_overlap"] = mean_pairwise_overlap(st["sets"][rate], st["numel"])
        per_tensor.append(row)
    return {"rates": list(rates), "n_batches": len(batches), "per_tensor": per_tensor,
            "by_module": summarize(per_tensor, "module", rates), "by_layer": summarize(per_tensor, "layer", rates),
            "overall": summarize(per_tensor, None, rates)["all"]}


def mean_pairwise_overlap(sets: list[torch.Tensor], numel: int) -> float:
    """Mean over pairs (i < j) of |S_i ∩ S_j| / k, in O(numel): an entry chosen by c of the
    batches is shared by c (c - 1) / 2 pairs."""
    counts = torch.zeros(numel, dtype=torch.int32)
    for s in sets:
        counts[s.long()] += 1
    pairs = len(sets) * (len(sets) - 1) / 2
    shared = (counts * (counts - 1) // 2).sum().item()
    return shared / (pairs * sets[0].numel())


def summarize(rows: list[dict], key: str | None, rates) -> dict:
    """Entry-weighted means of every statistic, grouped by `key` (None: all tensors together)."""
    groups = defaultdict(list)
    for r in rows:
        groups["all" if key is None else r[key]].append(r)
    out = {}
    for group, members in sorted(groups.items()):
        n = sum(m["numel"] for m in members)
        out[group] = {stat: sum(m[stat] * m["numel"] for m in members) / n
                      for rate in rates for stat in (f"top{rate:g}_share", f"first_batch_top{rate:g}_share",
                                                     f"top{rate:g}_overlap")}
        out[group]["tensors"] = len(members)
    return out
