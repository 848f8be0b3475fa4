"""`python -m sift.export`: a SIFT increment as a merged HF model directory or a PEFT adapter.

    python -m sift.export merged --increment RUN/sift_increment.safetensors --output_dir RUN/merged-bf16 \\
        [--model BASE] [--dtype auto|float32|bfloat16|float16] [--max_shard_size 5GB] [--force] [--overwrite]
    python -m sift.export peft --increment RUN/sift_increment.safetensors --output_dir RUN/peft [--model BASE]

`--model` defaults to the base the increment records. merged: the base, loaded in the dtype it was
trained in, plus the increment (bit-exact), cast to `--dtype`, saved with save_pretrained (sharded
safetensors, tokenizer, 0644 files) through one rename of a complete directory. peft: a peft
Super-Tuning adapter (`SupertuningConfig`: flat int32 indices + fp32 values scatter-added onto the
weight); `PeftModel.from_pretrained(base, dir)` loads it, `merge_and_unload()` merges it.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from fractions import Fraction
from pathlib import Path

PROG = "python -m sift.export"
DTYPES = ("auto", "float32", "bfloat16", "float16")


class ExportError(ValueError):
    """A usage problem: one line for the user, exit status 2."""


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True, metavar="{merged,peft}")
    for kind, help_ in (("merged", "base + increment as an HF model directory"),
                        ("peft", "the increment as a PEFT (Super-Tuning) adapter directory")):
        p = sub.add_parser(kind, help=help_)
        p.add_argument("--increment", required=True, help="a sift_increment.safetensors (format 1 or 2)")
        p.add_argument("--output_dir", required=True, help="the directory to write (refused if it holds files, "
                       "unless --overwrite)")
        p.add_argument("--model", default=None, help="the base model (HF directory, hub id, or "
                       "embedded:smollm2-135m-instruct); default: the one the increment records")
        p.add_argument("--force", action="store_true", help="apply even if the base fingerprint differs")
        p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
        p.add_argument("--dtype", default="auto", choices=DTYPES, help=(
            "dtype of the saved weights" if kind == "merged" else
            "dtype of the base the adapter is for (peft rounds its values to it)") + "; auto = the training dtype")
        if kind == "merged":
            p.add_argument("--max_shard_size", default="5GB", help="save_pretrained's shard size, e.g. 2GB")
    return parser.parse_args(argv)


def check_paths(args) -> None:
    """Refuse, before anything loads, what would fail late or destroy files."""
    inc, out = Path(args.increment).resolve(), Path(args.output_dir).resolve()
    if not inc.is_file():
        raise ExportError(f"--increment {args.increment}: no such file")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--output_dir {args.output_dir}: exists and is not a directory")
    for what, path in (("--increment", inc), ("--model", Path(args.model).resolve() if args.model else None)):
        if path is not None and (path == out or out in path.parents):
            raise ExportError(f"--output_dir {args.output_dir}: holds {what} {path}; writing there would replace "
                              "it: choose another directory")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise ExportError(f"--output_dir {args.output_dir}: not empty; pass --overwrite to replace it")


def load_base(model: str | None, meta: dict, dtype):
    """(model, tokenizer, the id used) on the CPU: `model`, else the base the increment records."""
    from common.modeling import load_model_and_tokenizer

    name = model or meta.get("base_model")
    if not name:
        raise ExportError("the increment does not record its base model: pass --model")
    if not model and os.path.isabs(name) and not os.path.isdir(name):
        raise ExportError(f"the increment's base model {name} is not on this machine: pass --model")
    try:
        net, tokenizer = load_model_and_tokenizer(name, dtype=dtype, device="cpu")
    except OSError as e:  # transformers: missing directory, unknown or unreachable hub id
        raise ExportError(f"cannot load the base model {name!r} (pass --model to use another copy): "
                          f"{str(e).splitlines()[0]}") from e
    return net, tokenizer, name


def _train_dtype(meta: dict):
    import torch

    return getattr(torch, meta.get("dtype", "float32")) if meta.get("dtype") in DTYPES[1:] else torch.float32


def export_merged(increment: str, output_dir: str, model: str | None = None, dtype: str = "auto",
                  max_shard_size: str = "5GB", force: bool = False) -> str:
    """Base + increment saved as an HF directory (crash-safe: a complete temp dir, renamed)."""
    import torch

    from common.atomic import atomic_dir
    from .increment import apply_increment, load_increment

    tensors, meta = load_increment(increment)
    net, tokenizer, _ = load_base(model, meta, _train_dtype(meta))  # the dtype training saw: exact
    apply_increment(net, (increment, tensors, meta), force=force)
    if dtype != "auto":
        net = net.to(getattr(torch, dtype))
    with atomic_dir(output_dir) as tmp:
        net.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
    return output_dir


def peft_sparsity(counts: dict[int, int]) -> float:
    """The one `sparsity` for which peft's count int(numel * (1 - sparsity)) is >= our k for every
    (numel, k), as small a surplus as floats allow.

    No single value gives k = ceil(rate * numel) exactly in general: with rate 0.05, numel 1024 needs
    1 - s >= 52/1024 and numel 2048 needs 1 - s < 104/2048, the same number. So peft gets at least k
    entries per layer and the surplus are padding entries with delta -0.0 (adds nothing, exactly).
    """
    from peft.tuners.supertuning.layer import SupertuningLayer

    def count(n: int, s: float) -> int:  # peft's own rule, not a copy of it
        return SupertuningLayer._num_trainable(None, n, s)

    need = max(Fraction(k, n) for n, k in counts.items())
    s = max(0.0, float(1 - need))
    while s > 0.0 and any(count(n, s) < k for n, k in counts.items()):
        s = math.nextafter(s, 0.0)  # float rounding of 1 - need: a step or two
    return s


def _padded(indices, delta, count: int):
    """indices/delta grown to `count` entries: the first unselected positions, delta -0.0, appended
    (peft needs unique indices, not sorted ones). O(extra) unless the first entries are all taken."""
    import torch

    extra = count - indices.numel()
    if extra == 0:
        return indices, delta
    window = extra
    while window - int(torch.searchsorted(indices, window)) < extra:  # free positions below `window`
        window *= 2
    candidates = torch.arange(window, dtype=indices.dtype)
    pad = candidates[~torch.isin(candidates, indices[:int(torch.searchsorted(indices, window))])][:extra]
    return torch.cat([indices, pad]), torch.cat([delta, torch.full((extra,), -0.0)])


def export_peft(increment: str, output_dir: str, model: str | None = None, dtype: str = "auto",
                force: bool = False) -> dict:
    """The increment as a Super-Tuning adapter for a base in `dtype` (peft rounds its fp32 values to
    the weight dtype before adding them, so the deltas are chosen for that dtype; auto = the dtype
    trained in). Returns {sparsity, entries, padding, inexact}: `inexact` entries are those no delta
    in peft's arithmetic reaches (see increment.exact_deltas); peft adds the nearest there."""
    import torch
    from peft import SupertuningConfig, get_peft_model

    from common.atomic import atomic_dir
    from .increment import apply_increment, applied_values, check_base, exact_deltas, load_increment, tensor_names

    tensors, meta = load_increment(increment)
    if not any(k.endswith(".indices") for k in tensors):  # peft would fall back to its default targets, whole
        raise ExportError(f"{increment}: no sparsely trained tensor, nothing for Super-Tuning; export merged instead")
    net, _, name = load_base(model, meta, _train_dtype(meta))
    check_base(net, tensors, meta, increment, force)
    target = _train_dtype(meta) if dtype == "auto" else getattr(torch, dtype)
    params, modules = dict(net.named_parameters()), dict(net.named_modules())
    sparse = [n for n in tensor_names(tensors) if f"{n}.indices" in tensors]
    dense = [n for n in tensor_names(tensors) if n not in sparse]
    for n in sparse:
        if not n.endswith(".weight") or not isinstance(modules.get(n.removesuffix(".weight")), torch.nn.Linear):
            raise ExportError(f"{n}: peft's Super-Tuning adapts nn.Linear weights only; export this increment "
                              "as merged instead")
    deltas, inexact = {}, 0
    for n in sparse:
        flat = params[n].detach().view(-1)
        trained = applied_values(tensors, meta, n, flat)  # the fine-tuned entries, exactly
        base = flat.index_select(0, tensors[f"{n}.indices"]).to(target)
        deltas[n], off = exact_deltas(trained.float(), base, delta_dtype=target)
        inexact += int(off.sum())
    # Densely trained tensors (norms) travel whole, as peft's modules_to_save copies of their modules.
    dense_part = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[0] in dense}
    if dense_part:
        apply_increment(net, (dense_part, {**meta, "base_fingerprint": ""}))  # checked above
    sizes = {}
    for n in sparse:
        sizes[params[n].numel()] = max(sizes.get(params[n].numel(), 0), tensors[f"{n}.indices"].numel())
    sparsity = peft_sparsity(sizes)
    config = SupertuningConfig(target_modules=[n.removesuffix(".weight") for n in sparse],
                               modules_to_save=sorted({n.rsplit(".", 1)[0] for n in dense}) or None,
                               sparsity=sparsity, save_precomputed_indices=True, task_type="CAUSAL_LM",
                               base_model_name_or_path=name)
    peft_model = get_peft_model(net, config)  # peft selects its own indices once (a topk); replaced below
    wrapped = dict(peft_model.base_model.model.named_modules())
    padding = 0
    for n in sparse:
        layer = wrapped[n.removesuffix(".weight")]
        count = layer.supertuning_values["default"].numel()
        idx, delta = _padded(tensors[f"{n}.indices"], deltas[n], count)
        padding += count - tensors[f"{n}.indices"].numel()
        layer.supertuning_indices["default"] = idx.to(torch.int32)
        layer.supertuning_values["default"].data = delta
    with atomic_dir(output_dir) as tmp:
        peft_model.save_pretrained(tmp)
    entries = sum(tensors[f"{n}.indices"].numel() for n in sparse)
    return {"sparsity": sparsity, "entries": entries, "padding": padding, "inexact": inexact}


def main(argv=None) -> int:
    args = parse(argv)
    from .increment import IncrementError

    try:
        check_paths(args)
        if args.kind == "merged":
            export_merged(args.increment, args.output_dir, args.model, args.dtype, args.max_shard_size, args.force)
            print(f"merged model written to {args.output_dir}")
        else:
            info = export_peft(args.increment, args.output_dir, args.model, args.dtype, args.force)
            print(f"PEFT Super-Tuning adapter written to {args.output_dir}: sparsity {info['sparsity']!r}, "
                  f"{info['entries']} trained entries + {info['padding']} zero-delta padding entries "
                  "(peft counts int(numel * (1 - sparsity)) per layer)")
            if info["inexact"]:
                print(f"note: {info['inexact']} entries ({info['inexact'] / max(info['entries'], 1):.3%}) lie where no "
                      f"delta in peft's {args.dtype} arithmetic reaches the trained value (weights passing near "
                      "zero); peft adds the nearest one there. The merged export is exact everywhere.")
    except (ExportError, IncrementError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
