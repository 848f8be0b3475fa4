"""Tables (markdown) and plots (PNG) of a results directory; refreshes benchmarks/README.md.

    python -m benchmarks.report [RESULTS_DIR]      # default benchmarks/results

README.md sections between `<!-- BEGIN name -->` and `<!-- END name -->` are replaced by the
table `name` below; the prose around them is written by hand.
"""
from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

from . import plots

HERE = Path(__file__).resolve().parent
MIB, GIB = 2**20, 2**30


def _load(d: Path, name: str):
    p = d / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def _f(x, fmt):
    return "–" if x is None else format(x, fmt)


def memory_table(m: dict) -> str:
    timed = m["timed_steps"] > 0
    head = "| method | trainable | peak MiB | peak / floor | state B/entry | planner error |"
    sep = "|---|---:|---:|---:|---:|---:|"
    if timed:
        head += " median step s | wall / floor | CPU / floor | min step / floor | tokens/s |"
        sep += "---:|---:|---:|---:|---:|"
    lines = [head, sep]
    floor_min = min(m["results"][0]["step_times"]) if timed else None
    for r in m["results"]:
        line = (f"| {r['name']} | {r['trainable_entries'] / 1e6:,.2f} M | {r['memory']['peak'] / MIB:,.1f} | "
                f"{r['peak_vs_floor']:.3f} | {_f(r['state_bytes_per_entry'], '.2f')} | {r['plan_error']:+.2%} |")
        if timed:
            line += (f" {r['median_step_s']:.2f} | {r['time_vs_floor']:.3f} | {r['cpu_time_vs_floor']:.3f} | "
                     f"{min(r['step_times']) / floor_min:.3f} | {r['tokens_per_s']:.1f} |")
        lines.append(line)
    return "\n".join(lines)


def breakdown_table(m: dict) -> str:
    keys = ("params", "grads", "optimizer", "host", "activations", "backward", "step", "other")
    lines = ["| method | first-step peak | " + " | ".join(keys) + " |", "|---|---:|" + "---:|" * len(keys)]
    for r in m["results"]:
        bd = r["memory"]["peak_breakdown"]
        lines.append(f"| {r['name']} | {r['memory']['first_step_peak'] / MIB:,.1f} | "
                     + " | ".join(f"{bd[k] / MIB:,.1f}" for k in keys) + " |")
    return "\n".join(lines)


def goals_table(m: dict) -> str:
    lines = ["| SIFT run | wall / floor | CPU / floor | ≤ 1.05 × floor | peak − floor (MiB) | sparse state (MiB) "
             "| peak ≤ floor + state | B/entry (persistent) | B/entry (+ deferred grad) |",
             "|---|---:|---:|:-:|---:|---:|:-:|---:|---:|"]
    for r in m["results"]:
        g = r.get("goals")
        if not g:
            continue
        ok = {True: "yes", False: "no", None: "–"}[g["time_le_1.05_floor"]]
        lines.append(f"| {r['name']} | {_f(r['time_vs_floor'], '.3f')} | {_f(r['cpu_time_vs_floor'], '.3f')} | {ok} | "
                     f"{g['peak_minus_floor_bytes'] / MIB:,.2f} | {g['sparse_state_bytes'] / MIB:,.2f} | "
                     f"{'yes' if g['peak_le_floor_plus_sparse_state'] else 'no'} | {g['bytes_per_entry']:.2f} | "
                     f"{g['bytes_per_entry_with_grad']:.2f} |")
    return "\n".join(lines)


def plan_table(plan: dict, model: str) -> str:
    from .memory_plan import render_table
    return render_table(plan[model]["rows"])


def sparsity_table(sp: dict) -> str:
    lines = ["| module | tensors | top 1 % share | top 5 % share | batch-1 top 1 % on later batches | "
             "batch-1 top 5 % on later batches | top 1 % overlap | top 5 % overlap |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    rows = list(sp["by_module"].items()) + [("**all**", sp["overall"])]
    for name, s in rows:
        lines.append(f"| {name} | {s['tensors']} | {s['top0.01_share']:.3f} | {s['top0.05_share']:.3f} | "
                     f"{s['first_batch_top0.01_share']:.3f} | {s['first_batch_top0.05_share']:.3f} | "
                     f"{s['top0.01_overlap']:.3f} | {s['top0.05_overlap']:.3f} |")
    lines.append("| *uniform / chance* |  | 0.010 | 0.050 | 0.010 | 0.050 | 0.010 | 0.050 |")
    return "\n".join(lines)


def quality_table(q: dict) -> str:
    """Mean ± std over seeds, and for SIFT the paired difference to LoRA at the same count
    (same seed = same batches in the same order), which removes the data-order variance."""
    runs = {(r["method"], r["seed"]): r["heldout_loss"] for r in q["runs"]}
    loras = [s for s in q["summary"] if s["kind"] == "lora"]
    lines = ["| method | trainable | held-out loss (mean ± std) | Δ vs before | paired Δ vs LoRA (mean ± std) "
             "| per seed |", "|---|---:|---:|---:|---:|---|"]
    base = q["base_heldout_loss"]
    lines.append(f"| before fine-tuning | 0 | {base:.4f} | 0 | | |")
    for s in sorted(q["summary"], key=lambda s: (s["kind"] != "full", s["trainable_entries"], s["method"])):
        paired = ""
        if s["kind"] == "sift" and loras:
            lora = min(loras, key=lambda x: abs(x["trainable_entries"] - s["trainable_entries"]))
            d = [runs[(s["method"], seed)] - runs[(lora["method"], seed)] for seed in q["config"]["seeds"]]
            sd = statistics.stdev(d) if len(d) > 1 else 0.0
            paired = f"{statistics.fmean(d):+.4f} ± {sd:.4f} ({lora['method']})"
        lines.append(f"| {s['method']} | {s['trainable_entries'] / 1e6:,.2f} M | {s['mean']:.4f} ± {s['std']:.4f} | "
                     f"{s['mean'] - base:+.4f} | {paired} | {', '.join(f'{x:.4f}' for x in s['losses'])} |")
    return "\n".join(lines)


def lr_probe_table(q: dict) -> str:
    lines = ["| family (probed at the largest budget, seed 0) | learning rate | validation loss | chosen |",
             "|---|---:|---:|:-:|"]
    for r in q["lr_probe"]:
        chosen = "✓" if q["lrs"][r["kind"]] == r["lr"] else ""
        lines.append(f"| {r['method']} | {r['lr']:.0e} | {r['heldout_loss']:.4f} | {chosen} |")
    return "\n".join(lines)


def tables(d: Path) -> dict[str, str]:
    out = {}
    for stage in ("memory", "memory_ckpt", "memory_wide"):
        m = _load(d, stage)
        if m:
            out[stage] = memory_table(m)
            out[stage + "_breakdown"] = breakdown_table(m)
            if stage == "memory":
                out["goals"] = goals_table(m)
    plan = _load(d, "plan")
    if plan:
        out["plan_7b"] = plan_table(plan, "llama-7b")
        out["plan_13b"] = plan_table(plan, "llama-13b")
    sp = _load(d, "sparsity")
    if sp:
        out["sparsity"] = sparsity_table(sp)
    q = _load(d, "quality")
    if q:
        out["quality"] = quality_table(q)
        out["lr_probe"] = lr_probe_table(q)
    run = _load(d, "run")
    if run:
        mc = run["machine_start"]
        stages = ", ".join(f"{k} {v / 60:.1f} min" for k, v in run["stages"].items())
        out["machine"] = (f"{mc['cpu']}, {mc['cores']} cores ({mc['torch_threads']} torch threads), "
                          f"{mc['ram_bytes'] / GIB:.0f} GiB RAM, torch {mc['torch']}, Python {mc['python']}; "
                          f"load average at start {mc['loadavg'][0]:.1f}, "
                          f"at end {run['machine_end']['loadavg'][0]:.1f}. "
                          f"Wall time {run['seconds'] / 60:.1f} min ({stages}).")
    return out


def figures(d: Path, outdir: Path):
    outdir.mkdir(exist_ok=True)
    m = _load(d, "memory")
    if m:
        plots.memory_figure(m, outdir / "memory_smollm2.png")
        if m["timed_steps"]:
            plots.speed_figure(m, outdir / "speed_smollm2.png")
    for stage in ("memory_ckpt", "memory_wide"):
        mm = _load(d, stage)
        if mm:
            plots.memory_figure(mm, outdir / f"{stage}.png")
    plan = _load(d, "plan")
    if plan:
        plots.plan_figure(plan, outdir / "plan_llama7b.png")
    q = _load(d, "quality")
    if q:
        plots.quality_figure(q, outdir / "quality.png")
    sp = _load(d, "sparsity")
    if sp:
        plots.sparsity_figure(sp, outdir / "sparsity.png")


def refresh_readme(readme: Path, sections: dict[str, str]):
    text = readme.read_text()
    for name, body in sections.items():
        pattern = re.compile(rf"(<!-- BEGIN {re.escape(name)} -->\n).*?(<!-- END {re.escape(name)} -->)", re.S)
        text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    readme.write_text(text)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    d = Path(argv[0]) if argv else HERE / "results"
    figures(d, HERE / "plots")
    sections = tables(d)
    readme = HERE / "README.md"
    if readme.exists():
        refresh_readme(readme, sections)
    else:
        print("\n\n".join(f"## {k}\n\n{v}" for k, v in sections.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
