"""Which parameters SIFT trains: exact module-name matching, never silent substring surprises."""
from __future__ import annotations

import torch
import torch.nn as nn


def matches_module(param_name: str, target: str) -> bool:
    """`target` ("q_proj" or a dotted run like "self_attn.q_proj") equals consecutive components of
    the parameter's module path: `q_proj` matches `model.layers.0.self_attn.q_proj.weight` but not
    `model.my_q_proj_extra.weight`."""
    module_path = param_name.split(".")[:-1]
    wanted = target.split(".")
    n = len(wanted)
    return any(module_path[i:i + n] == wanted for i in range(len(module_path) - n + 1))


def find_trainable(model: nn.Module, targets, dense) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(sparse targets, dense params) in `named_parameters` order; raises listing every problem."""
    named = list(model.named_parameters())
    # A target module that already is sparse (QSIFTLinear's k-sized delta) is trained densely.
    own_dense = increment_params(model)
    targeted = [(n, p) for n, p in named if any(matches_module(n, t) for t in targets)]
    sparse = [(n, p) for n, p in targeted if n not in own_dense]
    own_dense &= {n for n, _ in targeted}
    dense_ = [(n, p) for n, p in named if any(d in n for d in dense) or n in own_dense]
    problems = []
    for t in targets:
        if not any(matches_module(n, t) for n, _ in named):
            problems.append(f"target {t!r} matches no module of {type(model).__name__}")
    for d in dense:
        if not any(d in n for n, _ in named):
            problems.append(f"dense {d!r} is a substring of no parameter name")
    both = {n for n, _ in sparse} & {n for n, _ in dense_}
    if both:
        problems.append(f"parameters matched by both targets and dense: {sorted(both)[:3]}...")
    if problems:
        examples = sorted({n.split(".")[-2] for n, _ in named if "." in n})[:12]
        raise ValueError("SIFT target selection failed:\n  - " + "\n  - ".join(problems)
                         + f"\n  module names available include: {', '.join(examples)}")
    return sparse, dense_


def _declared(model: nn.Module, attr: str) -> dict:
    """{full parameter name: value} over the modules' `attr` ({parameter: value} or names)."""
    out = {}
    for mn, mod in model.named_modules():
        items = getattr(mod, attr, {})
        for pn, value in (items.items() if isinstance(items, dict) else ((p, True) for p in items)):
            out[f"{mn}.{pn}" if mn else pn] = value
    return out


def increment_holders(model: nn.Module) -> dict[str, nn.Module]:
    """{parameter name: the module declaring it} for the parameters that modules declare to be
    increments themselves (`sift_dense_params`: QSIFTLinear's delta): trained densely, their base is 0
    by definition, and the module holds the entries they are the values of (sift.entries)."""
    return {f"{mn}.{pn}" if mn else pn: mod for mn, mod in model.named_modules()
            for pn in getattr(mod, "sift_dense_params", ())}


def increment_params(model: nn.Module) -> set[str]:
    """Names of the parameters of `increment_holders`."""
    return set(increment_holders(model))


def exact_grad_dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    """{parameter name: a dtype narrower than the parameter's that holds its gradient exactly}, as
    modules declare it (`sift_grad_dtypes`: QSIFTLinear's fp32 delta gets the bf16 weight gradient
    gathered at its indices). SIFT keeps such a deferred gradient in that dtype until a second
    micro-batch accumulates onto it."""
    return _declared(model, "sift_grad_dtypes")
