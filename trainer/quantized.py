"""`--quantization nf4|fp4`: the trainer's side of a 4-bit base (QSIFT and QLoRA).

trainer.methods' 4-bit forms (QSift, QLora) call `load` for the model, `attach_deltas` (QSIFT),
`save_increment` / `load_payload` for the increment a checkpoint carries, and `merged_qsift` /
`merged_qlora` for merged/. The library part is sift/quantize.py.
"""
from __future__ import annotations

import functools
import os
import sys

import torch

from common.fingerprint import WeightFiles
from common.inputs import model_location
from common.modeling import resolve_model_path
from sift import quantize as q

from .args import Arguments, MethodArguments, ModelArguments, split_list


def enabled(model: ModelArguments) -> bool:
    return model.quantization in q.QUANT_TYPES


def load(model_path: str, args: Arguments, dtype: torch.dtype, device: str, qsift: bool):
    """The base loaded straight into 4 bits on `device` (transformers' BitsAndBytesConfig: one tensor
    at a time, never the whole model in full precision there); the target linears become
    QSIFTLinear (`qsift`) or bitsandbytes Linear4bit."""
    return q.load_quantized(model_path, args.model.quantization, args.model.double_quant, dtype, device,
                            targets=split_list(args.method.sift_targets), to_qsift=qsift)


def attach_deltas(model, args: Arguments) -> None:
    """QSIFT: each QSIFTLinear's zero delta and, unless selected by gradient, its indices."""
    q.attach(model, args.method.sift_rate, args.method.sift_selection, args.train.seed)


def save_increment(model, path: str, method: MethodArguments, base_model: str) -> None:
    """QSIFT's increment (checkpoint or final): its indices and deltas live in the modules, not in SIFT's
    state; its base fingerprint is read from the full-precision base's weights files (a few values per
    tensor), as the model never holds those values."""
    files = base_files(base_model)
    save = functools.partial(q.save_increment, model, path, base_model=base_model, rate=method.sift_rate,
                             selection=method.sift_selection)
    try:
        save(base_values=files.read if files else None)
    except KeyError as e:  # a weight the files name otherwise: the file is still right, only less checkable
        print(f"warning: {e}: the increment records no full-precision base fingerprint", file=sys.stderr)
        save()


def base_files(base_model: str) -> WeightFiles | None:
    """The full-precision base's weights files (a local directory, a hub id's cached snapshot, the
    embedded model's cache), or None when they are not on this machine."""
    location = model_location(base_model)
    files = WeightFiles(location) if location is not None else None
    if not files:
        print(f"warning: the weights files of {base_model} are not at hand: the increment records no "
              "full-precision base fingerprint", file=sys.stderr)
    return files or None


def load_payload(directory: str, model, filename: str) -> None:
    q.apply_increment(model, os.path.join(directory, filename))  # indices + deltas, before SIFT's state


def _full_base(model, base_model: str):
    """The full-precision base, loaded again on the host in the run's dtype (embeddings are never 4-bit)."""
    from transformers import AutoModelForCausalLM

    dtype = model.get_input_embeddings().weight.dtype
    return AutoModelForCausalLM.from_pretrained(resolve_model_path(base_model), dtype=dtype)


@torch.no_grad()
def merged_qsift(model, base_model: str):
    """merged/ of QSIFT: the full-precision base + the trained deltas, never the 4-bit weights."""
    full = _full_base(model, base_model)
    q.apply_onto_full(full, q.increment_tensors(model), source="the trained 4-bit model")
    return full


@torch.no_grad()
def merged_qlora(model, base_model: str):
    """merged/ of QLoRA: the full-precision base + the trained adapter, never the 4-bit weights."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    full = _full_base(model, base_model)
    adapter = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(model).items()}
    wrapped = get_peft_model(full, model.peft_config["default"])
    set_peft_model_state_dict(wrapped, adapter)
    return wrapped.merge_and_unload()
