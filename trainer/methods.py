"""The three fine-tuning methods behind one interface: optimizer, checkpoint payload, final save.

sift: SIFT (clipping inside its step). full: every weight, torch AdamW or bitsandbytes AdamW8bit.
lora: PEFT LoRA on the same target modules, AdamW over the adapters. full and lora are baselines.
"""
from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file

from sift import SIFT, SIFTConfig, save_increment
from sift.increment import FILENAME

from . import quantized
from .args import ModelArguments, TrainArguments, split_list

OPTIMIZER_FILE, TRAINABLE_FILE = "optimizer.pt", "trainable.safetensors"


def sift_config(m: ModelArguments, t: TrainArguments) -> SIFTConfig:
    return SIFTConfig(rate=m.sift_rate, targets=split_list(m.sift_targets), dense=split_list(m.sift_dense),
                      selection=m.sift_selection, optimizer=m.optim, lr=t.learning_rate,
                      weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm or None,
                      step_in_backward=m.step_in_backward, seed=t.seed)


def build(model, m: ModelArguments, t: TrainArguments):
    """(model, optimizer) for the method; the model may come back wrapped (LoRA)."""
    if m.finetuning_type == "sift":
        return model, SIFT(model, sift_config(m, t))
    if m.finetuning_type == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=m.lora_rank, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
                                                 target_modules=list(split_list(m.sift_targets)), task_type="CAUSAL_LM"))
    else:
        model.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    if m.optim == "adamw8bit":
        from bitsandbytes.optim import AdamW8bit

        return model, AdamW8bit(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    return model, torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)


def step(model, opt, t: TrainArguments) -> float:
    """Clip, step, clear; returns the global grad norm (SIFT clips inside its own step)."""
    if isinstance(opt, SIFT):
        opt.step()
        norm = opt.last_grad_norm
    else:
        params = [p for p in model.parameters() if p.grad is not None]
        norm = float(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm or float("inf")))
        opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


def trainable_state(model) -> dict:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_payload(directory: str, model, opt, base_model: str, m: ModelArguments | None = None) -> None:
    torch.save(opt.state_dict(), os.path.join(directory, OPTIMIZER_FILE))
    if isinstance(opt, SIFT) and quantized.is_quantized(model):
        quantized.save_payload(directory, model, m, base_model, FILENAME)
    elif isinstance(opt, SIFT):  # the optimizer state holds the trained values; the increment is for people
        save_increment(opt, os.path.join(directory, FILENAME), base_model=base_model)
    else:
        save_file(trainable_state(model), os.path.join(directory, TRAINABLE_FILE))


@torch.no_grad()
def load_payload(directory: str, model, opt) -> None:
    if not isinstance(opt, SIFT):
        params = dict(model.named_parameters())
        for name, value in load_file(os.path.join(directory, TRAINABLE_FILE)).items():
            params[name].copy_(value)
    elif quantized.is_quantized(model):  # QSIFT's indices are module buffers: restored first
        quantized.load_payload(directory, model, FILENAME)
    opt.load_state_dict(torch.load(os.path.join(directory, OPTIMIZER_FILE), weights_only=True))


def merged_model(model, opt):
    """The fine-tuned model as a plain transformers model (SIFT already wrote its values in place)."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model
