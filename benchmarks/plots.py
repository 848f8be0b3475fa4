"""Figures of the result files (matplotlib, no display needed). FIGURES maps a stage to its figure
functions, each taking a result document (results/STAGE--NAME.json) and returning a Figure or None;
benchmarks.report saves them as plots/STAGE--NAME<suffix>.png."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from .constants import GIB, MIB, PAPER_7B  # noqa: E402
from .core_speed import GOAL_BYTES  # noqa: E402

PARTS = (("params", "weights"), ("grads", "grads"), ("optimizer", "optimizer state"), ("host", "host-side state"),
         ("activations", "activations"), ("backward", "backward temporaries"), ("step", "step temporaries"),
         ("other", "other"))


def stacked_peaks(ax, rows, unit, unit_name, floor_peak=None):
    """One bar per row: the peak's parts stacked (host-side state hatched: it is not device memory),
    the device peak written at the bar's end, the legend outside the axes."""
    names = [r["name"] for r in rows]
    left = [0.0] * len(rows)
    for i, (key, label) in enumerate(PARTS):
        vals = [r["peak_breakdown"][key] / unit for r in rows]
        if any(vals):
            ax.barh(names, vals, left=left, label=label, color=f"C{i}", hatch="//" if key == "host" else None,
                    alpha=0.5 if key == "host" else 1.0)
            left = [a + b for a, b in zip(left, vals)]
    for i, r in enumerate(rows):
        peak = sum(v for k, v in r["peak_breakdown"].items() if k != "host")
        ax.text(left[i], i, f" {peak / unit:,.2f}", va="center", fontsize=7)
    if floor_peak:
        ax.axvline(floor_peak / unit, color="k", lw=0.8, ls="--", label="floor peak")
    ax.set_xlim(0, max(left) * 1.15)
    ax.invert_yaxis()
    ax.set_xlabel(f"peak tensor memory ({unit_name}); the number: device memory, host-side state left out")
    ax.tick_params(axis="y", labelsize=8)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)


def memory_figure(doc: dict):
    memory = doc["result"]
    rows = [dict(r, peak_breakdown=r["memory"]["peak_breakdown"]) for r in memory["results"]]
    fig, ax = plt.subplots(layout="constrained", figsize=(10, 4.5))
    stacked_peaks(ax, rows, MIB, "MiB", rows[0]["memory"]["peak"])
    ax.set_title(f"{memory['model']}: batch {memory['batch']} x {memory['seq']} tokens, fp32, CPU "
                 f"(checkpointing {'on' if memory['gradient_checkpointing'] else 'off'})", fontsize=9)
    return fig


def speed_figure(doc: dict):
    """Median seconds per phase (stacked), with the floor's step time and 1.05 x that."""
    memory = doc["result"]
    rows = [r for r in memory["results"] if r["median_phase_s"]]
    if not rows:
        return None
    names = [r["name"] for r in rows]
    fig, ax = plt.subplots(layout="constrained", figsize=(8, 4.5))
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
    ax.set_xlim(0, max(left) * 1.12)
    ax.set_xlabel("seconds per step (SIFT in-backward updates inside backward)")
    ax.tick_params(axis="y", labelsize=8)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"{memory['model']}: batch {memory['batch']} x {memory['seq']} tokens, "
                 f"median of {memory['timed_steps']} interleaved steps", fontsize=9)
    return fig


def plan_figure(doc: dict):
    s, rows = doc["result"]["setting"], doc["result"]["rows"]
    fig, ax = plt.subplots(layout="constrained", figsize=(10, 1.2 + 0.42 * len(rows)))
    stacked_peaks(ax, rows, GIB, "GiB", rows[0]["peak"])
    if (s["model"], s["seq"], s["batch"], s["gradient_checkpointing"], s["quantization"]) \
            == ("llama-7b", 2048, 1, True, None):
        for label, gb in PAPER_7B.items():
            if gb < ax.get_xlim()[1]:
                ax.axvline(gb, color="gray", lw=0.8, ls=":")
                ax.text(gb, 0.99, f"paper, {label} ", transform=ax.get_xaxis_transform(), fontsize=7,
                        rotation=90, va="top", ha="right")
    extras = [f for f, on in (("offload", s["offload_activations"]), ("host embeddings", s["embeddings_on_host"]),
                              (f"{s['gradient_accumulation_steps']} micro-batches",
                               s["gradient_accumulation_steps"] > 1)) if on]
    ax.set_title(f"{s['model']} planned peak: seq {s['seq']}, batch {s['batch']}, checkpointing "
                 f"{'on' if s['gradient_checkpointing'] else 'off'}, {s['dtype']}"
                 + "".join(f", {e}" for e in extras) + " (meta tensors)", fontsize=9)
    return fig


def quality_figure(doc: dict):
    q = doc["result"]
    fig, ax = plt.subplots(layout="constrained", figsize=(7, 4.5))
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
    return fig


def sparsity_figure(doc: dict):
    sp = doc["result"]
    fig, (a, b) = plt.subplots(1, 2, layout="constrained", figsize=(11, 4.2))
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
    return fig


def qsift_quality_figure(doc: dict):
    """Held-out loss per method and budget (one dot per seed), the bases as lines; training curves
    (a colour per method, a line style per seed). Legends sit outside the axes, clear of the data."""
    results = doc["result"]
    runs = results["runs"]
    names = list(dict.fromkeys(r["method"] for r in runs))
    seeds = list(dict.fromkeys(r["seed"] for r in runs))
    fig, (a, b) = plt.subplots(1, 2, layout="constrained", figsize=(14, 4.6), gridspec_kw={"width_ratios": [1, 1.25]})
    for i, name in enumerate(names):
        ys = [r["heldout_loss"] for r in runs if r["method"] == name]
        a.plot([i] * len(ys), ys, "o", color="C0" if "Q" in name[:2] else "C1")
    a.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
    a.axhline(results["base_heldout_loss"], color="gray", ls=":", label="fp32 base,\nbefore training")
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
    return fig


def regrow_quality_figure(doc: dict):
    """Held-out Alpaca loss (learning) and ShareGPT loss (forgetting) over the steps: per method the
    mean over seeds, the band spanning the seeds."""
    res = doc["result"]
    runs = list(res["runs"].values())
    if not runs:
        return None
    fig, axes = plt.subplots(1, 2, layout="constrained", figsize=(13, 4.6))
    for i, method in enumerate(m for m in res["config"]["methods"] if any(r["method"] == m for r in runs)):
        mine = [r for r in runs if r["method"] == method]
        steps = [c[0] for c in mine[0]["curve"]]
        for ax, col in zip(axes, (1, 2)):
            ys = [[r["curve"][j][col] for r in mine] for j in range(len(steps))]
            ax.plot(steps, [sum(y) / len(y) for y in ys], "o-", ms=3, color=f"C{i}",
                    label=f"{method} (lr {mine[0]['lr']:g}, {len(mine)} seed{'s' * (len(mine) > 1)})")
            ax.fill_between(steps, [min(y) for y in ys], [max(y) for y in ys], color=f"C{i}", alpha=0.15, lw=0)
    axes[0].set_title("held-out Alpaca loss (learning)", fontsize=9)
    axes[1].set_title("ShareGPT sample loss (another distribution: a rise is forgetting)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("mean loss over assistant tokens")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    c = res["config"]
    fig.suptitle(f"SmolLM2-135M on Alpaca: {c['steps']} steps x {c['batch']} conversations of <= {c['max_length']} "
                 f"tokens; SIFT {res['sift_rate']:.2%} = LoRA r={c['lora_rank']}'s count (band: seeds' range)",
                 fontsize=9)
    return fig


def ratio_bars(ax, labels: list[str], values: list[float], goal: float | None, xlabel: str):
    """Horizontal bars of ratios with their values written at the ends, and a goal line."""
    ax.barh(labels, values, color="C0")
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.2f}x", va="center", fontsize=7)
    ax.axvline(1.0, color="k", lw=0.8)
    if goal:
        ax.axvline(goal, color="r", lw=0.8, ls="--", label=f"goal: {goal} x")
        ax.legend(fontsize=7, loc="lower right")
    ax.set_xlim(0, max(values + [goal or 0]) * 1.15)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.tick_params(axis="y", labelsize=8)


def core_speed_figure(doc: dict):
    rows = doc["result"]["rows"]
    fig, (a, b) = plt.subplots(1, 2, layout="constrained", figsize=(11, 3.4))
    sift = [r for r in rows if r["entries"]]
    labels = [f"{r['dtype']} {r['name']}" for r in sift]
    ratio_bars(a, labels, [r["time_vs_floor"] for r in sift], 1.05, "median step / floor's (wall)")
    a.set_title(f"step time, {doc['params']['model']}, batch 4 x 128", fontsize=9)
    b.barh(labels, [r["extra_peak_bytes_per_entry"] for r in sift], color="C2")
    for i, r in enumerate(sift):
        b.text(r["extra_peak_bytes_per_entry"] - 0.1, i, f"{r['extra_peak_bytes_per_entry']:.2f}", va="center",
               ha="right", color="white", fontsize=8)
        b.plot([GOAL_BYTES[r["dtype"]]], [i], "r|", ms=22, label="goal" if i == 0 else None)
    b.invert_yaxis()
    b.set_yticks([])
    b.set_xlim(0, 8)
    b.legend(fontsize=7, loc="upper right")
    b.set_xlabel("extra peak bytes per trained entry")
    b.set_title("memory above the floor", fontsize=9)
    return fig


def packing_figure(doc: dict):
    rows = doc["result"]["rows"]
    fig, ax = plt.subplots(layout="constrained", figsize=(7, 2.6))
    labels = ["--packing" if r["packing"] else "padded" for r in rows]
    for i, (key, name) in enumerate((("label_tokens_per_s", "per wall second"),
                                     ("label_tokens_per_cpu_s", "per CPU second"))):
        ax.barh([j + 0.4 * i for j in range(len(rows))], [r[key] for r in rows], height=0.38, label=name)
    ax.set_yticks([j + 0.2 for j in range(len(rows))], labels)
    ax.invert_yaxis()
    ax.set_xlabel("trained label tokens per second")
    ax.legend(fontsize=7, loc="lower right")
    p = doc["params"]
    ax.set_title(f"train_sft.py default run, {rows[0]['steps']} steps, --model_max_length "
                 f"{p.get('model_max_length') or 'default'}: packing {doc['result']['label_tokens_per_s_ratio']:.2f}x "
                 "per second", fontsize=9)
    return fig


def packing_counts_figure(doc: dict):
    """Packed over padded label tokens per step, per grid token and per FLOP, at each length."""
    rows = doc["result"]["rows"]
    pairs = list(zip(rows[::2], rows[1::2]))
    fig, ax = plt.subplots(layout="constrained", figsize=(7, 3.2))
    width = 0.27
    for i, (key, name) in enumerate((("steps", "per step"), ("grid_tokens", "per grid token"), ("flops", "per FLOP"))):
        ratios = [(pk["label_tokens"] / pk[key]) / (pd["label_tokens"] / pd[key]) for pd, pk in pairs]
        xs = [j + (i - 1) * width for j in range(len(pairs))]
        ax.bar(xs, ratios, width=width, label=name)
        for x, r in zip(xs, ratios):
            ax.text(x, r, f"{r:.2f}", ha="center", va="bottom", fontsize=7)
    ax.axhline(1.5, color="r", lw=0.8, ls="--", label="goal: 1.5 x")
    ax.set_xticks(range(len(pairs)), [f"{pd['model_max_length']} tokens" for pd, _ in pairs])
    ax.set_ylabel("packed / padded label tokens")
    ax.set_title("one epoch of train_sft.py's loaders, counted (no training)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    return fig


def gpu_figure(doc: dict):
    rows = [r for r in doc["result"].get("rows", []) if r.get("planned_peak_gib")]
    if not rows:
        return None
    fig, ax = plt.subplots(layout="constrained", figsize=(8, 0.9 + 0.45 * len(rows)))
    labels = [f"{r['model']} {r['method']}" for r in rows]
    ratio_bars(ax, labels, [r["peak_later_steps_gib"] / r["planned_peak_gib"] for r in rows], None,
               "measured peak / planned peak")
    ax.set_title(f"{doc['result']['device']}: torch.cuda.max_memory_allocated against the plan", fontsize=9)
    return fig


FIGURES = {"memory": {"": memory_figure, "-speed": speed_figure}, "plan": {"": plan_figure},
           "quality": {"": quality_figure}, "sparsity": {"": sparsity_figure},
           "qsift_quality": {"": qsift_quality_figure}, "core_speed": {"": core_speed_figure},
           "regrow_quality": {"": regrow_quality_figure},
           "packing": {"": packing_figure}, "packing_counts": {"": packing_counts_figure},
           "gpu": {"": gpu_figure}}


def save(fig, path) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight")  # legends outside the axes stay in the image
    plt.close(fig)
