"""`sift_increment.safetensors`: the trained entries of a SIFT run, applied onto a base model.

Format version 2 (docs/DESIGN.md, "The increment file"), per trained tensor `<name>`:
  `<name>.indices`        sorted flat indices (int32; int64 only for numel >= 2^31); absent for a
                          densely trained tensor (every entry, in order)
  `<name>.delta`          fp32, trained - base, chosen so that fl32(base + delta) cast to the weight
                          dtype IS the trained weight, bit for bit (bf16, fp16 and fp32 bases)
  `<name>.exact_indices`  optional, sorted flat indices (a subset of the trained entries) whose trained
  `<name>.exact_values`   value no fp32 delta reaches from its base (see `exact_deltas`); there the
                          fp32 trained value is written instead. Usually absent.
Metadata: format, version, base_model (hub id or EMBEDDED when known), base_fingerprint (checked
before applying), dtype, rate, targets, dense, selection, shapes, quantization (if the training base
was quantized). Version 1 files (`<name>.values`, absolute fp32 values) still load and apply.
safetensors only: no pickle.
"""
from __future__ import annotations

import json
import math
import os
import warnings

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from common.atomic import atomic_path
from common.fingerprint import fingerprint, sample_positions

FORMAT, VERSION, READS = "sift-increment", "2", ("1", "2")
FILENAME = "sift_increment.safetensors"
_NUDGES = 3    # nextafter steps tried before an entry is declared unreachable by any fp32 delta


class IncrementError(ValueError):
    """An increment file that does not fit its model (or is not an increment file)."""


# ------------------------------------------------------------------ exact deltas
def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern as integers: == on it tells -0.0 from +0.0 and is what "bit-exact" means."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def exact_deltas(trained: torch.Tensor, base: torch.Tensor,
                 delta_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 delta, unreachable mask) with `(base.float() + delta).to(base.dtype)` bitwise equal to
    `trained.to(base.dtype)` wherever the mask is False. `delta_dtype` other than fp32: the delta is
    representable in it (peft rounds its values to the weight dtype before adding them).

    delta = want - base is exact in fp32 when the two lie within ~15 binades of each other (bf16:
    8 + 8 significant bits) or, in fp32, when the difference fits 24 bits; otherwise a nextafter
    step or two usually lands it. It can be impossible: every base + delta then lies on a grid of
    ulp(base), too coarse for a trained value near zero (a bf16 weight passing from 1e-3 to 3.7e-9;
    an fp32 weight changing sign). Those entries are the mask; the file stores their values exactly.
    An unchanged entry gets -0.0, the one delta that leaves every base (-0.0 included) as it is.
    """
    want = trained.to(base.dtype)
    b = base.float()
    delta = torch.where(_bits(want) == _bits(base), torch.tensor(-0.0), want.float() - b).to(delta_dtype)
    for attempt in range(_NUDGES + 1):
        got = (b + delta.float()).to(base.dtype)
        off = _bits(got) != _bits(want)
        if attempt == _NUDGES or not bool(off.any()):
            break
        toward = torch.where(got.float() < want.float(), math.inf, -math.inf).to(delta_dtype)
        delta = torch.where(off, torch.nextafter(delta, toward), delta)
    return delta.float(), off


# ------------------------------------------------------------------ fingerprint
def fingerprint_at(tensors: dict[str, torch.Tensor], shapes: dict[str, list[int]], read) -> str:
    """The fingerprint (common.fingerprint: names, shapes, bf16-rounded values) of the base values at
    evenly spread trained entries of each tensor an increment's `tensors` name; `read(name, flat
    int64 positions)` gives the base's values there (a model's weights, its files, a 4-bit deq(Q))."""
    samples = {}
    for name in tensor_names(tensors):
        indices = tensors.get(f"{name}.indices")
        k = int(torch.Size(shapes[name]).numel()) if indices is None else indices.numel()
        pos = sample_positions(k)
        samples[name] = (list(shapes[name]), read(name, pos if indices is None else indices.index_select(0, pos).long()))
    return fingerprint(samples)


def model_fingerprint(model: nn.Module, tensors: dict[str, torch.Tensor]) -> str:
    """The fingerprint of `model` at the entries an increment's tensors name (before applying it)."""
    params = dict(model.named_parameters())
    return fingerprint_at(tensors, {n: list(params[n].shape) for n in tensor_names(tensors)},
                          lambda name, at: params[name].data.view(-1).index_select(0, at.to(params[name].device)))


def check_fingerprint(found: str, meta: dict, key: str, what: str, path: str, force: bool) -> None:
    """Refuse (IncrementError) a model whose fingerprint `found` is not the one the metadata records
    under `key` (`what`: the kind of base, for the message); with `force`, only warn."""
    recorded = meta.get(key)
    if not recorded or found == recorded:
        return
    message = (f"{path}: this model is not the {what} the increment was trained from ({key.replace('_', ' ')} "
               f"{found}, the file records {recorded}; trained on {meta.get('base_model') or 'an unnamed base'!r})")
    if not force:
        raise IncrementError(message + "; use force=True (--force) to apply anyway")
    warnings.warn(message + "; applying anyway (force)")


# ------------------------------------------------------------------ save
def increment_tensors(opt) -> tuple[dict[str, torch.Tensor], dict]:
    """({`<name>.indices`, `<name>.delta`, ...} on the CPU, {dtype, base_fingerprint}) from a SIFT
    optimizer: deltas are its trained values minus the base values it kept at selection."""
    indices, base = opt.selected_indices(), opt.base_values()
    out, samples, dtypes = {}, {}, set()
    shapes = {n: list(s) for n, s in opt.shapes().items()}
    for name, trained in opt.trained_values().items():
        trained = trained.detach().float().cpu()
        bad = int((~torch.isfinite(trained)).sum())
        if bad:
            raise IncrementError(f"{name}: {bad} of {trained.numel()} trained values are not finite (NaN/inf); "
                                 "refusing to write an increment that would break every model it is applied to")
        b = base[name].cpu()
        delta, unreachable = exact_deltas(trained, b)
        idx = indices[name].cpu().contiguous() if name in indices else None
        if idx is not None:
            out[f"{name}.indices"] = idx
        out[f"{name}.delta"] = delta.contiguous()
        if bool(unreachable.any()):
            flat = torch.arange(trained.numel()) if idx is None else idx
            out[f"{name}.exact_indices"] = flat[unreachable].contiguous()
            out[f"{name}.exact_values"] = trained[unreachable].contiguous()
        samples[name] = (shapes[name], b.index_select(0, sample_positions(b.numel())))
        dtypes.add(str(b.dtype).removeprefix("torch."))
    dtype = dtypes.pop() if len(dtypes) == 1 else "mixed"
    return out, {"dtype": dtype, "base_fingerprint": fingerprint(samples), "shapes": json.dumps(shapes)}


def write_increment(path: str, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """The one writer of increment files, SIFT's and QSIFT's (sift.quantize): format v2's header over
    `meta`, written atomically (temp file + fsync + rename): an interrupted save never leaves a torn
    file. The header's keys are sorted, so the same tensors and metadata give the same bytes."""
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={**meta, "format": FORMAT, "version": VERSION})
        _sort_header(tmp)


def _sort_header(path: str) -> None:
    """Rewrite a safetensors header in place with its keys sorted. safetensors serialises the
    metadata from a Rust HashMap, whose order changes from process to process; the sorted JSON has
    the same length (same entries, same compact separators and escapes), padded with the spaces the
    format allows, so only the header's bytes are rewritten, never the tensor data."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:
            raise IncrementError(f"{path}: the sorted header is longer than the written one; not rewritten")
        f.seek(8)
        f.write(text.ljust(size))


class Tables:
    """Whole tensors by name, read the way save_increment reads an optimizer: `cfg`, the selected
    indices (sparse tensors only), the trained and base values and the full shapes."""

    def __init__(self, cfg, indices: dict, values: dict, bases: dict, dims: dict):
        self.cfg, self.indices, self.values, self.bases, self.dims = cfg, indices, values, bases, dims

    def selected_indices(self):
        return self.indices

    def trained_values(self):
        return self.values

    def base_values(self):
        return self.bases

    def shapes(self):
        return self.dims


def save_increment(opt, path: str, base_model: str = "", quantization: str | None = None,
                   extra: dict | None = None) -> None:
    """Write `opt`'s increment (`write_increment`).

    `base_model` is the id a user loads the base by (the hub id, or EMBEDDED), not a resolved local
    path; `quantization` names the training base's quantization (e.g. "nf4") if any.
    """
    cfg = opt.cfg
    tensors, derived = increment_tensors(opt)
    meta = {"base_model": base_model or "", "rate": str(cfg.rate),
            "targets": json.dumps(list(cfg.targets)), "dense": json.dumps(list(cfg.dense)),
            "selection": cfg.selection, **derived, **(extra or {})}
    if quantization:
        meta["quantization"] = quantization
    write_increment(path, tensors, meta)


# ------------------------------------------------------------------ load / check / apply
def read_metadata(path: str) -> dict[str, str]:
    """An increment's metadata, read from the header alone (no tensor is loaded); raises
    IncrementError for unreadable files or foreign formats."""
    if not os.path.isfile(path):
        raise IncrementError(f"{path}: no such increment file")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise IncrementError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    if meta.get("format") != FORMAT:
        raise IncrementError(f"{path}: metadata format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version") not in READS:
        raise IncrementError(f"{path}: increment version {meta.get('version')!r}, this SIFT reads "
                             f"{' and '.join(READS)}")
    return meta


def load_increment(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata); raises IncrementError for unreadable files or foreign formats."""
    meta = read_metadata(path)
    try:
        return load_file(path), meta
    except (SafetensorError, OSError, ValueError) as e:
        raise IncrementError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e


def tensor_names(tensors: dict) -> list[str]:
    """The parameter names an increment's tensors belong to."""
    return sorted({k.rsplit(".", 1)[0] for k in tensors})


def _check_indices(where: str, indices: torch.Tensor, numel: int, shape: list[int]) -> None:
    if indices.dtype not in (torch.int32, torch.int64) or indices.dim() != 1:
        raise IncrementError(f"{where}: expected 1-D int32/int64, got {indices.dtype} {list(indices.shape)}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= numel):
        raise IncrementError(f"{where}: out of range [0, {numel}) for shape {shape}")
    if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
        raise IncrementError(f"{where}: not strictly increasing (sorted, unique) as the format requires")


def _check_values(where: str, values: torch.Tensor, count: int, what: str) -> None:
    if values.dtype != torch.float32 or values.dim() != 1:
        raise IncrementError(f"{where}: expected a 1-D float32 tensor, got {values.dtype} {list(values.shape)}")
    if values.numel() != count:
        raise IncrementError(f"{where}: {values.numel()} values for {count} {what}")
    bad = int((~torch.isfinite(values)).sum())
    if bad:
        raise IncrementError(f"{where}: {bad} non-finite (NaN/inf) values; the file is broken, nothing applied")


def _check(path: str, name: str, param: torch.Tensor, tensors: dict, shapes: dict, version: str) -> None:
    where, shape, numel = f"{path}: tensor {name}", list(param.shape), param.numel()
    if name in shapes and list(shapes[name]) != shape:
        raise IncrementError(f"{where}: recorded shape {shapes[name]} but the model's is {shape}")
    indices = tensors.get(f"{name}.indices")
    if indices is not None:
        _check_indices(f"{where}.indices", indices, numel, shape)
    count, what = (numel, "entries of a dense tensor") if indices is None else (indices.numel(), "indices")
    key = "values" if version == "1" else "delta"
    if f"{name}.{key}" not in tensors:
        raise IncrementError(f"{where}: no {name}.{key} (a version {version} file stores one per tensor)")
    _check_values(f"{where}.{key}", tensors[f"{name}.{key}"], count, what)
    exact = tensors.get(f"{name}.exact_indices")
    if (exact is None) != (f"{name}.exact_values" not in tensors):
        raise IncrementError(f"{where}: exact_indices and exact_values come together")
    if exact is not None:
        _check_indices(f"{where}.exact_indices", exact, numel, shape)
        if indices is not None and not bool(torch.isin(exact, indices).all()):
            raise IncrementError(f"{where}.exact_indices: not a subset of its trained entries")
        _check_values(f"{where}.exact_values", tensors[f"{name}.exact_values"], exact.numel(), "exact_indices")


def check_base(model: nn.Module, tensors: dict, meta: dict, path: str = "<in memory>", force: bool = False) -> None:
    """Raise IncrementError unless the increment fits `model`: names, shapes, indices, finite values,
    and (version 2) the base fingerprint; with `force`, a fingerprint mismatch only warns."""
    version = meta.get("version", VERSION)
    params = dict(model.named_parameters())
    shapes = json.loads(meta.get("shapes", "{}"))
    for name in tensor_names(tensors):
        if name not in params:
            raise IncrementError(f"{path}: tensor {name} is not a parameter of {type(model).__name__}")
        _check(path, name, params[name], tensors, shapes, version)
    if meta.get("base_fingerprint"):
        check_fingerprint(model_fingerprint(model, tensors), meta, "base_fingerprint", "base", path, force)


def read(increment) -> tuple[str, dict, dict]:
    """(path for messages, tensors, metadata) from a path, a (tensors, meta) pair as load_increment
    returns it, or (path, tensors, meta)."""
    if isinstance(increment, (str, os.PathLike)):
        return (str(increment), *load_increment(str(increment)))
    return tuple(increment) if len(increment) == 3 else ("<in memory>", *increment)


@torch.no_grad()
def apply_increment(model: nn.Module, increment, force: bool = False, scale: float = 1.0) -> dict:
    """Apply the increment onto `model` (its base) in place; `increment` is a path or `read`'s tuples.
    Returns the metadata.

    Everything is validated (`check_base`) before the first weight changes, so a bad file leaves the
    model intact; `force=True` applies onto a model whose fingerprint differs (another copy of the
    base: 4-bit, or rounded another way). `scale` multiplies the deltas (version 2 only); the exact
    entries are then skipped, being values. Cost: one gather / add / scatter of the trained entries
    per tensor, no dense temporary.
    """
    path, tensors, meta = read(increment)
    version = meta.get("version", VERSION)
    if version == "1" and scale != 1.0:
        raise IncrementError(f"{path}: a version 1 file holds absolute values; it cannot be scaled")
    check_base(model, tensors, meta, path, force)
    params = dict(model.named_parameters())
    for name in tensor_names(tensors):
        flat = params[name].data.view(-1)
        new = applied_values(tensors, meta, name, flat, scale)
        indices = tensors.get(f"{name}.indices")
        if indices is None:
            flat.copy_(new)
        else:
            flat.index_put_((indices.to(flat.device),), new)
    return meta


def applied_values(tensors: dict, meta: dict, name: str, flat: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """What applying writes at `name`'s trained entries (in order, flat's dtype), `flat` being the
    base weight as a flat view: fl32(base + scale * delta), and the exact values where recorded."""
    indices = tensors.get(f"{name}.indices")
    indices = None if indices is None else indices.to(flat.device)
    if meta.get("version", VERSION) == "1":
        return tensors[f"{name}.values"].to(flat.device, flat.dtype)
    base = flat if indices is None else flat.index_select(0, indices)
    delta = tensors[f"{name}.delta"].to(flat.device)
    new = (base.float() + (delta if scale == 1.0 else delta * scale)).to(flat.dtype)
    exact = tensors.get(f"{name}.exact_indices")
    if exact is not None and scale == 1.0:
        exact = exact.to(flat.device)
        at = exact if indices is None else torch.searchsorted(indices, exact)
        new[at.long()] = tensors[f"{name}.exact_values"].to(flat.device, flat.dtype)
    return new
