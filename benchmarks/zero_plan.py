"""The peak memory per rank of SIFT / QSIFT under DeepSpeed ZeRO-3 on N ranks, composed from the
one-rank plan's measured components (benchmarks.memory_plan) and DeepSpeed's documented buffers.

Why composed, not measured: the real partitioned step needs DeepSpeed's process group and real
partitions, which the meta device cannot give. What each rank holds instead (trainer.ds, sift.shard):

    weights      every parameter above stage3_param_persistence_threshold elements, 1/N of it (QSIFT:
                 the packed 4-bit weight, its absmax, the delta and the offsets too, as 16-bit
                 parameters); the persistent ones (norms) whole; buffers and the rest of QSIFT's
                 quantization state whole. zero3_offload.json: the partitions live in host memory.
    gathered     what DeepSpeed holds gathered at once: the submodule in use, those it keeps because
                 they come back within stage3_max_reuse_distance elements, and the prefetch bucket
                 (stage3_prefetch_bucket_size): bounded by (largest submodule + reuse distance +
                 prefetch bucket) x 2 B, and by all partitioned weights.
    state        SIFT's state (indices, remainders, moments): 1/N of the one-rank plan's.
    grads        deferred sparse gradients: 1/N of the entries, kept in fp32 (the sum over ranks).
    exchange     the largest tensor's transient in its hook: k x 14 B (gathered offsets, packed
                 offsets, int64 indices, gathered bf16 values) + k x 6 B received (sift.shard).
    per rank     activations, the backward's and the step's temporaries: as in the one-rank plan
                 (each rank runs its own micro-batch of the same size).
    first step   + what the one-rank first step adds (the selection) + sift.selection.agree's copy of
                 the largest target's dense gradient (the all-reduced selection score).
DeepSpeed's reduce bucket is not allocated (contiguous_gradients false in the shipped configs: its
only optimizer parameter is a one-entry anchor), its all-gather buffers are the gathered weights.
Bytes per element of the gathered bound: 2 (bf16; the 4-bit weights are counted as bf16 elements).
"""
from __future__ import annotations

import json
import os

import torch.nn as nn

from sift.quantize import base_tensors

from .constants import GIB

CONFIGS = {"zero3": "ds_configs/zero3.json", "zero3_offload": "ds_configs/zero3_offload.json"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_values(config: str, model_config) -> dict:
    """The ZeRO-3 values the plan uses, from a shipped config name or a path; "auto" as trainer.ds fills it."""
    path = os.path.join(ROOT, CONFIGS.get(config, config))
    with open(path) as f:
        zero = json.load(f)["zero_optimization"]
    hidden = model_config.hidden_size
    auto = {"stage3_param_persistence_threshold": 10 * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden**2),
            "stage3_max_reuse_distance": 10**9}
    out = {k: int(float(auto[k] if zero.get(k, "auto") == "auto" else zero[k])) for k in auto}
    out["offload_param"] = bool(zero.get("offload_param"))
    out["config"] = os.path.relpath(path, ROOT)
    return out


def weight_split(model: nn.Module, threshold: int) -> dict:
    """Bytes of the weights ZeRO-3 partitions (QSIFT: also Q, its absmax and the offsets, which
    `QSIFTLinear.partitionable` makes parameters), keeps whole per rank (persistent parameters;
    buffers and the rest of the 4-bit quantization state), of the largest submodule it gathers at
    once, and of QSIFT's index buffers (the one-rank plan counts them as optimizer state)."""
    out = {"partitioned": 0, "persistent": 0, "replicated": 0, "largest": 0, "index": 0}
    packed = set()
    for module in model.modules():
        extra = module.partitioned_tensors() if hasattr(module, "partitioned_tensors") else {}
        own = list(module.parameters(recurse=False)) + list(extra.values())
        out["largest"] = max(out["largest"], sum(t.nbytes for t in own))
        if extra:  # QSIFT's indices, optimizer state in the one-rank plan
            out["index"] += extra["offsets"].nbytes + (module.counts.nbytes if module.counts is not None else 0)
        own = [t for t in own if id(t) not in packed]  # a tied weight is one parameter
        packed |= {id(t) for t in own}
        for t in own:  # DeepSpeed counts a packed tensor in the elements of its 16-bit parameter
            elements = t.numel() if t.is_floating_point() else t.nbytes // 2
            out["persistent" if elements <= threshold else "partitioned"] += t.nbytes
    out["replicated"] = (sum(b.nbytes for b in model.buffers() if id(b) not in packed)
                         + sum(t.nbytes for t in base_tensors(model) if id(t) not in packed))
    return out


def per_rank(row: dict, split: dict, world: int, zero: dict, largest_k: int, largest_grad: int) -> dict:
    """A one-rank plan row's peak moment, rebuilt for one of `world` ZeRO-3 ranks (bytes by part).
    The first step adds what the one-rank first step adds (the selection's temporaries) and, with
    several ranks, sift.selection.agree's copy of the largest target's dense gradient."""
    bd = row["peak_breakdown"]
    shard = split["partitioned"] / world
    gathered = min(split["partitioned"], split["largest"] + 2 * (zero["stage3_max_reuse_distance"]
                                                                 + zero["stage3_prefetch_bucket_size"]))
    gpu = {"weights": split["persistent"] + split["replicated"] + (0 if zero["offload_param"] else shard),
           "gathered": gathered,
           "state": (bd["optimizer"] - split["index"]) / world,
           "grads": 2 * bd["grads"] / world,
           "exchange": 20 * largest_k if row["method"].get("quantization") is None else 8 * largest_k,
           "activations & temporaries": bd["activations"] + bd["backward"] + bd["step"] + bd["other"]}
    host = {"weights": shard if zero["offload_param"] else 0, "base values": bd["host"] / world,
            "offloaded activations": row.get("offloaded_bytes", 0)}
    first = sum(gpu.values()) + max(0, row["first_step_peak"] - row["peak"]) + (largest_grad if world > 1 else 0)
    return {"world_size": world, "gpu": gpu, "host": host, "gpu_peak": sum(gpu.values()),
            "first_step_gpu_peak": first, "host_total": sum(host.values()), "zero": zero}


def render(rows: list[dict]) -> str:
    """Markdown, GiB per rank: the GPU columns sum to the GPU peak."""
    parts = list(rows[0]["zero3"]["gpu"])
    lines = ["| method | ranks | " + " | ".join(parts) + " | GPU peak | first step | host |",
             "|---|---:|" + "---:|" * (len(parts) + 3)]
    for r in rows:
        z = r["zero3"]
        cells = " | ".join(f"{z['gpu'][p] / GIB:.2f}" for p in parts)
        lines.append(f"| {r['name']} | {z['world_size']} | {cells} | **{z['gpu_peak'] / GIB:.2f}** | "
                     f"{z['first_step_gpu_peak'] / GIB:.2f} | {z['host_total'] / GIB:.2f} |")
    return "\n".join(lines)
