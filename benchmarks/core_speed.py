"""SIFT's core on CPU, used as a library: step time and extra peak memory against the floor.

    python -m benchmarks.core_speed [--timed 12] [--out benchmarks/results/core_speed.json]

A ~30 M-parameter random LLaMA (8 layers, 512 wide), batch 4 x 128, SIFT 5 % adamw8bit, with fp32
and with bf16 weights. Per dtype: the floor (forward + backward, target gradients dropped in their
hooks: what any method training those weights must spend), SIFT deferred and SIFT in-backward,
each on a fresh copy of the same weights and batches, measured by benchmarks.memory_speed: peak
tensor bytes of the steady-state step (exact, MemoryTracker), then `--timed` steps per method
timed round-robin (one step of each, then the next), so load from other processes on a shared
machine hits all methods alike. Goals (issue 10): median step <= 1.05 x the floor; extra peak
bytes per trained entry <= 6.5 (bf16) / <= 4.5 (fp32). Beside each SIFT row: bitsandbytes' 8-bit
AdamW update alone over as many entries (timed right after, same process), as a fraction of the
floor's step: the share of SIFT's cost that lies in bitsandbytes' CPU kernel, not in sift/.

Nothing here sets OMP_WAIT_POLICY (train_sft.py and benchmarks.run do): it runs the way a user
who imports torch and sift gets it; the value seen is recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig

from common.atomic import atomic_write

from . import memory_speed
from .methods import Method
from .models import build_model

CONFIG = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
              num_key_value_heads=8, vocab_size=8192, max_position_embeddings=256, tie_word_embeddings=False)
GOAL_TIME, GOAL_BYTES = 1.05, {"bf16": 6.5, "fp32": 4.5}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OUT = Path(__file__).resolve().parent / "results" / "core_speed.json"


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


def measure(dtype: str, timed: int, log=print) -> list[dict]:
    model = build_model(LlamaConfig(**CONFIG), "cpu", DTYPES[dtype], "sdpa")
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


def render(rows: list[dict]) -> str:
    lines = ["| weights | method | median step (s) | x floor (wall) | x floor (CPU time) | bitsandbytes update "
             "alone / floor | peak (MiB) | extra peak B / entry | state B / entry |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        extra = f"{r['extra_peak_bytes_per_entry']:.2f}" if r["entries"] else ""
        state = f"{r['state_bytes_per_entry']:.2f}" if r["state_bytes_per_entry"] else ""
        bnb = f"{r['bnb_update_vs_floor']:.3f}" if r["bnb_update_vs_floor"] else ""
        lines.append(f"| {r['dtype']} | {r['name']} | {r['median_step_s']:.3f} | {r['time_vs_floor']:.3f} | "
                     f"{r['cpu_time_vs_floor']:.3f} | {bnb} | {r['peak_bytes'] / 2**20:.1f} | {extra} | {state} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.core_speed", description=__doc__.split("\n\n")[0])
    ap.add_argument("--timed", type=int, default=12, help="timed steps per method (round-robin)")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    ap.add_argument("--out", default=str(OUT), help="result JSON")
    args = ap.parse_args(argv)
    dtypes = [d for d in args.dtypes.split(",") if d]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        print(f"--dtypes: unknown {bad}; choose from {list(DTYPES)}", file=sys.stderr)
        return 2
    rows = []
    for dtype in dtypes:
        rows += measure(dtype, args.timed)
    goals = {f"{r['dtype']} {r['name']}": {"time_le_1.05": r["time_vs_floor"] <= GOAL_TIME,
                                           f"extra_bytes_le_{GOAL_BYTES[r['dtype']]}":
                                               r["extra_peak_bytes_per_entry"] <= GOAL_BYTES[r["dtype"]]}
             for r in rows if r["entries"]}
    print(render(rows))
    print(json.dumps(goals, indent=1))
    result = {"config": CONFIG, "batch": [4, 128], "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
              "torch_threads": torch.get_num_threads(), "loadavg": os.getloadavg(), "rows": rows, "goals": goals}
    atomic_write(args.out, [json.dumps(result, indent=1)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
