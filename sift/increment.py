"""`sift_increment.safetensors`: the trained entries of a SIFT run, applied onto a base model.

Per sparse target `<name>.indices` (sorted flat indices; int32, int64 only for numel >= 2^31) and
`<name>.values` (fp32); per densely trained parameter only `<name>.values` (all entries, flat).
Applying casts the fp32 values to the weight's dtype exactly as training wrote them back, so
base + increment reproduces the fine-tuned weights bit for bit. safetensors only: no pickle.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from common.atomic import atomic_path
from .optimizer import shape

FORMAT, VERSION = "sift-increment", "1"
FILENAME = "sift_increment.safetensors"


class IncrementError(ValueError):
    """An increment file that does not fit its model (or is not an increment file)."""


def increment_tensors(opt) -> dict[str, torch.Tensor]:
    """{`<name>.indices`, `<name>.values`} from a SIFT optimizer, on the CPU."""
    out = {}
    indices = opt.selected_indices()
    for name, values in opt.trained_values().items():
        if name in indices:
            out[f"{name}.indices"] = indices[name].cpu().contiguous()
        out[f"{name}.values"] = values.detach().float().cpu().contiguous()
    return out


def save_increment(opt, path: str, base_model: str = "", extra: dict | None = None) -> None:
    """Write atomically (temp file + rename): an interrupted save never leaves a torn file."""
    cfg = opt.cfg
    shapes = {s.name: list(shape(s.param)) for s in opt.slots if s.ready()}
    meta = {"format": FORMAT, "version": VERSION, "base_model": base_model, "rate": str(cfg.rate),
            "targets": json.dumps(list(cfg.targets)), "dense": json.dumps(list(cfg.dense)),
            "selection": cfg.selection, "shapes": json.dumps(shapes), **(extra or {})}
    tensors = increment_tensors(opt)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)


def load_increment(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata); raises IncrementError for unreadable files or foreign formats."""
    if not os.path.isfile(path):
        raise IncrementError(f"{path}: no such increment file")
    try:
        tensors = load_file(path)
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise IncrementError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    if meta.get("format") != FORMAT:
        raise IncrementError(f"{path}: metadata format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise IncrementError(f"{path}: increment version {meta.get('version')!r}, this SIFT reads {VERSION!r}")
    return tensors, meta


def _check(path: str, name: str, param: torch.Tensor, indices, values, shapes: dict) -> None:
    where = f"{path}: tensor {name}"
    if name in shapes and list(shapes[name]) != list(param.shape):
        raise IncrementError(f"{where}: recorded shape {shapes[name]} but the model's is {list(param.shape)}")
    if values.dtype != torch.float32 or values.dim() != 1:
        raise IncrementError(f"{where}.values: expected a 1-D float32 tensor, got {values.dtype} {list(values.shape)}")
    if indices is None:
        if values.numel() != param.numel():
            raise IncrementError(f"{where}.values: {values.numel()} values for a dense tensor of {param.numel()}")
        return
    if indices.dtype not in (torch.int32, torch.int64) or indices.dim() != 1:
        raise IncrementError(f"{where}.indices: expected 1-D int32/int64, got {indices.dtype} {list(indices.shape)}")
    if indices.numel() != values.numel():
        raise IncrementError(f"{where}: {indices.numel()} indices but {values.numel()} values")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= param.numel()):
        raise IncrementError(f"{where}.indices: out of range [0, {param.numel()}) for shape {list(param.shape)}")
    if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
        raise IncrementError(f"{where}.indices: not strictly increasing (sorted, unique) as the format requires")


@torch.no_grad()
def apply_increment(model: nn.Module, increment) -> dict:
    """Write the increment's values into `model` in place; `increment` is a path or (tensors, meta).

    Everything is validated before the first weight changes, so a bad file leaves the model intact.
    Returns the metadata.
    """
    path, (tensors, meta) = (increment, load_increment(increment)) if isinstance(increment, (str, os.PathLike)) \
        else ("<in memory>", increment)
    params = dict(model.named_parameters())
    shapes = json.loads(meta.get("shapes", "{}"))
    names = sorted({k.rsplit(".", 1)[0] for k in tensors})
    plan = []
    for name in names:
        if name not in params:
            raise IncrementError(f"{path}: tensor {name} is not a parameter of {type(model).__name__}")
        if f"{name}.values" not in tensors:
            raise IncrementError(f"{path}: tensor {name} has indices but no values")
        indices, values = tensors.get(f"{name}.indices"), tensors[f"{name}.values"]
        _check(path, name, params[name], indices, values, shapes)
        plan.append((params[name], indices, values))
    for param, indices, values in plan:
        flat = param.data.view(-1)
        values = values.to(device=flat.device, dtype=flat.dtype)
        if indices is None:
            flat.copy_(values)
        else:
            flat.index_put_((indices.to(flat.device),), values)
    return meta
