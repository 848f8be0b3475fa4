"""`python -m sift.export`: a SIFT increment as a merged HF model directory, a PEFT adapter or a GGUF file.

    python -m sift.export merged --increment RUN/sift_increment.safetensors --output_dir RUN/merged-bf16 \\
        [--model BASE] [--dtype auto|float32|bfloat16|float16] [--max_shard_size 5GB] [--force] [--overwrite]
    python -m sift.export peft --increment RUN/sift_increment.safetensors --output_dir RUN/peft [--model BASE]
    python -m sift.export gguf --increment RUN/sift_increment.safetensors --output RUN/model-f16.gguf \\
        [--outtype f32|f16|bf16|q8_0] [--model BASE] [--force] [--overwrite]

`--model` defaults to the base the increment records. merged: the base, loaded in the dtype it was
trained in, plus the increment (bit-exact), cast to `--dtype`, saved with save_pretrained (sharded
safetensors, tokenizer, 0644 files) through one rename of a complete directory. peft: a peft
Super-Tuning adapter (`SupertuningConfig`: flat int32 indices + fp32 values scatter-added onto the
weight); `PeftModel.from_pretrained(base, dir)` loads it, `merge_and_unload()` merges it. gguf: the
merged model as one GGUF file for llama.cpp (LLaMA models with a byte-level BPE tokenizer; see
sift/gguf.py), readable by transformers (`from_pretrained(dir, gguf_file=name)`).
Nothing is written where it would replace what the export reads: an output that is or holds the
increment, `--model` or the recorded base (symlinks resolved; a hub id is its cache snapshot, the
embedded model its cache directory) is refused before anything loads, and so is an output inside
the directory of a running training run (its lock, common.lock).
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


def _shard_size(text: str) -> str:
    """save_pretrained's size rule (huggingface_hub's parser, so the two cannot disagree), checked
    at parse time instead of after the merge is built."""
    from huggingface_hub.serialization._base import parse_size_to_int

    try:
        if parse_size_to_int(text) > 0:
            return text
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 5GB, 500MB or 200KB")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--increment", required=True, help="a sift_increment.safetensors (format 1 or 2)")
    p.add_argument("--model", default=None, help="the base model (HF directory, hub id, or "
                   "embedded:smollm2-135m-instruct); default: the one the increment records")
    p.add_argument("--force", action="store_true", help="apply even if the base fingerprint differs")


def parse(argv=None) -> argparse.Namespace:
    from .gguf import OUTTYPES

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True, metavar="{merged,peft,gguf}")
    for kind, help_ in (("merged", "base + increment as an HF model directory"),
                        ("peft", "the increment as a PEFT (Super-Tuning) adapter directory")):
        p = sub.add_parser(kind, help=help_)
        _add_common(p)
        p.add_argument("--output_dir", required=True, help="the directory to write (refused if it holds files, "
                       "unless --overwrite)")
        p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
        p.add_argument("--dtype", default="auto", choices=DTYPES, help=(
            "dtype of the saved weights" if kind == "merged" else
            "dtype of the base the adapter is for (peft rounds its values to it)") + "; auto = the training dtype")
        if kind == "merged":
            p.add_argument("--max_shard_size", default="5GB", type=_shard_size,
                           help="save_pretrained's shard size, e.g. 2GB")
    p = sub.add_parser("gguf", help="base + increment as one GGUF file (llama.cpp)")
    _add_common(p)
    p.add_argument("--output", required=True, help="the .gguf file to write (refused if it exists, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--outtype", default="f16", choices=OUTTYPES, help="tensor type of the 2-D weights (norms stay "
                   "f32); q8_0 = llama.cpp's 8-bit blocks of 32 with an f16 scale")
    return parser.parse_args(argv)


def protected(increment: str, model: str | None, meta: dict) -> list[tuple[str, Path]]:
    """What an export reads, as (what, resolved location): the increment, --model, and the base the
    increment records, each that is on this machine."""
    from common.inputs import model_location

    out = [("--increment", Path(increment).resolve())]
    base = meta.get("base_model")
    named = ([(f"--model {model}", model)] if model else []) + \
        ([(f"the increment's recorded base model {base}", base)] if base else [])
    for what, name in named:
        location = model_location(name)
        if location is not None and location.exists():
            out.append((what, location))
    return out


def _output_problem(args, reads: list[tuple[str, Path]]) -> str | None:
    """The output is neither the other kind (file / directory), nor something the export reads, nor
    inside the directory of a running training run."""
    from common.inputs import output_problem, overwrite_problem
    from common.lock import in_use_problem

    if args.kind == "gguf":
        option, path = "--output", args.output
        problem = output_problem(option, path, "file")
        if problem is None and not path.endswith(".gguf"):
            problem = f"--output {path}: name a .gguf file"
    else:
        option, path = "--output_dir", args.output_dir
        problem = output_problem(option, path, "dir")
    problem = problem or overwrite_problem(option, path, reads) or in_use_problem(option, path)
    if problem:
        return problem
    out = Path(path)
    if args.kind == "gguf" and out.exists() and not args.overwrite:
        return f"--output {path}: exists; pass --overwrite to replace it"
    if args.kind != "gguf" and out.is_dir() and any(out.iterdir()) and not args.overwrite:
        return f"--output_dir {path}: not empty; pass --overwrite to replace it"
    return None


def check_args(args) -> dict:
    """Refuse, before anything loads, what would fail late or destroy files. Returns the increment's metadata."""
    from common.inputs import file_problem, model_problem
    from .increment import read_metadata

    problem = file_problem("--increment", args.increment) or model_problem("--model", args.model)
    if problem:
        raise ExportError(problem)
    meta = read_metadata(args.increment)
    problem = _output_problem(args, protected(args.increment, args.model, meta))
    if problem:
        raise ExportError(problem)
    return meta


def base_name(model: str | None, meta: dict) -> str:
    """`model`, else the base the increment records (refused when it is not on this machine)."""
    name = model or meta.get("base_model")
    if not name:
        raise ExportError("the increment does not record its base model: pass --model")
    if not model and os.path.isabs(name) and not os.path.isdir(name):
        raise ExportError(f"the increment's base model {name} is not on this machine: pass --model")
    return name


def _loading(name: str, load):
    """`load()`, a transformers OSError (missing directory, unknown or unreachable hub id) as one line."""
    try:
        return load()
    except OSError as e:
        raise ExportError(f"cannot load the base model {name!r} (pass --model to use another copy): "
                          f"{str(e).splitlines()[0]}") from e


def _train_dtype(meta: dict):
    import torch

    return getattr(torch, meta.get("dtype", "float32")) if meta.get("dtype") in DTYPES[1:] else torch.float32


def merged_model(increment: str, model: str | None = None, force: bool = False):
    """(base + increment, tokenizer, base id) on the CPU, in the dtype trained in: exact."""
    from common.modeling import load_model_and_tokenizer
    from .increment import apply_increment, load_increment

    tensors, meta = load_increment(increment)
    name = base_name(model, meta)
    net, tokenizer = _loading(name, lambda: load_model_and_tokenizer(name, dtype=_train_dtype(meta), device="cpu"))
    apply_increment(net, (increment, tensors, meta), force=force)
    return net, tokenizer, name


def export_merged(increment: str, output_dir: str, model: str | None = None, dtype: str = "auto",
                  max_shard_size: str = "5GB", force: bool = False) -> str:
    """Base + increment saved as an HF directory (crash-safe: a complete temp dir, renamed)."""
    import torch

    from common.atomic import atomic_dir

    net, tokenizer, _ = merged_model(increment, model, force)
    if dtype != "auto":
        net = net.to(getattr(torch, dtype))
    with atomic_dir(output_dir) as tmp:
        net.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
    return output_dir


def export_gguf(increment: str, output: str, model: str | None = None, outtype: str = "f16",
                force: bool = False) -> list[tuple[str, str]]:
    """Base + increment as one GGUF file (sift.gguf); the model kind and the tokenizer are checked
    before the weights load. Returns [(GGUF tensor name, type)]."""
    from transformers import AutoConfig

    from common.modeling import load_tokenizer, resolve_model_path
    from . import gguf
    from .increment import read_metadata

    name = base_name(model, read_metadata(increment))
    config = _loading(name, lambda: AutoConfig.from_pretrained(resolve_model_path(name)))
    problem = gguf.config_problem(config)
    if problem:
        raise ExportError(f"{name}: {problem}")
    vocab = gguf.read_vocab(_loading(name, lambda: load_tokenizer(name)), config.vocab_size)
    net, _, _ = merged_model(increment, model, force)
    return gguf.write_gguf(net, vocab, output, outtype, Path(output).stem)


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
    from common.modeling import load_model_and_tokenizer
    from .increment import apply_increment, applied_values, check_base, exact_deltas, load_increment, tensor_names

    tensors, meta = load_increment(increment)
    if not any(k.endswith(".indices") for k in tensors):  # peft would fall back to its default targets, whole
        raise ExportError(f"{increment}: no sparsely trained tensor, nothing for Super-Tuning; export merged instead")
    name = base_name(model, meta)
    net = _loading(name, lambda: load_model_and_tokenizer(name, dtype=_train_dtype(meta), device="cpu"))[0]
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
                               sparsity=sparsity, save_precomputed_indices=True, task_type="CAUSAL_LM")
    peft_model = get_peft_model(net, config)  # peft selects its own indices once (a topk); replaced below
    # peft records the loaded model's path (the embedded model's or a hub snapshot's cache directory):
    # the adapter names its base as the increment does, by the id a user loads it by
    peft_model.peft_config["default"].base_model_name_or_path = name
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
        peft_model.save_pretrained(tmp, save_embedding_layers=False)  # the vocabulary never changes: no hub check
    entries = sum(tensors[f"{n}.indices"].numel() for n in sparse)
    return {"sparsity": sparsity, "entries": entries, "padding": padding, "inexact": inexact}


def _run(args) -> None:
    if args.kind == "merged":
        export_merged(args.increment, args.output_dir, args.model, args.dtype, args.max_shard_size, args.force)
        print(f"merged model written to {args.output_dir}")
    elif args.kind == "gguf":
        types = export_gguf(args.increment, args.output, args.model, args.outtype, args.force)
        counts = {t: sum(1 for _, u in types if u == t) for t in sorted({u for _, u in types})}
        print(f"GGUF written to {args.output}: {len(types)} tensors ("
              + ", ".join(f"{n} {t}" for t, n in counts.items()) + f"); transformers reads it with "
              f"from_pretrained({str(Path(args.output).parent)!r}, gguf_file={Path(args.output).name!r})")
    else:
        info = export_peft(args.increment, args.output_dir, args.model, args.dtype, args.force)
        print(f"PEFT Super-Tuning adapter written to {args.output_dir}: sparsity {info['sparsity']!r}, "
              f"{info['entries']} trained entries + {info['padding']} zero-delta padding entries "
              "(peft counts int(numel * (1 - sparsity)) per layer)")
        if info["inexact"]:
            print(f"note: {info['inexact']} entries ({info['inexact'] / max(info['entries'], 1):.3%}) lie where no "
                  f"delta in peft's {args.dtype} arithmetic reaches the trained value (weights passing near "
                  "zero); peft adds the nearest one there. The merged export is exact everywhere.")


def main(argv=None) -> int:
    from common.quiet import silence_unrelated_warnings

    argv = sys.argv[1:] if argv is None else argv
    silence_unrelated_warnings(argv)  # before peft / transformers reach DeepSpeed's accelerator probe
    args = parse(argv)
    from .gguf import GGUFError
    from .increment import IncrementError

    try:
        check_args(args)
        _run(args)
    except (ExportError, IncrementError, GGUFError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
