"""What tiled decoder layers (trainer.tiled_decoder) cost in step time and save in memory.

    python -m benchmarks.run tiling_cost/llama3.1-8b    # -> results/tiling_cost--llama3.1-8b.json

1. Step time, measured on this machine: SIFT on a small random Llama (CPU, fp32, gradient
   checkpointing) at one sequence length, untiled and tiled in 4 chunks, steps interleaved
   (benchmarks.memory_speed.run), beside the matmul work the tiled layers add (`matmul_work`: the
   block before attention runs once more per step). On this shared 2-core machine the timings of
   small chunked kernels move with the load; the work ratio is what a GPU's matmuls follow.
2. Planned peak (meta device, benchmarks.longest.scaled_plan with FlashAttention-2's buffers) of
   Llama-3.1-8B, QSIFT 1 %, offloaded activations, batch 1, untiled and tiled, at a few lengths:
   where tiling starts to pay and the cost per 1,000 tokens of each.
"""
from __future__ import annotations

import dataclasses

import torch
from transformers import LlamaConfig

from trainer import tiled_decoder

from . import longest, memory_speed
from .constants import GIB
from .methods import Method
from .models import build_model, load_config

SMALL = dict(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=8192, tie_word_embeddings=False)


def matmul_work(config) -> float:
    """Matmul work of a checkpointed tiled layer over an untiled one (forward 1, recompute 1, backward 2
    untiled; tiled: the recompute makes only the block before attention, whose share is `pre`)."""
    h, kv = config.hidden_size, config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    pre = h * h + 2 * h * kv
    total = pre + h * h + 3 * h * config.intermediate_size
    return (4 + pre / total) / 4


def step_times(seq: int, chunks: int = 4, steps: int = 5) -> list[dict]:
    """Median step time (wall and CPU) and peak of the floor, SIFT 5 % untiled and SIFT 5 % tiled,
    steps interleaved."""
    # one thread: on 2 shared cores the OpenMP split of the chunks' smaller kernels measured the other
    # processes (2.2x one run, 0.45x another) rather than the work
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _step_times(seq, chunks, steps)
    finally:
        torch.set_num_threads(threads)


def _step_times(seq: int, chunks: int, steps: int) -> list[dict]:
    model = build_model(LlamaConfig(**SMALL), "cpu", torch.float32, "sdpa")
    model.config.use_cache = False
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": ids, "labels": ids}
               for ids in (torch.randint(0, SMALL["vocab_size"], (1, seq), generator=g) for _ in range(2))]
    sift = Method("SIFT 5% untiled", "sift", rate=0.05)
    methods = [Method("floor", "floor"), sift,
               dataclasses.replace(sift, name=f"SIFT 5% tiled ({chunks} chunks)", tile_tokens=-(-seq // chunks))]
    rows = memory_speed.run(model, batches, methods, tracked_steps=2, timed_steps=steps, gradient_checkpointing=True)
    return [{"name": r["name"], "median_step_s": r["median_step_s"], "median_step_cpu_s": r["median_step_cpu_s"],
             "peak_mib": r["memory"]["peak"] / 2**20, "time_vs_untiled": r["median_step_s"] / rows[1]["median_step_s"],
             "cpu_time_vs_untiled": r["median_step_cpu_s"] / rows[1]["median_step_cpu_s"]} for r in rows]


def planned(model: str, seqs: list[int]) -> list[dict]:
    """Planned peaks of QSIFT 1 % with offloaded activations, untiled and tiled, at `seqs` tokens."""
    config = load_config(model)
    base = Method("QSIFT 1%", "sift", rate=0.01, quantization="nf4", offload_activations=True)
    rows = []
    for seq in seqs:
        row = {"seq": seq}
        for name, method in (("untiled", base), ("tiled", dataclasses.replace(base, tile_tokens=0))):
            plan = longest.scaled_plan(config, method, seq)
            row[f"{name}_gib"] = longest.needed(plan) / GIB
        rows.append(row)
    for a, b in zip(rows, rows[1:]):  # the slope between consecutive lengths
        for name in ("untiled", "tiled"):
            b[f"{name}_gib_per_1k_tokens"] = (b[f"{name}_gib"] - a[f"{name}_gib"]) / (b["seq"] - a["seq"]) * 1000
    return rows


def stage(seq: int = 2048, plan_model: str = "llama3.1-8b", plan_seqs: tuple = (2048, 4096, 8192, 16384, 32768),
          log=print) -> dict:
    """The driver's `tiling_cost` stage (`python -m benchmarks.run tiling_cost/NAME`): the rule's chunk,
    the matmul work, the CPU step times at `seq` tokens and the planned peaks at `plan_seqs`."""
    log(f"[tiling_cost] step times at {seq} tokens, plans of {plan_model} at {list(plan_seqs)}")
    return {"torch_threads_timed": 1,
            "chunk_tokens_rule": {m: tiled_decoder.chunk_tokens(load_config(m)) for m in ("smollm2-135m", plan_model)},
            "matmul_work_tiled_vs_untiled": {"small (timed here)": matmul_work(LlamaConfig(**SMALL)),
                                             plan_model: matmul_work(load_config(plan_model))},
            "step_times": step_times(seq), "planned": planned(plan_model, list(plan_seqs))}
