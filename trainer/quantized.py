"""`--quantization nf4|fp4`: the trainer's side of a 4-bit base (QSIFT and QLoRA).

trainer.methods' 4-bit forms (QSift, QLora) call `load` for the model, `attach_deltas` (QSIFT),
`save_increment` / `load_payload` for the increment a checkpoint carries, and `merged_qsift` /
`merged_qlora` for merged/. The library part is sift/quantize.py.
"""
from __future__ import annotations

import os

import torch

from common.modeling import resolve_model_path
from sift import quantize as q

from . import ds
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


def increment_tensors(model, keep: bool = True) -> dict:
    """QSIFT's indices and deltas, whole (ZeRO-3: gathered one layer at a time; every rank calls this,
    only where `keep` are they copied to the host)."""
    return q.increment_tensors(model, lambda layer: ds.gathered_params([layer.offsets, layer.delta]), keep)


def save_increment(model, path: str, method: MethodArguments, base_model: str, tensors: dict | None = None) -> None:
    """QSIFT's increment (checkpoint or final): its indices and deltas live in the modules, not in SIFT's state."""
    q.save_increment(model, path, base_model=base_model, rate=method.sift_rate, selection=method.sift_selection,
                     tensors=tensors)


def load_payload(directory: str, model, filename: str) -> None:
    q.apply_increment(model, os.path.join(directory, filename))  # indices + deltas, before SIFT's state


def _full_base(model, base_model: str):
    """The full-precision base, loaded again on the host in the run's dtype (embeddings are never 4-bit)."""
    from transformers import AutoModelForCausalLM

    dtype = model.get_input_embeddings().weight.dtype
    return AutoModelForCausalLM.from_pretrained(resolve_model_path(base_model), dtype=dtype)


@torch.no_grad()
def merged_qsift(model, base_model: str, tensors: dict | None = None):
    """merged/ of QSIFT: the full-precision base + the trained deltas (`tensors`, when already
    gathered), never the 4-bit weights."""
    full = _full_base(model, base_model)
    q.apply_onto_full(full, q.increment_tensors(model) if tensors is None else tensors,
                      source="the trained 4-bit model")
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
