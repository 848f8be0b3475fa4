"""Issue 13 item 5: QSIFT vs QLoRA vs SIFT (bf16 base) vs LoRA, held-out loss at equal trainable counts.

    python -m benchmarks.qsift_quality --steps 100 --json benchmarks/results/qsift_quality.json

SmolLM2-135M-Instruct on the bundled Alpaca sample with a fixed held-out split (benchmarks.quality's
data, scoring and per-run procedure). For each LoRA rank (= trainable budget) and seed: LoRA and
QLoRA at that rank, SIFT and QSIFT (gradient selection) at the rate with the same count. The 4-bit
runs quantize the same weights (NF4, double quantization) through benchmarks.methods, as the planner
does. Every run of a seed sees the same batches in the same order. One learning rate per family, no
probe here: benchmarks/quality.py's probe on this data chose 3e-4 for SIFT and 1e-3 for LoRA
(results/quality.json), used for the 4-bit variants too.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: bitsandbytes' CPU kernels (README)

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from common.atomic import atomic_write  # noqa: E402

from .data import encoded_alpaca, padded_batches, split  # noqa: E402
from .methods import Method, sift_rate_for_rank  # noqa: E402
from .quality import QualityConfig, heldout_loss, summarize, train_and_score  # noqa: E402


def methods_for(model, rank: int, lr_sift: float, lr_lora: float, quantization: str) -> dict[str, Method]:
    rate = sift_rate_for_rank(model, rank)
    # the 4-bit pair first: on a busy machine, what finishes first is what this study is about
    return {"qsift": Method(f"QSIFT {rate:.2%}", "sift", rate=rate, lr=lr_sift, quantization=quantization),
            "qlora": Method(f"QLoRA r={rank}", "lora", rank=rank, lr=lr_lora, quantization=quantization),
            "sift": Method(f"SIFT {rate:.2%}", "sift", rate=rate, lr=lr_sift),
            "lora": Method(f"LoRA r={rank}", "lora", rank=rank, lr=lr_lora)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.qsift_quality", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--max_length", type=int, default=64)
    ap.add_argument("--ranks", default="2,8", help="LoRA ranks = the two trainable budgets")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--lr_sift", type=float, default=3e-4, help="SIFT and QSIFT")
    ap.add_argument("--lr_lora", type=float, default=1e-3, help="LoRA and QLoRA")
    ap.add_argument("--methods", default="qsift,qlora,sift,lora", help="which of qsift, qlora, sift, lora")
    ap.add_argument("--quantization", default="nf4", choices=["nf4", "fp4"])
    ap.add_argument("--n_heldout", type=int, default=32)
    ap.add_argument("--json", default=None, help="write the results here (rewritten after every run)")
    ap.add_argument("--plot", default=None, help="only draw this PNG from --json's results")
    args = ap.parse_args(argv)
    if args.plot:
        with open(args.json) as f:
            results = json.load(f)
        plot(results, args.plot)
        print(table(results))
        return 0
    torch.set_num_threads(int(os.environ.get("SIFT_THREADS", "2")))

    from common.modeling import load_model_and_tokenizer

    pristine, tokenizer = load_model_and_tokenizer(None, dtype=torch.float32)
    pristine.config.use_cache = False
    cfg = QualityConfig(steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                        n_heldout=args.n_heldout)
    train, held = split(encoded_alpaca(tokenizer, cfg.max_length), cfg.n_heldout)
    held_batches = padded_batches(held, 8, tokenizer.pad_token_id)
    base = heldout_loss(pristine, held_batches)
    from sift.quantize import quantize  # the 4-bit base before training: what quantization alone costs

    qbase = heldout_loss(quantize(copy.deepcopy(pristine), args.quantization), held_batches)
    print(f"base held-out loss {base:.4f}, {args.quantization} base {qbase:.4f} "
          f"({len(train)} train / {len(held)} held-out)", flush=True)
    out = {"setting": vars(args), "base_heldout_loss": base, "quantized_base_heldout_loss": qbase,
           "n_train": len(train), "n_heldout": len(held), "runs": []}
    for seed in map(int, args.seeds.split(",")):
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
        chosen = [train[i % len(train)] for i in (order * (1 + cfg.steps * cfg.batch_size // len(train)))]
        batches = padded_batches(chosen[:cfg.steps * cfg.batch_size], cfg.batch_size, tokenizer.pad_token_id)
        for rank in map(int, args.ranks.split(",")):
            family = methods_for(pristine, rank, args.lr_sift, args.lr_lora, args.quantization)
            for method in (family[k] for k in args.methods.split(",")):
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


def table(results: dict) -> str:
    """Markdown: one row per method, held-out loss per seed and the mean."""
    lines = ["| method | trainable | lr | held-out loss per seed | mean |", "|---|---:|---:|---|---:|"]
    for s in summarize(results["runs"]):
        rs = [r for r in results["runs"] if r["method"] == s["method"]]
        per_seed = ", ".join(f"{r['heldout_loss']:.4f} (seed {r['seed']})" for r in rs)
        lines.append(f"| {s['method']} | {s['trainable_entries'] / 1e6:.2f} M | {rs[0]['lr']:g} | {per_seed} | "
                     f"**{s['mean']:.4f}** |")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    """Held-out loss per method and budget (one dot per seed), the bases as lines; training curves
    (a colour per method, a line style per seed). Legends sit outside the axes, clear of the data."""
    from pathlib import Path

    from matplotlib.lines import Line2D

    from .plots import _save, plt

    runs = results["runs"]
    names = list(dict.fromkeys(r["method"] for r in runs))
    seeds = list(dict.fromkeys(r["seed"] for r in runs))
    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 4.6), gridspec_kw={"width_ratios": [1, 1.25]})
    for i, name in enumerate(names):
        ys = [r["heldout_loss"] for r in runs if r["method"] == name]
        a.plot([i] * len(ys), ys, "o", color="C0" if "Q" in name[:2] else "C1")
    a.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
    a.axhline(results["base_heldout_loss"], color="gray", ls=":", label="fp32 base,\nbefore training")
    if "quantized_base_heldout_loss" in results:
        a.axhline(results["quantized_base_heldout_loss"], color="C0", ls="--", lw=0.8,
                  label=f"{results['setting']['quantization']} base,\nbefore training")
    a.set_ylabel("held-out loss (assistant tokens)")
    a.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    a.set_title("4-bit base (blue) vs full-precision base (orange)", fontsize=9)
    window = 10
    colors = {name: f"C{i}" for i, name in enumerate(names)}  # <= 10 methods: one colour each
    styles = {seed: ("-", "--", ":", "-.")[i % 4] for i, seed in enumerate(seeds)}
    for r in runs:
        loss = r["train_losses"]
        smooth = [sum(loss[max(0, j - window + 1):j + 1]) / len(loss[max(0, j - window + 1):j + 1])
                  for j in range(len(loss))]
        b.plot(smooth, lw=0.9, color=colors[r["method"]], ls=styles[r["seed"]])
    b.set_xlabel("step")
    b.set_ylabel(f"training loss ({window}-step mean)")
    handles = [Line2D([], [], color=c, lw=1.5, label=n) for n, c in colors.items()]
    handles += [Line2D([], [], color="black", lw=0.9, ls=ls, label=f"seed {seed}") for seed, ls in styles.items()]
    b.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    st = results["setting"]
    fig.suptitle(f"SmolLM2-135M on Alpaca: {st['steps']} steps x {st['batch_size']} conversation(s) of <= "
                 f"{st['max_length']} tokens", fontsize=9)
    _save(fig, Path(path))


if __name__ == "__main__":
    raise SystemExit(main())
