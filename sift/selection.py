"""Which entries of a target tensor SIFT trains: one function, fixed for the rest of the run."""
from __future__ import annotations

import torch

SELECTIONS = ("grad", "random", "magnitude")


def select(how: str, k: int, numel: int, *, score: torch.Tensor | None = None,
           generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Sorted flat int64 indices (on `device`) of the `k` entries to train out of `numel`.

    how="grad":      the k largest |score| where `score` is the first micro-batch's dense gradient
                     (the paper's rule; the same gradient also trains, nothing is wasted);
    how="magnitude": the k largest |score| where `score` is the weight itself;
    how="random":    k distinct entries drawn with `generator` (seeded: the same run picks the same set).
    Ties in |score| go to whichever entries torch.topk returns; the set is then sorted, so the result
    does not depend on topk's output order. Cost: one dense |score| temporary and a top-k, once.
    """
    if how == "random":
        idx = torch.randperm(numel, generator=generator)[:k].to(device)
    elif how in ("grad", "magnitude"):
        if score is None:
            raise ValueError(f"selection {how!r} needs a score tensor")
        idx = torch.topk(score.reshape(-1).abs(), k, sorted=False).indices.to(device)
    else:
        raise ValueError(f"selection {how!r}: choose one of {', '.join(SELECTIONS)}")
    return idx.sort().values
