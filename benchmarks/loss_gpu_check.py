"""Issue 11 on a GPU: the trainer's loss at Llama-3-8B shapes (vocab 128,256), planned vs measured.

    python -m benchmarks.loss_gpu_check --out loss_gpu_check.json     # ~5 min on one H100-class GPU

Random bf16 weights, seq 2048, batch 1, gradient checkpointing; the floor and SIFT 5 % deferred,
each through `Trainee.train_step` (trainer.loss: the chunked path, and Liger's fused linear
cross-entropy when liger-kernel is installed). Per row: torch.cuda.max_memory_allocated of the
steps after the first, the planner's figure for the same step (benchmarks.memory_plan) and their
difference (goal: within 3 %), the median step time.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
from unittest import mock

import torch

from trainer import loss as trainer_loss

from . import gpu_check
from .memory_plan import GIB, plan
from .methods import Method
from .models import load_config


def measure(config, method: Method, liger: bool) -> dict:
    """gpu_check's LLaMA-7B measurement (peak of the steps after the first, median step time) at
    `config`'s shapes, with the chunked or the Liger loss."""
    # gpu_check.llama7b builds its model from load_config("llama-7b"): pointed at `config` here
    with mock.patch.object(gpu_check, "load_config", lambda _name: config), \
            mock.patch.object(trainer_loss, "_liger_applies", lambda head, hidden: liger):
        out = gpu_check.llama7b(method, steps=4)
    return {"peak_later_steps_gib": out["peak_later_steps_gib"], "step_s": out["step_s"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="loss_gpu_check.json")
    ap.add_argument("--model", default="llama3-8b")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("loss_gpu_check needs a CUDA device")
    config = load_config(args.model)
    losses = ["chunked"] + (["liger"] if importlib.util.find_spec("liger_kernel") else [])
    rows = []
    for method in (Method("floor", "floor"), Method("SIFT 5% deferred", "sift", rate=0.05)):
        planned = plan(config, method, 1, 2048, torch.bfloat16, gradient_checkpointing=True)["peak"]  # device bytes
        for which in losses:
            row = {"method": method.name, "loss": which, "planned_gib": planned / GIB,
                   **measure(config, method, which == "liger")}
            row["measured_vs_planned"] = row["peak_later_steps_gib"] / row["planned_gib"] - 1
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "model": args.model,
                   "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
