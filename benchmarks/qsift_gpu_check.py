"""Issue 13: QSIFT / QLoRA on a GPU against the plan (not run yet: no GPU in the session that wrote it).

    python -m benchmarks.qsift_gpu_check --out qsift_gpu_check.json      # ~5-8 min on an H100-class GPU

LLaMA-7B shapes, random bf16 weights quantized to NF4 on the GPU (one layer at a time, by
benchmarks.methods through sift.quantize), seq 2048, batch 1, gradient checkpointing: QSIFT 1 % / 5 %
in both step modes and QLoRA at the same trainable counts, each through benchmarks.gpu_check.llama7b
(torch.cuda.max_memory_allocated of the first and later steps, median step time), beside the
planned peak of benchmarks/results/qsift_plan_llama-7b_<rate>.json.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from .gpu_check import llama7b
from .memory_plan import quantized_methods
from .models import load_config

GIB = 2**30
RESULTS = os.path.join(os.path.dirname(__file__), "results")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="qsift_gpu_check.json")
    ap.add_argument("--rates", default="0.01,0.05")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("qsift_gpu_check needs a CUDA device")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    config = load_config("llama-7b")
    for rate in map(float, args.rates.split(",")):
        planned = {}
        path = os.path.join(RESULTS, f"qsift_plan_llama-7b_{rate}.json")
        if os.path.isfile(path):
            with open(path) as f:
                planned = {r["name"]: r["peak"] / GIB for r in json.load(f)["rows"]}
        for method in quantized_methods(config, rate, "nf4"):
            if method.quantization is None:
                continue  # the bf16 rows are benchmarks.gpu_check's
            row = llama7b(method)
            row["planned_peak_gib"] = planned.get(method.name)
            if row["planned_peak_gib"]:
                row["measured_over_plan"] = row["peak_later_steps_gib"] / row["planned_peak_gib"]
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
