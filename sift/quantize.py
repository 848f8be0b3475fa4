"""QSIFT: SIFT on a 4-bit base. The target linears become `QSIFTLinear` (sift/qlinear.py).

    from sift import SIFT, SIFTConfig
    from sift.quantize import quantize, attach
    quantize(model, quant_type="nf4", double_quant=True)      # or load_quantized(path, ...)
    attach(model, rate=0.05, selection="grad", seed=0)         # k-sized fp32 deltas, zero
    opt = SIFT(model, SIFTConfig(rate=0.05))                   # trains each delta as a dense fp32 slot

SIFT needs nothing new for this: a delta is an ordinary fp32 parameter, so the 8-bit AdamW,
clipping, accumulation, step-in-backward, non-finite skip and resume apply unchanged. What SIFT
does not know, the indices, lives in the modules and travels in the increment (`increment_tensors`),
which every checkpoint carries. Weight decay pulls delta towards 0, i.e. the effective weight
towards the quantized base (as decay acts on a LoRA adapter), not towards zero.
"""
from __future__ import annotations

import json

import torch
import torch.nn as nn

from .increment import VERSION, IncrementError, check_fingerprint, fingerprint_at, model_fingerprint
from .qlinear import BLOCKSIZE, QUANT_TYPES, QSIFTLinear
from .targets import matches_module

__all__ = ["QSIFTLinear", "QUANT_TYPES", "BLOCKSIZE", "quantize", "load_quantized", "attach", "layers",
           "is_quantized", "quantization_info", "increment_tensors", "restore", "apply_onto_full",
           "save_increment", "load_increment", "apply_increment", "is_quantized_increment", "to_linear4bit",
           "quantize_base", "base_tensors", "memory_report", "quantized_fingerprint"]


def _targeted(model: nn.Module, targets) -> list[tuple[nn.Module, str, str, nn.Module]]:
    """(parent, child attribute, dotted name, module) of every module whose weight a target names."""
    out = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if any(matches_module(f"{full}.weight", t) for t in targets):
                out.append((module, child_name, full, child))
    return out


def quantize(model: nn.Module, quant_type: str = "nf4", double_quant: bool = True, targets=None,
             device=None) -> nn.Module:
    """Replace each target `nn.Linear` (or bitsandbytes `Linear4bit`) by a `QSIFTLinear`, in place.

    Each weight is quantized on `device` (default: where it lies) one layer at a time, so a model
    kept on the host reaches the GPU as 4-bit without a full-precision copy there; the caller moves
    the rest of the model afterwards. Runs on meta tensors too (the memory planner).
    """
    from .config import LLAMA_LINEARS

    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type {quant_type!r}: choose one of {', '.join(QUANT_TYPES)}")
    import bitsandbytes as bnb

    found = _targeted(model, LLAMA_LINEARS if targets is None else targets)
    if not found:
        raise ValueError(f"quantize: targets {targets} match no module of {type(model).__name__}")
    for parent, attr, name, child in found:
        if isinstance(child, bnb.nn.Linear4bit):
            new = QSIFTLinear.from_linear4bit(child)
        elif isinstance(child, nn.Linear):
            new = QSIFTLinear.from_linear(child, quant_type, double_quant, device)
        elif isinstance(child, QSIFTLinear):
            continue
        else:
            raise ValueError(f"quantize: {name} is a {type(child).__name__}, not a Linear")
        setattr(parent, attr, new)
        del child  # its full-precision weight is freed here, before the next layer is quantized
    return model


def load_quantized(path: str, quant_type: str = "nf4", double_quant: bool = True, dtype=torch.bfloat16,
                   device: str = "cpu", targets=None, attn_implementation: str = "sdpa", to_qsift: bool = True):
    """Load an HF causal LM straight into 4 bits with transformers' BitsAndBytesConfig (weights are
    quantized as they are loaded onto `device`, one tensor at a time; works on CPU with
    bitsandbytes 0.50.2). Every Linear but lm_head becomes a bitsandbytes `Linear4bit`; with
    `to_qsift` the target ones then become `QSIFTLinear` (the rest stay frozen `Linear4bit`)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=config,
                                                 device_map=device, attn_implementation=attn_implementation)
    import bitsandbytes as bnb

    for layer in model.modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            # bitsandbytes' CPU inference repacking (eval mode on AVX512-BF16 hosts) rewrites the
            # weight in place and fails for in_features < 64 blocks; the plain kernel is exact.
            layer.support_avx512bf16_for_cpu = False
    if to_qsift:
        quantize(model, quant_type, double_quant, targets)
    return model


def layers(model: nn.Module) -> dict[str, QSIFTLinear]:
    """{weight name (as in the full-precision model, `...q_proj.weight`): layer}."""
    return {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, QSIFTLinear)}


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QSIFTLinear) for m in model.modules())


def attach(model: nn.Module, rate: float, selection: str = "grad", seed: int = 0) -> None:
    """Give every QSIFTLinear its zero delta (k = ceil(rate x numel)) and its selection rule (a name
    in sift.selection.RULES): rules that need no gradient (random, magnitude) choose the indices now,
    in model order with one seeded generator (every rank picks the same); grad in the first backward."""
    generator = torch.Generator().manual_seed(seed)
    for layer in layers(model).values():
        layer.attach(rate, selection, generator)


def quantization_info(model: nn.Module) -> dict:
    """What the increment's metadata says about the training base."""
    found = list(layers(model).values())
    if not found:
        return {}
    first = found[0]
    return {"type": first.quant_type, "block_size": BLOCKSIZE, "double_quant": first.double_quant,
            "dtype": str(first.quant_state.dtype).removeprefix("torch.")}


def increment_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The increment format v2 layout of the quantized layers: `<weight name>.indices` (sorted;
    int32 unless numel >= 2^31) and `<weight name>.delta` (fp32, trained - base: here delta itself,
    the base being deq(Q)), on the CPU. Unselected layers (no step yet) are left out."""
    out = {}
    for name, layer in layers(model).items():
        if layer.ready():
            out[f"{name}.indices"] = layer.flat_indices().cpu().contiguous()  # the format's flat int32 form
            out[f"{name}.delta"] = layer.delta.detach().float().cpu().contiguous()
    return out


QUANTIZED_KEY = "quantized_base_fingerprint"  # metadata: the fingerprint of deq(Q) at the trained entries


class QuantizedIncrementError(IncrementError):
    """A quantized increment that does not fit the model it is applied onto (an IncrementError, so
    the CLIs' existing handling catches it)."""


def _plan(model_params: dict, tensors: dict, source: str, shapes: dict) -> list:
    names = sorted({k.rsplit(".", 1)[0] for k in tensors})
    plan = []
    for name in names:
        if name not in model_params:
            raise QuantizedIncrementError(f"{source}: tensor {name} is not a weight of this model")
        idx, delta = tensors.get(f"{name}.indices"), tensors.get(f"{name}.delta")
        shape = tuple(model_params[name])
        n = shape[0] * shape[1] if len(shape) == 2 else torch.Size(shape).numel()
        where = f"{source}: tensor {name}"
        if idx is None or delta is None:
            raise QuantizedIncrementError(f"{where}: needs both .indices and .delta")
        if name in shapes and tuple(shapes[name]) != shape:
            raise QuantizedIncrementError(f"{where}: recorded shape {list(shapes[name])}, this model's is {list(shape)}")
        if delta.dtype != torch.float32 or delta.dim() != 1 or idx.dim() != 1 or idx.numel() != delta.numel():
            raise QuantizedIncrementError(f"{where}: expected 1-D int indices and as many fp32 deltas, got "
                                          f"{idx.dtype} {list(idx.shape)} and {delta.dtype} {list(delta.shape)}")
        if idx.dtype not in (torch.int32, torch.int64):
            raise QuantizedIncrementError(f"{where}.indices: expected int32/int64, got {idx.dtype}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise QuantizedIncrementError(f"{where}.indices: out of range [0, {n}) for shape {list(shape)}")
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise QuantizedIncrementError(f"{where}.indices: not strictly increasing (sorted, unique)")
        plan.append((name, idx, delta))
    return plan


def quantized_fingerprint(model: nn.Module, tensors: dict) -> str:
    """The fingerprint of the 4-bit base deq(Q) at the entries `tensors` name (one layer's dense
    weight at a time, transient): the training base exactly, so the quantization recipe too."""
    found = layers(model)
    return fingerprint_at(tensors, {n: list(layer.shape) for n, layer in found.items()},
                          lambda name, at: found[name].dense_weight().view(-1).index_select(0, at.to(
                              found[name].weight_4bit.device)))


@torch.no_grad()
def restore(model: nn.Module, tensors: dict, meta: dict | None = None, source: str = "<in memory>",
            force: bool = False) -> None:
    """Onto a quantized model: set each layer's indices and delta, reproducing the training-time
    effective weights exactly. Refuses a file whose quantization differs from the model's, or whose
    recorded 4-bit base (`quantized_base_fingerprint`) is not this model's (`force`: warns), and
    validates everything before the first layer changes."""
    found = layers(model)
    if not found:
        raise QuantizedIncrementError(f"{source}: the model has no quantized layers (quantize it first)")
    saved = json.loads((meta or {}).get("quantization") or "{}")
    mine = quantization_info(model)
    diff = [f"{k} {saved[k]!r} (model: {mine[k]!r})" for k in ("type", "block_size", "double_quant")
            if k in saved and saved[k] != mine[k]]
    if diff:
        raise QuantizedIncrementError(f"{source}: trained on another quantized base: " + ", ".join(diff))
    shapes = json.loads((meta or {}).get("shapes") or "{}")
    plan = _plan({n: tuple(layer.shape) for n, layer in found.items()}, tensors, source, shapes)
    if (meta or {}).get(QUANTIZED_KEY):
        check_fingerprint(quantized_fingerprint(model, tensors), meta, QUANTIZED_KEY, "4-bit base", source, force)
    for name, idx, delta in plan:
        layer = found[name]
        if layer.delta is None or layer.k != idx.numel():
            layer.k = idx.numel()
            layer.delta = nn.Parameter(torch.zeros(layer.k, device=layer.weight_4bit.device),
                                       requires_grad=layer.delta is not None and layer.delta.requires_grad)
        layer.select(idx)  # validated above: sorted, unique, in range
        layer.delta.copy_(delta.to(layer.delta.device))


@torch.no_grad()
def apply_onto_full(model: nn.Module, tensors: dict, meta: dict | None = None, source: str = "<in memory>",
                    scale: float = 1.0, force: bool = False) -> None:
    """Onto a full-precision model: W[idx] = (W[idx] + scale x delta), rounded once to W's dtype
    (merged/ is this, in the base's dtype). A recorded `base_fingerprint` must be this model's
    (`force`: warns)."""
    params = dict(model.named_parameters())
    shapes = json.loads((meta or {}).get("shapes") or "{}")
    plan = _plan({n: tuple(p.shape) for n, p in params.items()}, tensors, source, shapes)
    if (meta or {}).get("base_fingerprint"):
        check_fingerprint(model_fingerprint(model, tensors), meta, "base_fingerprint", "base", source, force)
    for name, idx, delta in plan:
        flat = params[name].data.view(-1)
        idx = idx.to(flat.device)
        flat.index_put_((idx,), (flat.index_select(0, idx).float() + scale * delta.to(flat.device)).to(flat.dtype))


# ---------------------------------------------------------------- the increment file
def save_increment(model: nn.Module, path: str, base_model: str = "", rate: float | None = None,
                   selection: str = "", extra: dict | None = None, base_values=None) -> None:
    """Write the quantized layers' increment through sift.increment's one writer (format v2, crash-safe),
    with `quantization` (type, block size, double quantization, dtype) in the metadata and two
    fingerprints of the base at the trained entries: `quantized_base_fingerprint` of deq(Q) (what
    `restore` checks) and, given `base_values(name, flat positions)` reading the full-precision base
    the run loaded (its weights files), `base_fingerprint` (what applying onto that base checks, as
    for a SIFT increment)."""
    from . import increment

    found, tensors = layers(model), increment_tensors(model)
    shapes = {name: list(layer.shape) for name, layer in found.items()}
    dtype = str(next(iter(found.values())).quant_state.dtype).removeprefix("torch.") if found else ""
    meta = {"base_model": base_model, "rate": "" if rate is None else str(rate), "selection": selection,
            "dtype": dtype, "shapes": json.dumps(shapes), "quantization": json.dumps(quantization_info(model)),
            QUANTIZED_KEY: quantized_fingerprint(model, tensors), **(extra or {})}
    if base_values is not None:
        meta["base_fingerprint"] = fingerprint_at(tensors, shapes, base_values)
    increment.write_increment(path, tensors, meta)


def load_increment(path: str) -> tuple[dict, dict]:
    """(tensors, metadata) of a quantized-base increment; QuantizedIncrementError names the file."""
    from . import increment

    try:
        tensors, meta = increment.load_increment(path)  # the one reader: missing, torn, foreign files
    except IncrementError as e:
        raise QuantizedIncrementError(str(e)) from None
    if meta.get("version") != VERSION:
        raise QuantizedIncrementError(f"{path}: increment version {meta.get('version')!r}, a quantized-base "
                                      f"increment is version {VERSION!r}")
    if not meta.get("quantization") or meta["quantization"] == "{}":
        raise QuantizedIncrementError(f"{path}: not trained on a quantized base (no 'quantization' metadata)")
    return tensors, meta


def apply_increment(model: nn.Module, path: str, scale: float = 1.0, force: bool = False) -> dict:
    """Apply a quantized-base increment file: onto a quantized model (the training-time effective
    weights, exactly) or onto the full-precision base (base + delta), each base checked against the
    fingerprint the file records for it (`force`: warn and apply). Returns the metadata."""
    tensors, meta = load_increment(path)
    if is_quantized(model):
        if scale != 1.0:
            raise QuantizedIncrementError(f"{path}: scaling onto a quantized base is not supported")
        restore(model, tensors, meta, path, force)
    else:
        apply_onto_full(model, tensors, meta, path, scale, force)
    return meta


def is_quantized_increment(path: str) -> bool:
    """Whether `path` is a QSIFT increment (metadata `quantization` set), without loading tensors."""
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except Exception:  # unreadable files are the regular loader's to report
        return False
    return bool(meta.get("quantization")) and meta["quantization"] != "{}"


# ---------------------------------------------------------------- QLoRA's base, memory accounting
def to_linear4bit(model: nn.Module, quant_type: str = "nf4", double_quant: bool = True, targets=None) -> nn.Module:
    """Replace each target nn.Linear by a frozen bitsandbytes `Linear4bit` holding the same 4-bit
    weight (what BitsAndBytesConfig loads; PEFT's LoRA wraps it: QLoRA). Runs on meta tensors."""
    import bitsandbytes as bnb
    from bitsandbytes import functional as bnbf

    from .config import LLAMA_LINEARS

    for parent, attr, _, child in _targeted(model, LLAMA_LINEARS if targets is None else targets):
        if not isinstance(child, nn.Linear):
            continue
        w = child.weight.detach()
        packed, state = bnbf.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=double_quant,
                                           quant_type=quant_type)
        new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                compute_dtype=w.dtype, compress_statistics=double_quant, quant_type=quant_type,
                                device="meta")
        new.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=BLOCKSIZE,
                                       compress_statistics=double_quant, quant_type=quant_type,
                                       bnb_quantized=True, module=new)
        if child.bias is not None:
            new.bias = nn.Parameter(child.bias.detach(), requires_grad=False)
        new.support_avx512bf16_for_cpu = False  # see load_quantized
        setattr(parent, attr, new)
    return model


def quantize_base(model: nn.Module, kind: str, quant_type: str, double_quant: bool = True, rate=None,
                  selection: str = "grad", seed: int = 0) -> nn.Module:
    """The benchmarks' 4-bit base: QSIFTLinear with deltas (kind "sift") or Linear4bit ("lora")."""
    if kind == "sift":
        quantize(model, quant_type, double_quant)
        attach(model, rate, selection, seed)
    else:
        to_linear4bit(model, quant_type, double_quant)
    return model


def base_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every tensor of the 4-bit bases (packed weights, absmax, nested absmax and code tables),
    for memory counts: they are buffers or quantization-state attributes, not parameters."""
    import bitsandbytes as bnb

    out = []
    for m in model.modules():
        if isinstance(m, QSIFTLinear):
            packed, st = m.weight_4bit, m.quant_state
        elif isinstance(m, bnb.nn.Linear4bit) and getattr(m.weight, "quant_state", None) is not None:
            packed, st = m.weight, m.weight.quant_state
        else:
            continue
        out += [packed, st.absmax, st.code]
        if st.nested:
            out += [st.offset, st.state2.absmax, st.state2.code]
    return out


def memory_report(model: nn.Module) -> dict:
    """Bytes of the 4-bit bases and of QSIFT's per-entry state kept in the modules (Δ, indices);
    SIFT's own memory_report() adds the moments (Δ is its fp32 'weight', so no master)."""
    found = list(layers(model).values())
    entries = sum(layer.k for layer in found)
    delta = sum(layer.delta.nbytes for layer in found if layer.delta is not None)
    indices = sum(t.nbytes for layer in found for t in layer.index_tensors())
    base = sum(t.nbytes for t in base_tensors(model))
    return {"entries": entries, "base_4bit": base, "delta": delta, "indices": indices,
            "delta_and_index_bytes_per_entry": (delta + indices) / max(entries, 1)}
