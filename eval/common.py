"""What both evaluations share: loading the model under test (optionally base + SIFT increment) and
crash-safe file writes (temp file + os.replace, so a reader never sees half a file)."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from common.atomic import atomic_write
from common.jsonl import read_jsonl  # noqa: F401  (the eval modules import it from here)
from trainer.rundir import warn_if_unfinished

DATA_DIR = Path(__file__).resolve().parent / "data"
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ModelArgs:
    """The model under test; both CLIs' argument dataclasses extend this."""
    model: str | None = field(default=None, metadata={
        "help": "HF model directory or hub id; default: the embedded SmolLM2-135M-Instruct"})
    increment: str | None = field(default=None, metadata={
        "help": "a sift_increment.safetensors to apply onto --model before evaluating"})
    force: bool = field(default=False, metadata={
        "help": "apply --increment even if --model's fingerprint is not the base it was trained from"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    dtype: str = field(default="auto", metadata={
        "help": "auto (bf16 on CUDA, fp32 on CPU) | " + " | ".join(DTYPES[1:])})
    quantization: str = field(default="none", metadata={
        "help": "none, or a bitsandbytes 4-bit type (sift.quantize.QUANT_TYPES: nf4, fp4): load --model's "
                "linears in 4 bits (a QSIFT increment then gives exactly its training-time weights; onto the "
                "full-precision base it gives base + delta)"})

    def model_problems(self) -> list[str]:
        from common.inputs import device_problem, file_problem, model_problem

        problems = []
        if self.dtype not in DTYPES:
            problems.append(f"--dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.quantization != "none":  # the 4-bit types are sift's (their module loads torch: only asked here)
            from sift.quantize import QUANT_TYPES

            if self.quantization not in QUANT_TYPES:
                problems.append(f"--quantization must be one of {', '.join(('none', *QUANT_TYPES))}, "
                                f"got {self.quantization!r}")
        return problems + [p for p in (self.increment is not None and file_problem("--increment", self.increment),
                                       model_problem("--model", self.model),
                                       device_problem("--device", self.device)) if p]


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str):
    """"auto" = bf16 on CUDA (the memory-optimised target), fp32 on CPU (bf16 matmuls are slow there)."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def load_eval_model(model: str | None, increment: str | None = None, device: str = "auto",
                    dtype: str = "auto", attn_implementation: str | None = None, force: bool = False,
                    quantization: str | None = None):
    """(model, tokenizer) in eval mode: an HF directory, a hub id or the embedded default (None),
    with a SIFT increment applied onto it when `increment` is given (its base fingerprint checked;
    `force` applies it anyway). A bad increment is one line on stderr and exit status 2: the file is
    read and validated before the multi-GB model load, the fingerprint right after it."""
    from common.modeling import load_model_and_tokenizer

    loaded = None
    if increment is not None:  # a bad file is found before a multi-GB load, not after
        from sift.increment import IncrementError, apply_increment, load_increment  # only this path needs sift

        try:
            loaded = load_increment(increment)
        except IncrementError as e:
            raise IncrementError(f"--increment {e}") from None
    for output in (p for p in (model, increment) if p and os.path.exists(p)):
        warn_if_unfinished(output)
    device = resolve_device(device)
    if quantization not in (None, "none"):
        net, tokenizer = _load_quantized(model, quantization, resolve_dtype(dtype, device), device)
    else:
        net, tokenizer = load_model_and_tokenizer(model, dtype=resolve_dtype(dtype, device), device=device,
                                                  attn_implementation=attn_implementation)
    if loaded is not None:
        from sift import quantize

        try:
            if quantize.is_quantized_increment(increment) or quantize.is_quantized(net):
                quantize.apply_increment(net, increment, force=force)  # QSIFT: onto the 4-bit base, or base + delta
            else:
                apply_increment(net, (increment, *loaded), force=force)
        except IncrementError as e:
            raise IncrementError(f"--increment {e}") from None
    net.eval()
    return net, tokenizer


def _load_quantized(model: str | None, quantization: str, dtype, device: str):
    from common.modeling import load_tokenizer, resolve_model_path
    from sift.quantize import load_quantized

    path = resolve_model_path(model)
    return load_quantized(path, quantization, dtype=dtype, device=device), load_tokenizer(path)


def default_model_id(model: str | None, increment: str | None = None) -> str:
    """A file-name-safe id: the model directory's name (its parent's for a `.../merged` export),
    plus the increment's run directory when an increment is applied."""
    from common.modeling import EMBEDDED

    def tail(path: str) -> str:
        parts = Path(path.rstrip("/")).parts
        if len(parts) >= 2 and parts[-1] in ("merged", "final"):
            return f"{parts[-2]}-{parts[-1]}"
        return parts[-1] if parts else path

    name = "smollm2-135m-instruct" if not model or model == EMBEDDED else tail(model)
    if increment:
        name += "+" + tail(str(Path(increment).resolve().parent))
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name)


def context_length(model, tokenizer) -> int:
    """The longest sequence the model was built for (tokenizers often report a huge sentinel)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if tok_limit is not None and tok_limit < 10**7:
        limit = min(limit, tok_limit) if limit else tok_limit
    if not limit:
        raise ValueError("cannot tell the model's context length; pass --max_length")
    return int(limit)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, [text])


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def raise_if_problems(problems: list[str], what: str) -> None:
    """Fail fast with every problem at once rather than one per run."""
    if len(problems) == 1:
        raise ValueError(f"{what}: {problems[0]}")
    if problems:
        raise ValueError(f"{what}:\n  - " + "\n  - ".join(problems))
