"""The planner's core: one training step of a method counted on meta tensors (see benchmarks.memory_plan's
doc for what is counted and how), shared by benchmarks.memory_plan and benchmarks.longest."""
from __future__ import annotations

import math
import os
import warnings

import torch
from bitsandbytes import functional as bnbf

from . import memory_speed, zero_plan
from .memtrack import MemoryTracker
from .methods import Method, targets_of
from .models import FUSED_SDPA, build_model, count_params, enable_checkpointing


class MetaTracker(MemoryTracker):
    """MemoryTracker that answers host syncs on meta tensors with a neutral value."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].is_meta:
            return True if args[0].dtype == torch.bool else 1
        return super().__torch_dispatch__(func, types, args, kwargs)


def build(config, device: str, dtype: torch.dtype, gradient_checkpointing: bool, attention: str = FUSED_SDPA):
    """The model a training step runs on: meta with the fused attention (or `attention`), or real with sdpa."""
    model = build_model(config, device, dtype, attention if device == "meta" else "sdpa")
    model.config.use_cache = False  # a training forward keeps no KV cache
    if gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    return model


def plan(config, method: Method, batch_size: int, seq_len: int, dtype: torch.dtype = torch.bfloat16,
         gradient_checkpointing: bool = False, steps: int = 3, accumulation: int = 1,
         attention: str = FUSED_SDPA, tracker=MetaTracker, on_model=None, zero: dict | None = None,
         world_size: int = 1) -> dict:
    """Peak bytes of `method`'s steady-state step (the last of `steps`, each of `accumulation`
    micro-batches) and what made it up. `tracker` makes the byte counter, `on_model(model)` sees the
    model before the method is built on it (benchmarks.longest uses both); with `zero`
    (benchmarks.zero_plan.config_values) also per rank of `world_size` ZeRO-3 ranks ("zero3")."""
    model = build(config, "meta", dtype, gradient_checkpointing, attention)
    largest = max(p.numel() for _, p in targets_of(model))  # entries of the largest target weight
    # bitsandbytes caches its 8-bit map on the device of the first tensor it quantizes blockwise: made
    # on meta here, it would break every later real quantization in this process (and add 1 KiB to this plan)
    bnbf.name2qmap.setdefault("dynamic", bnbf.create_dynamic_map())
    if on_model is not None:
        on_model(model)
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")
    batches = [{"input_ids": ids, "labels": ids}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SIFT's non-finite warning (see the module doc), peft's notes
        trainee, out, after = memory_speed.track_steps(method, model, batches, steps, tracker=tracker,
                                                       accumulation=accumulation)
    split = zero_plan.weight_split(trainee.model, zero["stage3_param_persistence_threshold"]) if zero else None
    trainee.close()
    host = out[-1]["breakdown"]["host"]  # fixed after the first step, so it shifts the peak only
    row = {"name": method.name, "method": method.__dict__.copy(), "trainable_entries": trainee.entries,
           "params": count_params(trainee.model), "peak": out[-1]["peak"] - host,
           "peak_with_host": out[-1]["peak"], "first_step_peak": out[0]["peak"] - host,
           "peak_breakdown": out[-1]["breakdown"], "after_step": after, "sift": trainee.sift_report(),
           "offloaded_bytes": trainee.offload.offloaded_bytes if trainee.offload else 0}
    if zero:
        row["zero3"] = zero_plan.per_rank(row, split, world_size, zero, math.ceil((method.rate or 0) * largest),
                                          largest * dtype.itemsize)
    return row


def json_problem(path: str) -> str | None:
    """Why `--json PATH` could not be written, checked before the minutes of planning."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return f"--json {path}: is a directory: name a file"
    if not os.path.isdir(parent):
        return f"--json {path}: no directory {parent}"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"--json {path}: the directory {parent} is not writable"
    return None
