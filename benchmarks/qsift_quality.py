"""Issue 13 item 5: QSIFT vs QLoRA vs SIFT (bf16 base) vs LoRA, held-out loss at equal trainable counts.

    python -m benchmarks.qsift_quality --steps 100 --json benchmarks/results/qsift_quality.json

SmolLM2-135M-Instruct on the bundled Alpaca sample with a fixed held-out split (benchmarks.quality's
data, scoring and per-run procedure). For each LoRA rank (= trainable budget) and seed: LoRA and
QLoRA at that rank, SIFT and QSIFT (gradient selection) at the rate with the same count. The 4-bit
runs quantize the same weights (NF4, double quantization) through benchmarks.methods, as the planner
does. Every run of a seed sees the same batches in the same order. One learning rate per family
(no probe here: the grid of benchmarks/quality.py chose 1e-3 for SIFT and LoRA on this data).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: bitsandbytes' CPU kernels (README)

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from common.atomic import atomic_write  # noqa: E402

from .data import encoded_alpaca, padded_batches, split  # noqa: E402
from .methods import Method, sift_rate_for_rank  # noqa: E402
from .quality import QualityConfig, heldout_loss, summarize, train_and_score  # noqa: E402


def methods_for(model, rank: int, lr: float, quantization: str) -> list[Method]:
    rate = sift_rate_for_rank(model, rank)
    # the 4-bit pair first: on a busy machine, what finishes first is what this study is about
    return [Method(f"QSIFT {rate:.2%}", "sift", rate=rate, lr=lr, quantization=quantization),
            Method(f"QLoRA r={rank}", "lora", rank=rank, lr=lr, quantization=quantization),
            Method(f"SIFT {rate:.2%}", "sift", rate=rate, lr=lr),
            Method(f"LoRA r={rank}", "lora", rank=rank, lr=lr)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.qsift_quality", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--max_length", type=int, default=64)
    ap.add_argument("--ranks", default="2,8", help="LoRA ranks = the two trainable budgets")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--quantization", default="nf4", choices=["nf4", "fp4"])
    ap.add_argument("--n_heldout", type=int, default=32)
    ap.add_argument("--json", default=None, help="write the results here (rewritten after every run)")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("SIFT_THREADS", "2")))

    from common.modeling import load_model_and_tokenizer

    pristine, tokenizer = load_model_and_tokenizer(None, dtype=torch.float32)
    pristine.config.use_cache = False
    cfg = QualityConfig(steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                        n_heldout=args.n_heldout)
    train, held = split(encoded_alpaca(tokenizer, cfg.max_length), cfg.n_heldout)
    held_batches = padded_batches(held, 8, tokenizer.pad_token_id)
    base = heldout_loss(pristine, held_batches)
    print(f"base held-out loss {base:.4f} ({len(train)} train / {len(held)} held-out)", flush=True)
    out = {"setting": vars(args), "base_heldout_loss": base, "n_train": len(train), "n_heldout": len(held),
           "runs": []}
    for seed in map(int, args.seeds.split(",")):
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
        chosen = [train[i % len(train)] for i in (order * (1 + cfg.steps * cfg.batch_size // len(train)))]
        batches = padded_batches(chosen[:cfg.steps * cfg.batch_size], cfg.batch_size, tokenizer.pad_token_id)
        for rank in map(int, args.ranks.split(",")):
            for method in methods_for(pristine, rank, args.lr, args.quantization):
                t0 = time.perf_counter()
                r = train_and_score(pristine, method, seed, batches, held_batches, cfg)
                r["quantization"] = method.quantization
                out["runs"].append(r)
                out["summary"] = summarize(out["runs"])
                print(f"seed {seed} {method.name:16s} {r['trainable_entries'] / 1e6:6.3f} M trainable  held-out "
                      f"{r['heldout_loss']:.4f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
                if args.json:
                    atomic_write(args.json, [json.dumps(out, indent=1)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
