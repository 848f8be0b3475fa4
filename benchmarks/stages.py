"""The stages of `python -m benchmarks.run`. A stage is a function: its keyword parameters and their
defaults are what an experiment file (experiments/STAGE/NAME.json, under "params") may set, and it
returns the JSON-able result that the driver stamps and writes to results/STAGE--NAME.json.

A new stage is one function here and one entry in STAGES; a README table (report.TABLES) and a
figure (plots.FIGURES) for it are optional. The driver also passes, to a stage that names them:
`log` (a progress line), `dry_run` (build everything, measure nothing: `--dry-run`) and `checkpoint`
(save partial results, which a restarted run resumes from).
"""
from __future__ import annotations

import os

import torch

from common.cli import UsageError

from . import core_speed as core_speed_mod
from . import gpu_check, longest, memory_plan, memory_speed, packing as packing_mod, qsift_quality as qsift_quality_mod
from . import quality as quality_mod, regrow_quality as regrow_quality_mod, sparsity as sparsity_mod, tiling_cost
from .data import fixed_batches
from .methods import compared_methods
from .models import SMOLLM2, load_config, load_pristine


def memory(model: str = SMOLLM2, batch: int = 2, seq: int = 128, tracked_steps: int = 3, timed_steps: int = 4,
           gradient_checkpointing: bool = False, rates: tuple = (0.01, 0.05), log=print) -> dict:
    """Peak tensor memory (MemoryTracker) of every compared method on CPU, `timed_steps` timed steps
    each, round-robin; beside each row the planner's peak for the same step on meta tensors."""
    pristine, tok = load_pristine(model)
    vocab = pristine.config.vocab_size if pristine.config.vocab_size < len(tok) else None
    batches = fixed_batches(tok, 3, batch, seq, vocab_size=vocab)
    methods = compared_methods(pristine, rates)
    log(f"[memory] {model}: batch {batch} x seq {seq}, checkpointing {gradient_checkpointing}, "
        f"{len(methods)} methods")
    results = memory_speed.run(pristine, batches, methods, tracked_steps=tracked_steps, timed_steps=timed_steps,
                               gradient_checkpointing=gradient_checkpointing, interleave=timed_steps > 0, log=log)
    config = load_config(model)
    for r, method in zip(results, methods):
        plan = memory_plan.plan(config, method, batch, seq, torch.float32, gradient_checkpointing,
                                steps=tracked_steps)
        r["planned_peak"] = plan["peak_with_host"]  # like with like: device + host-resident state
        r["plan_error"] = plan["peak_with_host"] / r["memory"]["steps"][-1]["peak_with_host"] - 1
    log("  planner vs measured: " + ", ".join(f"{r['plan_error']:+.2%}" for r in results))
    return {"model": model, "params": sum(p.numel() for p in pristine.parameters()), "batch": batch, "seq": seq,
            "tracked_steps": tracked_steps, "timed_steps": timed_steps,
            "gradient_checkpointing": gradient_checkpointing, "results": results}


def sparsity(model: str = SMOLLM2, batches: int = 6, batch: int = 2, seq: int = 128,
             rates: tuple = sparsity_mod.RATES, log=print) -> dict:
    """Gradient quasi-sparsity of every target weight over `batches` Alpaca batches."""
    pristine, tok = load_pristine(model)
    log(f"[sparsity] {model}, {batches} batches of {batch} x {seq} tokens")
    return sparsity_mod.measure(pristine, fixed_batches(tok, batches, batch, seq), tuple(rates), log=log)


def quality(steps: int = 8, batch_size: int = 4, max_length: int = 96, n_heldout: int = 32, n_val: int = 16,
            seeds: tuple = (0, 1, 2), ranks: tuple = (4, 16), max_grad_norm: float = 1.0,
            lr_grid: dict | None = None, log=print) -> dict:
    """Held-out loss of full fine-tuning, LoRA, SIFT-grad and SIFT-random at equal counts (SmolLM2)."""
    lr_grid = lr_grid or {"full": (2e-5, 6e-5, 2e-4), "lora": (1e-4, 3e-4, 1e-3), "sift": (1e-4, 3e-4, 1e-3)}
    cfg = quality_mod.QualityConfig(steps, batch_size, max_length, n_heldout, n_val, tuple(seeds), tuple(ranks),
                                    lr_grid, max_grad_norm)
    pristine, tok = load_pristine(SMOLLM2)
    log(f"[quality] {cfg}")
    return quality_mod.run(pristine, tok, cfg, log=log)


def qsift_quality(steps: int = 100, batch_size: int = 4, max_length: int = 64, ranks: tuple = (2, 8),
                  seeds: tuple = (0, 1), lr_sift: float = 3e-4, lr_lora: float = 1e-3,
                  methods: tuple = ("qsift", "qlora", "sift", "lora"), quantization: str = "nf4",
                  n_heldout: int = 32, checkpoint=None, log=print) -> dict:
    """QSIFT, QLoRA, SIFT and LoRA at equal counts on SmolLM2; resumable run by run."""
    setting = {k: v for k, v in locals().items() if k not in ("checkpoint", "log")}
    problems = [f"method {m!r}: choose among qsift, qlora, sift, lora" for m in methods
                if m not in ("qsift", "qlora", "sift", "lora")]
    if quantization not in memory_plan.QUANTIZATIONS:
        problems.append(f"quantization {quantization!r}: choose one of {', '.join(memory_plan.QUANTIZATIONS)}")
    if problems:
        raise UsageError("qsift_quality: " + "; ".join(problems))
    return qsift_quality_mod.run(setting, checkpoint=checkpoint, log=log)


def regrow_quality(methods: tuple = ("sift", "sift-regrow", "lora", "full"), seeds: tuple = (0, 1), steps: int = 150,
                   sweep_steps: int = 20, batch: int = 4, max_length: int = 128, lora_rank: int = 4,
                   eval_every: int = 50, n_test: int = 64, n_val: int = 64, n_other: int = 48,
                   lr_grid: dict | None = None, workdir: str = "outputs/regrow-study", log=print) -> dict:
    """Static SIFT, SIFT with drop and regrow, LoRA and full fine-tuning at LoRA rank `lora_rank`'s count
    on SmolLM2 through train_sft.py's recipe: held-out Alpaca and ShareGPT losses, before / during /
    after; each run kept in `workdir` (under the repository) as it finishes."""
    setting = {k: v for k, v in locals().items() if k not in ("workdir", "log")}
    setting["lr_grid"] = {k: tuple(v) for k, v in (lr_grid or regrow_quality_mod.LR_GRID).items()}
    return regrow_quality_mod.run(setting, workdir, log=log)


def packing(max_steps: int | None = None, model_max_length: int | None = None, packed_first: bool = False,
            log=print) -> dict:
    """The default train_sft.py run padded, then with --packing (None: train_sft.py's default)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return packing_mod.compare(max_steps, model_max_length, packed_first, log=log)


def packing_counts(lengths: tuple = (256, 512, 1024)) -> dict:
    """Label, real and grid tokens and FLOPs per step of one epoch of both loaders at each length."""
    return {"rows": [packing_mod.pipeline_counts(length, packed) for length in lengths for packed in (False, True)]}


def core_speed(model: str = "llama-30m", timed_steps: int = 12, dtypes: tuple = ("fp32", "bf16"), log=print) -> dict:
    """SIFT's step against the floor on CPU with fp32 and bf16 weights (benchmarks.core_speed)."""
    bad = [d for d in dtypes if d not in core_speed_mod.GOAL_BYTES]
    if bad:
        raise UsageError(f"core_speed: dtypes {bad}: choose among {list(core_speed_mod.GOAL_BYTES)}")
    rows = [r for dtype in dtypes for r in core_speed_mod.measure(model, dtype, timed_steps, log=log)]
    return {"model": model, "batch": [4, 128], "torch_threads": torch.get_num_threads(), "rows": rows,
            "goals": core_speed_mod.goals(rows)}


def gpu(rows: list, parts: tuple = gpu_check.PARTS, seq: int = 2048, batch: int = 1, steps: int = 5,
        long_step: dict | None = None, dry_run: bool = False, log=print) -> dict:
    """The prepared GPU check (benchmarks.gpu_check): <= 8 minutes on one GPU."""
    return gpu_check.run(list(parts), rows, seq, batch, steps, dry_run, log=log, long=long_step)


STAGES = {"memory": memory, "plan": memory_plan.plan_setting, "sparsity": sparsity, "quality": quality,
          "longest": longest.stage, "tiling_cost": tiling_cost.stage, "qsift_quality": qsift_quality,
          "regrow_quality": regrow_quality, "packing": packing, "packing_counts": packing_counts,
          "core_speed": core_speed, "gpu": gpu}
