"""SIFT's core on CPU, used as a library: step time and extra peak memory against the floor.

A ~30 M-parameter random LLaMA (8 layers, 512 wide), batch 4 x 128, SIFT 5 % adamw8bit, with fp32
and with bf16 weights. Per dtype: the floor (forward + backward, target gradients dropped in their
hooks: what any method training those weights must spend), SIFT deferred and SIFT in-backward,
each on a fresh copy of the same weights and batches, measured by benchmarks.memory_speed: peak
tensor bytes of the steady-state step (exact, MemoryTracker), then `--timed` steps per method
timed round-robin (one step of each, then the next), so load from other processes on a shared
machine hits all methods alike. Goals: median step <= 1.05 x the floor; extra peak bytes per
trained entry <= 6.5 (bf16) / <= 4.5 (fp32). Beside each SIFT row: bitsandbytes' 8-bit
AdamW update alone over as many entries (timed right after, same process), as a fraction of the
floor's step: the share of SIFT's cost that lies in bitsandbytes' CPU kernel, not in sift/.

The driver (benchmarks.run) sets OMP_WAIT_POLICY=PASSIVE, as train_sft.py does; the value is in
every result's stamp.
"""
from __future__ import annotations

import statistics
import time

import torch

from . import memory_speed
from .constants import DTYPES
from .methods import Method
from .models import build_model, load_config

GOAL_TIME, GOAL_BYTES = 1.05, {"bf16": 6.5, "fp32": 4.5}


def batches(n: int = 4, size: int = 4, seq: int = 128, vocab: int = 8192) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (size, seq), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def bnb_update_seconds(entries: int, repeats: int) -> float:
    """Median time of bitsandbytes' 8-bit blockwise AdamW update alone over `entries` fp32 values:
    the one kernel SIFT's deferred step must call (on CPU, bitsandbytes' own dequantise / update /
    requantise), i.e. the part of SIFT's step time no change in sift/ can remove."""
    from bitsandbytes import functional as bnbf

    n = -(-entries // 256) * 256
    g, p = torch.randn(n) * 1e-3, torch.randn(n) * 2e-2
    s1, s2 = torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8)
    a1, a2 = torch.zeros(n // 256), torch.zeros(n // 256)
    q1, q2 = bnbf.create_dynamic_map(signed=True), bnbf.create_dynamic_map(signed=False)
    times = []
    for step in range(1, repeats + 2):
        t0 = time.perf_counter()
        bnbf.optimizer_update_8bit_blockwise("adam", g=g, p=p, state1=s1, state2=s2, beta1=0.9, beta2=0.999,
                                             beta3=0.0, alpha=0.0, eps=1e-8, step=step, lr=1e-5, qmap1=q1,
                                             qmap2=q2, absmax1=a1, absmax2=a2, weight_decay=0.0)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def measure(model_name: str, dtype: str, timed: int, log=print) -> list[dict]:
    """floor, SIFT 5 % deferred and in-backward on `model_name` with `dtype` weights (see module doc)."""
    model = build_model(load_config(model_name), "cpu", DTYPES[dtype], "sdpa")
    model.config.use_cache = False
    methods = [Method("floor", "floor"), Method("SIFT 5% deferred", "sift", rate=0.05),
               Method("SIFT 5% in-backward", "sift", rate=0.05, step_in_backward=True)]
    rows = memory_speed.run(model, batches(), methods, tracked_steps=3, timed_steps=timed, log=log)
    bnb = bnb_update_seconds(rows[1]["trainable_entries"], timed)
    out = []
    for r in rows:
        out.append({"dtype": dtype, "name": r["name"], "entries": r["trainable_entries"],
                    "median_step_s": r["median_step_s"], "step_times": r["step_times"],
                    "time_vs_floor": r["time_vs_floor"], "cpu_time_vs_floor": r["cpu_time_vs_floor"],
                    "peak_bytes": r["memory"]["peak"], "extra_peak_bytes_per_entry": r["extra_peak_bytes_per_entry"],
                    "state_bytes_per_entry": (r["sift"] or {}).get("bytes_per_entry"),
                    "median_phase_s": r["median_phase_s"],
                    "bnb_update_s": bnb if r["trainable_entries"] else None,
                    "bnb_update_vs_floor": bnb / rows[0]["median_step_s"] if r["trainable_entries"] else None})
    return out


def goals(rows: list[dict]) -> dict:
    """Per SIFT row: step time <= GOAL_TIME x the floor, extra peak bytes per entry <= GOAL_BYTES."""
    return {f"{r['dtype']} {r['name']}": {"time_le_1.05": r["time_vs_floor"] <= GOAL_TIME,
                                          f"extra_bytes_le_{GOAL_BYTES[r['dtype']]}":
                                              r["extra_peak_bytes_per_entry"] <= GOAL_BYTES[r["dtype"]]}
            for r in rows if r["entries"]}
