"""`--quantization nf4|fp4`: the trainer's side of QSIFT (SIFT on a 4-bit base) and QLoRA.

train_sft.py calls `load` instead of the plain loader, methods.py `save_payload` / `load_payload`
for the checkpoint's increment, and `save_outputs` for the final increment and merged/. The
library part is sift/quantize.py.
"""
from __future__ import annotations

import json
import os

import torch

from sift import quantize as q

from .args import Arguments, MethodArguments, ModelArguments, split_list

CHOICES = ("none", *q.QUANT_TYPES)


def is_quantized(model) -> bool:
    return q.is_quantized(model)


def enabled(model: ModelArguments) -> bool:
    return model.quantization != "none"


def problems(args: Arguments) -> list[str]:
    method, deepspeed = args.method, args.train.deepspeed
    if args.model.quantization not in CHOICES:
        return [f"--quantization {args.model.quantization}: choose one of {', '.join(CHOICES)}"]
    if not enabled(args.model):
        return []
    out = []
    if method.finetuning_type == "full":
        out.append("--quantization needs --finetuning_type sift (QSIFT) or lora (QLoRA): a 4-bit base is frozen")
    if method.finetuning_type == "sift" and split_list(method.sift_dense):
        out.append("--sift_dense is not supported with --quantization (only the target linears' deltas train)")
    if deepspeed and os.path.isfile(deepspeed):
        with open(deepspeed) as f:
            try:
                stage = json.load(f).get("zero_optimization", {}).get("stage", 0)
            except ValueError:
                stage = 0  # the DeepSpeed checks report the broken file
        if stage == 3:
            out.append("--quantization with ZeRO-3: 4-bit weights are not partitioned; use ZeRO-2 or one device")
    return out


def load(model_path: str, args: Arguments, dtype: torch.dtype, device: str):
    """(model, tokenizer): the base loaded straight into 4 bits on `device` (transformers'
    BitsAndBytesConfig: one tensor at a time, never the whole model in full precision there).
    QSIFT: the target linears become QSIFTLinear with their zero deltas attached."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    method, sift = args.method, args.method.finetuning_type == "sift"
    model = q.load_quantized(model_path, args.model.quantization, args.model.double_quant, dtype, device,
                             targets=split_list(method.sift_targets), to_qsift=sift)
    if sift:
        q.attach(model, method.sift_rate, method.sift_selection, args.train.seed)
    return model, tokenizer


def save_increment(model, path: str, method: MethodArguments, base_model: str) -> None:
    """QSIFT's increment (checkpoint or final): its indices and deltas live in the modules, not in SIFT's state."""
    q.save_increment(model, path, base_model=base_model, rate=method.sift_rate, selection=method.sift_selection)


def load_payload(directory: str, model, filename: str) -> None:
    q.apply_increment(model, os.path.join(directory, filename))  # indices + deltas, before SIFT's state


@torch.no_grad()
def merged_full_model(model, method: MethodArguments, base_model: str):
    """merged/: the full-precision base (loaded again on the host, in the run's dtype) + the training's
    delta (QSIFT) or adapter (QLoRA), never the 4-bit weights."""
    from transformers import AutoModelForCausalLM

    from common.modeling import resolve_model_path

    dtype = model.get_input_embeddings().weight.dtype  # the run's dtype: embeddings are never 4-bit
    full = AutoModelForCausalLM.from_pretrained(resolve_model_path(base_model), dtype=dtype)
    if method.finetuning_type == "sift":
        q.apply_onto_full(full, q.increment_tensors(model), source="the trained 4-bit model")
        return full
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    adapter = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(model).items()}
    wrapped = get_peft_model(full, model.peft_config["default"])
    set_peft_model_state_dict(wrapped, adapter)
    return wrapped.merge_and_unload()
