"""DeepSpeed for SIFT: ZeRO-2 data parallel and ZeRO-3 CPU param offload, SIFT doing the stepping.

DeepSpeed launches the ranks, owns the process group, casts and (ZeRO-3) partitions and offloads
the weights, gathering one layer at a time. It gets no optimizer of its own: SIFT's hooks see each
target's full gradient, reduce it to the selected entries and update the parameter's own partition
(`ds_tensor`). DeepSpeed still insists on a ZeRO optimizer, so it is handed a one-entry "anchor"
parameter (zero learning rate) that lives beside the model (LOMO uses the same route).
"""
from __future__ import annotations

import contextlib
import json
import os

import torch
import torch.nn as nn

from common.modeling import resolve_model_path

from .args import Arguments, default_bf16, world_size
from .loss import causal_lm_loss

STAGES = (0, 1, 2, 3)  # DeepSpeed's ZeRO stages
_OURS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping")


def problems(args: Arguments) -> tuple[dict | None, list[str]]:
    """(the filled-in config of --deepspeed, or None without it; every reason it cannot run here).
    The config file is read here, once."""
    path = args.train.deepspeed
    if not path:
        return None, []
    if not os.path.isfile(path):
        return None, [f"--deepspeed {path}: no such config file"]
    cfg, out = resolve_config(path, args)
    return cfg or None, out + [p for p in [launcher_problem(path)] if p]


def resolve_config(path: str, args: Arguments) -> tuple[dict, list[str]]:
    """The DeepSpeed config with every "auto" filled from our arguments (one source of truth), and
    every reason the config cannot run; which ZeRO stages a method runs under is the method's rule
    (trainer.methods). With --bf16 unset an explicit bf16.enabled in the config decides, and "auto"
    means bf16 on CUDA."""
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        return {}, [f"--deepspeed {path}: not a readable JSON config ({e})"]
    if not isinstance(cfg, dict):
        return {}, [f"--deepspeed {path}: expected a JSON object of DeepSpeed settings, got a {type(cfg).__name__} "
                    "(see ds_configs/zero2.json)"]
    world, train, bf16 = world_size(), args.train, args.model.bf16
    ours = {"train_micro_batch_size_per_gpu": train.per_device_train_batch_size,
            "gradient_accumulation_steps": train.gradient_accumulation_steps,
            "train_batch_size": train.per_device_train_batch_size * train.gradient_accumulation_steps * world,
            "gradient_clipping": 0.0}  # SIFT clips by the global norm of its sparse grads itself
    out = []
    for key in _OURS:
        if cfg.get(key, "auto") not in ("auto", ours[key]) and key != "gradient_clipping":
            out.append(f"--deepspeed {path}: {key} is {cfg[key]} but the arguments say {ours[key]}: "
                       'write "auto" (the arguments are the single source of truth)')
        cfg[key] = ours[key]
    bf16_cfg = cfg.setdefault("bf16", {})
    if bf16_cfg.get("enabled", "auto") == "auto":
        bf16_cfg["enabled"] = default_bf16() if bf16 is None else bf16
    elif bf16 is not None and bool(bf16_cfg["enabled"]) != bf16:
        out.append(f"--deepspeed {path}: bf16.enabled={bf16_cfg['enabled']} contradicts --bf16 {bf16}")
    bf16_cfg["enabled"] = bool(bf16_cfg["enabled"])
    zero = cfg.setdefault("zero_optimization", {})
    stage = zero.get("stage", 0)
    hidden = _hidden_size(args.model.model_name_or_path)
    for key, value in (("stage3_param_persistence_threshold", 10 * hidden),
                       ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden))):
        if zero.get(key) == "auto":
            zero[key] = value
    if "optimizer" in cfg:
        out.append(f"--deepspeed {path}: remove the 'optimizer' section: SIFT is the optimizer "
                   "(its sparse AdamW steps inside our loop)")
    if "scheduler" in cfg:
        out.append(f"--deepspeed {path}: remove the 'scheduler' section: use --lr_scheduler_type")
    if cfg.get("fp16", {}).get("enabled") not in (None, False, "auto"):
        out.append(f"--deepspeed {path}: fp16 needs dynamic loss scaling, which SIFT's in-backward gradient "
                   "reduction does not do: use bf16 (--bf16)")
    cfg.setdefault("fp16", {})["enabled"] = False
    if zero.get("offload_optimizer"):
        out.append(f"--deepspeed {path}: offload_optimizer has nothing to offload under SIFT (its state is the "
                   "few selected entries): remove it, keep offload_param")
    if stage not in STAGES:
        out.append(f"--deepspeed {path}: zero_optimization.stage {stage} is not {STAGES[0]}-{STAGES[-1]}")
    cfg["zero_allow_untested_optimizer"] = True
    return cfg, out


def launcher_problem(path: str) -> str | None:
    """The deepspeed launcher sets the process-group variables; without them DeepSpeed falls back
    to MPI discovery and fails on a missing mpi4py."""
    if all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return None
    return (f"--deepspeed {path}: start through the DeepSpeed launcher, `deepspeed train_sft.py ... --deepspeed "
            f"{path}` (plain `python train_sft.py` does not set up its ranks)")


def _hidden_size(model_name_or_path: str | None) -> int:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve_model_path(model_name_or_path)).hidden_size
    except (OSError, ValueError, AttributeError):
        return 4096


class Anchored(nn.Module):
    """The model plus DeepSpeed's one-entry anchor parameter; its forward is the trainer's loss."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, batch: dict, num_items_in_batch):
        loss = causal_lm_loss(self.model, batch, num_items_in_batch)
        # The anchor joins the graph with a zero gradient: ZeRO's reduction expects one.
        return loss + 0.0 * self.anchor.sum()


def initialize(model: nn.Module, cfg: dict):
    """A DeepSpeed engine around `model` (ZeRO-3 partitions it here); returns the engine."""
    import deepspeed

    wrapped = Anchored(model)
    anchor_opt = torch.optim.SGD([wrapped.anchor], lr=0.0)
    engine, *_ = deepspeed.initialize(model=wrapped, optimizer=anchor_opt, model_parameters=[wrapped.anchor],
                                      config=cfg)
    return engine


def gathered(model: nn.Module):
    """Context in which every ZeRO-3 parameter holds its full data (for saving); no-op otherwise."""
    params = [p for p in model.parameters() if hasattr(p, "ds_tensor")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
