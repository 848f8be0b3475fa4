"""PNG figures of a results directory (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MIB, GIB = 2**20, 2**30
PARTS = (("params", "weights"), ("grads", "grads"), ("optimizer", "optimizer state"), ("host", "host-side state"),
         ("activations", "activations"), ("backward", "backward temporaries"), ("step", "step temporaries"),
         ("other", "other"))


def _save(fig, path: Path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def stacked_peaks(ax, rows, unit, unit_name, floor_peak=None):
    names = [r["name"] for r in rows]
    left = [0.0] * len(rows)
    for key, label in PARTS:
        vals = [r["peak_breakdown"][key] / unit for r in rows]
        if any(vals):
            ax.barh(names, vals, left=left, label=label)
            left = [a + b for a, b in zip(left, vals)]
    if floor_peak:
        ax.axvline(floor_peak / unit, color="k", lw=0.8, ls="--", label="floor peak")
    ax.invert_yaxis()
    ax.set_xlabel(f"peak tensor memory ({unit_name})")
    ax.legend(fontsize=7, loc="lower right")


def memory_figure(memory: dict, path: Path):
    rows = [dict(r, peak_breakdown=r["memory"]["peak_breakdown"]) for r in memory["results"]]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    stacked_peaks(ax, rows, MIB, "MiB", rows[0]["memory"]["peak"])
    ax.set_title(f"{memory['model']}: batch {memory['batch']} x {memory['seq']} tokens, fp32, CPU "
                 f"(checkpointing {'on' if memory['gradient_checkpointing'] else 'off'})", fontsize=9)
    _save(fig, path)


def speed_figure(memory: dict, path: Path):
    """Median seconds per phase (stacked), with the floor's step time and 1.05 x that."""
    rows = [r for r in memory["results"] if r["median_phase_s"]]
    names = [r["name"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    left = [0.0] * len(rows)
    for phase in ("forward", "backward", "step"):
        vals = [r["median_phase_s"][phase] for r in rows]
        ax.barh(names, vals, left=left, label=f"{phase} (median)")
        left = [a + b for a, b in zip(left, vals)]
    floor = rows[0]["median_step_s"]
    ax.axvline(floor, color="k", lw=0.8, ls="--", label="floor step")
    ax.axvline(1.05 * floor, color="r", lw=0.8, ls="--", label="goal: 1.05 x floor")
    for i, r in enumerate(rows):
        ax.text(left[i], i, f" {r['time_vs_floor']:.2f}x", va="center", fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("seconds per step (SIFT in-backward updates inside backward)")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"{memory['model']}: batch {memory['batch']} x {memory['seq']} tokens, "
                 f"median of {memory['timed_steps']} interleaved steps", fontsize=9)
    _save(fig, path)


def plan_figure(plan: dict, path: Path):
    rows = plan["llama-7b"]["rows"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    stacked_peaks(ax, rows, GIB, "GiB", rows[0]["peak"])
    for label, gb in plan["paper_llama7b_gb"].items():
        ax.axvline(gb, color="gray", lw=0.8, ls=":")
        ax.text(gb, len(rows) - 0.5, f" paper {label}: {gb}", fontsize=7, rotation=90, va="bottom")
    ax.set_title("LLaMA-7B planned peak: seq 2048, batch 1, checkpointing, bf16 (meta tensors)", fontsize=9)
    _save(fig, path)


def quality_figure(q: dict, path: Path):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {("lora", "grad"): ("LoRA", "o-"), ("sift", "grad"): ("SIFT, gradient selection", "s-"),
              ("sift", "random"): ("SIFT, random selection", "^-")}
    for (kind, sel), (label, fmt) in styles.items():
        rows = sorted((s for s in q["summary"] if s["kind"] == kind and s["selection"] == sel),
                      key=lambda s: s["trainable_entries"])
        if rows:
            ax.errorbar([s["trainable_entries"] for s in rows], [s["mean"] for s in rows],
                        yerr=[s["std"] for s in rows], fmt=fmt, capsize=3, label=label)
    for s in q["summary"]:
        if s["kind"] == "full":
            label = f"full fine-tuning ({s['trainable_entries'] / 1e6:.0f} M)"
            ax.axhline(s["mean"], color="k", lw=0.8, ls="--", label=label)
    ax.axhline(q["base_heldout_loss"], color="gray", lw=0.8, ls=":", label="before fine-tuning")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("held-out loss (assistant tokens)")
    c = q["config"]
    ax.set_title(f"SmolLM2-135M on Alpaca: {c['steps']} steps x {c['batch_size']} conversations, "
                 f"mean ± std over {len(c['seeds'])} seeds", fontsize=9)
    ax.legend(fontsize=7)
    _save(fig, path)


def sparsity_figure(sp: dict, path: Path):
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    mods = list(sp["by_module"])
    x = range(len(mods))
    series = [("top0.01_share", "top 1 %"), ("top0.05_share", "top 5 %"),
              ("first_batch_top0.05_share", "batch-1 top 5 % on later batches")]
    w = 0.8 / len(series)
    for i, (key, label) in enumerate(series):
        a.bar([j + (i - 1) * w for j in x], [sp["by_module"][m][key] for m in mods], width=w, label=label)
    for rate in sp["rates"]:
        a.axhline(rate, color="gray", lw=0.7, ls=":")
    a.set_xticks(list(x), mods, rotation=30)
    a.set_ylabel("share of ||grad||^2")
    a.set_ylim(0, 1)
    a.set_title("gradient energy in the largest entries (dotted: uniform)", fontsize=9)
    a.legend(fontsize=7)
    layers = sorted(sp["by_layer"], key=int)
    depth = [int(layer) for layer in layers]
    for rate, color in zip(sp["rates"], ("C0", "C1")):
        b.plot(depth, [sp["by_layer"][l][f"top{rate:g}_share"] for l in layers], color=color, ls="--",
               label=f"top {rate:.0%}: energy share")
        b.plot(depth, [sp["by_layer"][l][f"first_batch_top{rate:g}_share"] for l in layers], color=color,
               ls=":", label=f"top {rate:.0%} of batch 1: share of later batches")
        b.plot(depth, [sp["by_layer"][l][f"top{rate:g}_overlap"] for l in layers], color=color,
               marker="o", ms=3, label=f"top {rate:.0%}: overlap between batches")
    b.set_xlabel("layer")
    b.set_ylim(0, 1.2)
    b.set_title(f"by depth ({sp['n_batches']} batches; chance overlap = rate)", fontsize=9)
    b.legend(fontsize=6, ncol=2, loc="upper center")
    _save(fig, path)
