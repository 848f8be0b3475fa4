"""Which entries of a trained tensor are trained: a registry of rules, and the one place they are applied.

A rule is a function of one signature,

    rule(k, numel, *, grad, weight, generator) -> k distinct flat indices (int64, any order, any device)

    k          how many entries to pick, 0 < k <= numel
    numel      entries of the whole flat weight (every rank sees the same)
    grad       the first micro-batch's dense gradient of the whole weight, summed over ranks (only for
               rules registered with needs_grad=True; None otherwise)
    weight     a zero-argument callable returning the dense weight (for a 4-bit base: deq(Q)); called
               only by rules that read it, so the others never materialise a dequantized weight
    generator  the run's seeded torch.Generator (one stream over the tensors, in model order)

registered with `@register(name, needs_grad=...)`. A rule that needs the gradient is applied inside
the first backward, where each dense gradient exists for an instant (SIFT's hook, QSIFTLinear's
backward), and that same gradient trains too; the others are applied before training. SIFTConfig,
QSIFT's attach and the CLIs read the choices from RULES. `choose` is the only caller of the rules,
and `agree` the only place where ranks make their selections agree.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Rule:
    pick: Callable[..., torch.Tensor]
    needs_grad: bool  # applied to the first micro-batch's gradient, inside backward
    help: str


RULES: dict[str, Rule] = {}


def register(name: str, needs_grad: bool = False, help: str = ""):
    """Decorator: make `fn` (the signature above) the selection rule `name`."""
    def add(fn):
        RULES[name] = Rule(fn, needs_grad, help or (fn.__doc__ or "").strip().split("\n")[0])
        return fn
    return add


def rule(name: str) -> Rule:
    """The registered rule `name`; ValueError naming the choices if there is none."""
    if name not in RULES:
        raise ValueError(f"selection {name!r}: choose one of {', '.join(RULES)}")
    return RULES[name]


def needs_grad(name: str) -> bool:
    return rule(name).needs_grad


@register("grad", needs_grad=True)
def by_gradient(k, numel, *, grad, weight, generator):
    """the k largest |gradient| of the first micro-batch (the paper's rule)"""
    return torch.topk(grad.reshape(-1).abs(), k, sorted=False).indices  # one dense |grad| temporary, once


@register("random")
def at_random(k, numel, *, grad, weight, generator):
    """k distinct entries drawn with the seeded generator"""
    return torch.randperm(numel, generator=generator)[:k]


@register("magnitude")
def by_magnitude(k, numel, *, grad, weight, generator):
    """the k largest |weight|"""
    return torch.topk(weight().reshape(-1).abs(), k, sorted=False).indices


def agree(score: torch.Tensor) -> torch.Tensor:
    """`score` summed over ranks, so that every rank picks the same entries: a dense all-reduce of a
    copy, once per tensor (the first micro-batch); `score` itself on one rank."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return score
    total = score.clone()
    dist.all_reduce(total)
    return total


def choose(name: str, k: int, numel: int, *, grad: torch.Tensor | None = None,
           weight: Callable[[], torch.Tensor] | None = None, generator: torch.Generator | None = None,
           device=None) -> torch.Tensor:
    """Sorted flat int64 indices (on `device`, default: where the rule left them) of the `k` entries out
    of `numel` that rule `name` picks. Ties in a top-k go to whichever entries torch.topk returns; the
    set is then sorted, so the result does not depend on topk's output order."""
    picker = rule(name)
    if picker.needs_grad:
        if grad is None:
            raise ValueError(f"selection {name!r} needs the first micro-batch's gradient")
        grad = agree(grad)
    idx = picker.pick(k, numel, grad=grad, weight=weight, generator=generator)
    del grad  # the all-reduced copy dies before the sort
    return (idx if device is None else idx.to(device)).long().sort().values
