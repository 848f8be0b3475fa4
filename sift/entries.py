"""The seam between the sparse core and whatever holds a trained weight.

A trained tensor is k selected entries of a flat weight of `numel` entries, of which this rank holds
the contiguous slice [lo, hi) (one rank: 0, numel). Two holders implement `Entries`:

    sift.state.SparseState     the values live in the weight itself (bf16 / fp32 / fp16, or its
                               ZeRO-3 partition); SIFT's hook reduces the weight's dense gradient
    sift.qlinear.QSIFTLinear   the values live in a k-sized fp32 delta over a 4-bit base; the layer's
                               backward reduces the dense dW, SIFT trains the delta as a dense slot

Both keep their entries with sift.codec (2 B per entry + an int32 per 2^15-entry block, relative to
lo) and pick them with sift.selection. What is written once against this protocol: selection before
training (`select_before_training`) and the reduction of a dense gradient to the entries, which
selects on the first one (`sparse_grad`).
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .selection import choose, needs_grad


@runtime_checkable
class Entries(Protocol):
    k: int          # entries trained
    numel: int      # entries of the whole flat weight
    lo: int         # this rank's slice [lo, hi) of the flat weight
    hi: int
    selection: str  # the sift.selection rule that picks them

    def ready(self) -> bool:
        """Whether the entries are chosen."""

    def select(self, idx: torch.Tensor) -> None:
        """Fix the entries: sorted flat indices of the whole weight, inside [lo, hi)."""

    def indices(self) -> torch.Tensor | None:
        """The entries as sorted indices into the slice (flat indices when it is the whole weight),
        decoded on the device; None before they are chosen."""

    def flat_indices(self) -> torch.Tensor:
        """The entries as flat indices of the whole weight, int32 unless numel >= 2^31 (for files)."""

    def dense_weight(self) -> torch.Tensor:
        """The dense weight a rule may read (the weight, or deq(Q)); may be a transient. A rank holding
        a slice holds only the slice's storage: a rule over the whole weight needs it gathered."""


def select_before_training(entries: Entries, generator: torch.Generator | None) -> bool:
    """Apply the entries' rule now if it needs no gradient (random, magnitude, ...); returns whether
    it did. Called in model order with one generator, so every rank draws the same entries."""
    if needs_grad(entries.selection):
        return False
    entries.select(choose(entries.selection, entries.k, entries.numel, weight=entries.dense_weight,
                          generator=generator))
    return True


def sparse_grad(entries: Entries, dense: torch.Tensor, idx: torch.Tensor | None = None,
                device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, values): the dense gradient of the whole weight reduced to the entries, in its dtype,
    on `device` (default: the gradient's). The first call chooses the entries from this gradient
    (summed over ranks by sift.selection.agree). `idx`: the decoded indices, if the caller has them.
    This is the one place a dense weight gradient meets the entries: SIFT's hook and QSIFTLinear's
    backward both call it while the dense gradient exists."""
    if not entries.ready():
        entries.select(choose(entries.selection, entries.k, entries.numel, grad=dense))
    if idx is None:
        idx = entries.indices()
    flat = dense.reshape(-1)
    if (entries.lo, entries.hi) != (0, entries.numel):
        flat = flat[entries.lo:entries.hi]  # this rank's slice: a view
    values = flat.index_select(0, idx.to(flat.device))  # device-correct: ZeRO-3 offload's host gradient
    return idx, values if device is None else values.to(device)
