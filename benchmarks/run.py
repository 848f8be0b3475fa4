"""Every benchmark of issue 6 in one command; results in benchmarks/results/*.json.

    python -m benchmarks.run --quick     # <= 10 min on 2 cores: the headline memory / speed table
                                         # (SmolLM2, short sequences) and the 7B plan -> results/quick/
    python -m benchmarks.run             # the full run: + checkpointing, a wider random-init LLaMA,
                                         # planner validation, quasi-sparsity, quality; plots; README tables
    python -m benchmarks.run --only memory,plan

Stages (each writes one JSON file):
    memory         item 1 on SmolLM2-135M (memory, step time) + the planner's estimate of each row
    memory_ckpt    item 1 memory with gradient checkpointing (the planner's 7B setting)     [full]
    memory_wide    item 1 memory on a random-init LLaMA with TinyLlama's 2048-wide layers  [full]
    plan           item 2: LLaMA-7B (and 13B) at seq 2048, batch 1, checkpointing, bf16
    sparsity       item 4: gradient quasi-sparsity on SmolLM2 + Alpaca                     [full]
    quality        item 3: held-out loss vs trainable parameters, 3 seeds                  [full]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

# Waiting OpenMP threads sleep instead of spinning: on a shared machine a spinning thread burns
# CPU time while its partner is descheduled, which would make CPU-time ratios as noisy as wall ones.
# (Read when the OpenMP runtime starts, i.e. only if torch is not imported yet.)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from . import memory_plan, memory_speed, quality, sparsity
from common.atomic import atomic_write

from .data import fixed_batches
from .methods import item1_methods
from .models import SMOLLM2, load_config

RESULTS = Path(__file__).resolve().parent / "results"
STAGES = ("memory", "memory_ckpt", "memory_wide", "plan", "sparsity", "quality")
QUICK_STAGES = ("memory", "plan")

# name -> (model, batch, seq, tracked steps, timed steps, gradient checkpointing)
FULL_MEMORY = {"memory": ("smollm2-135m", 2, 128, 3, 4, False),
               "memory_ckpt": ("smollm2-135m", 2, 128, 3, 0, True),
               "memory_wide": ("llama-wide-4l", 1, 256, 3, 0, False)}
QUICK_MEMORY = {"memory": ("smollm2-135m", 1, 64, 3, 2, False)}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    mem = next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), None) if Path("/proc/meminfo").exists() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "ram_bytes": mem,
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "loadavg": os.getloadavg()}


def load_pristine(model_name: str):
    """(model, tokenizer): the embedded SmolLM2 weights, or a random-init shape (SmolLM2's tokenizer
    encodes the data; ids are folded into the shape's vocabulary)."""
    from common.modeling import load_model_and_tokenizer, resolve_model_path
    from transformers import AutoTokenizer

    if model_name == SMOLLM2:
        model, tok = load_model_and_tokenizer(None)
    else:
        tok = AutoTokenizer.from_pretrained(resolve_model_path(None))
        model = memory_plan.build(load_config(model_name), "cpu", torch.float32, False)
    model.config.use_cache = False  # a training forward keeps no KV cache
    return model, tok


def stage_memory(spec, log) -> dict:
    model_name, bsz, seq, tracked, timed, ckpt = spec
    model, tok = load_pristine(model_name)
    vocab = model.config.vocab_size if model.config.vocab_size < len(tok) else None
    batches = fixed_batches(tok, 3, bsz, seq, vocab_size=vocab)
    methods = item1_methods(model)
    log(f"[memory] {model_name}: batch {bsz} x seq {seq}, checkpointing {ckpt}, {len(methods)} methods")
    results = memory_speed.run(model, batches, methods, tracked_steps=tracked, timed_steps=timed,
                               gradient_checkpointing=ckpt, interleave=timed > 0, log=log)
    config = load_config(model_name)
    for r, method in zip(results, methods):  # the planner, on meta tensors, for the same step
        plan = memory_plan.plan(config, method, bsz, seq, torch.float32, ckpt, steps=tracked)
        r["planned_peak"] = plan["peak_with_host"]  # like with like: device + host-resident state
        r["plan_error"] = plan["peak_with_host"] / r["memory"]["steps"][-1]["peak_with_host"] - 1
    log("  planner vs measured: " + ", ".join(f"{r['plan_error']:+.2%}" for r in results))
    return {"model": model_name, "params": sum(p.numel() for p in model.parameters()), "batch": bsz,
            "seq": seq, "tracked_steps": tracked, "timed_steps": timed, "gradient_checkpointing": ckpt,
            "results": results}


def stage_plan(log, models=("llama-7b", "llama-13b")) -> dict:
    out = {}
    for name in models:
        config = load_config(name)
        rows = [memory_plan.plan(config, m, 1, 2048, torch.bfloat16, True)
                for m in memory_plan.table1_methods(config, 0.05)]
        rows += [memory_plan.plan(config, m, 1, 2048, torch.bfloat16, True)
                 for m in memory_plan.table1_methods(config, 0.01, which="sift") if m.kind == "sift"]
        log(f"[plan] {name}, seq 2048, batch 1, checkpointing, bf16\n" + memory_plan.render_table(rows))
        out[name] = {"seq": 2048, "batch": 1, "gradient_checkpointing": True, "dtype": "bf16", "rows": rows}
    out["paper_llama7b_gb"] = memory_plan.PAPER_7B
    return out


def stage_sparsity(log) -> dict:
    model, tok = load_pristine(SMOLLM2)
    batches = fixed_batches(tok, 6, 2, 128)
    log("[sparsity] SmolLM2, 6 batches of 2 x 128 tokens")
    return sparsity.measure(model, batches, log=log)


def stage_quality(log) -> dict:
    model, tok = load_pristine(SMOLLM2)
    cfg = quality.QualityConfig()
    log(f"[quality] {cfg}")
    return quality.run(model, tok, cfg, log=log)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the <= 10 min subset, written to results/quick/")
    ap.add_argument("--only", default=None, help=f"comma-separated stages among {', '.join(STAGES)}")
    ap.add_argument("--out", default=None, help="results directory (default benchmarks/results[/quick])")
    args = ap.parse_args(argv)
    stages = args.only.split(",") if args.only else list(QUICK_STAGES if args.quick else STAGES)
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        ap.error(f"unknown stages {unknown}; choose among {STAGES}")
    out = Path(args.out) if args.out else RESULTS / ("quick" if args.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    def log(msg):
        print(msg, flush=True)

    memory_specs = QUICK_MEMORY if args.quick else FULL_MEMORY
    run_info = {"quick": args.quick, "machine_start": machine(), "stages": {}}
    t_all = time.perf_counter()
    for stage in stages:
        t0 = time.perf_counter()
        if stage.startswith("memory"):
            if stage not in memory_specs:
                log(f"[{stage}] not part of --quick; skipped")
                continue
            result = stage_memory(memory_specs[stage], log)
        elif stage == "plan":
            result = stage_plan(log, ("llama-7b",) if args.quick else ("llama-7b", "llama-13b"))
        else:
            result = {"sparsity": stage_sparsity, "quality": stage_quality}[stage](log)
        seconds = time.perf_counter() - t0
        result["machine"] = machine()
        result["seconds"] = seconds
        _write(out / f"{stage}.json", result)
        run_info["stages"][stage] = seconds
        log(f"[{stage}] done in {seconds / 60:.1f} min -> {out / (stage + '.json')}")
    run_info["seconds"] = time.perf_counter() - t_all
    run_info["machine_end"] = machine()
    _write(out / "run.json", run_info)
    log(f"all stages in {run_info['seconds'] / 60:.1f} min")
    if not args.quick and not args.only:
        from . import report
        report.main([str(out)])
    return 0


def _write(path: Path, obj):
    atomic_write(path, [json.dumps(obj, indent=1, default=str)])


if __name__ == "__main__":
    sys.exit(main())
