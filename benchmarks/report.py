"""README tables and plots of result files. TABLES maps a stage to a function of its result
document returning {section: markdown}; section "" is the main one, written between
`<!-- BEGIN STAGE--NAME -->` and `<!-- END STAGE--NAME -->` in benchmarks/README.md, headed by the
command and stamp that made it, followed by the experiment's plots. Other sections go between
`<!-- BEGIN STAGE--NAME SECTION -->` markers. The prose around the markers is written by hand."""
from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from . import plots, zero_plan
from .constants import MIB
from .memory_plan import render_table


def _f(x, fmt):
    return "–" if x is None else format(x, fmt)


def source_line(doc: dict) -> str:
    """Which command made this result, at which commit, on what, when (and what the stamp notes)."""
    st = doc["stamp"]
    dev = st.get("device", {})
    where = dev.get("gpu") or f"{dev.get('cpu', '?')}, {dev.get('cores', '?')} cores"
    parts = [f"`{st['command']}`", f"commit {str(st.get('commit'))[:7]}" + (" + uncommitted changes"
                                                                            if st.get("dirty") else ""),
             where, f"torch {dev['torch']}" if dev.get("torch") else None, st.get("date", "")[:10],
             f"{st['seconds'] / 60:.1f} min" if st.get("seconds") else None]
    line = "Made by " + " · ".join(p for p in parts if p)
    return line + (f". *{st['note']}*" if st.get("note") else "")


def memory_sections(doc: dict) -> dict[str, str]:
    m = doc["result"]
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
    out = {"": "\n".join(lines), "breakdown": breakdown_table(m)}
    if timed:
        out["goals"] = goals_table(m)
    return out


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


def sparsity_sections(doc: dict) -> dict[str, str]:
    sp = doc["result"]
    lines = ["| module | tensors | top 1 % share | top 5 % share | batch-1 top 1 % on later batches | "
             "batch-1 top 5 % on later batches | top 1 % overlap | top 5 % overlap |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    rows = list(sp["by_module"].items()) + [("**all**", sp["overall"])]
    for name, s in rows:
        lines.append(f"| {name} | {s['tensors']} | {s['top0.01_share']:.3f} | {s['top0.05_share']:.3f} | "
                     f"{s['first_batch_top0.01_share']:.3f} | {s['first_batch_top0.05_share']:.3f} | "
                     f"{s['top0.01_overlap']:.3f} | {s['top0.05_overlap']:.3f} |")
    lines.append("| *uniform / chance* |  | 0.010 | 0.050 | 0.010 | 0.050 | 0.010 | 0.050 |")
    return {"": "\n".join(lines)}


def quality_sections(doc: dict) -> dict[str, str]:
    """Mean ± std over seeds, and for SIFT the paired difference to LoRA at the same count
    (same seed = same batches in the same order), which removes the data-order variance."""
    q = doc["result"]
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
    probe = ["| family (probed at the largest budget, seed 0) | learning rate | validation loss | chosen |",
             "|---|---:|---:|:-:|"]
    for r in q["lr_probe"]:
        chosen = "✓" if q["lrs"][r["kind"]] == r["lr"] else ""
        probe.append(f"| {r['method']} | {r['lr']:.0e} | {r['heldout_loss']:.4f} | {chosen} |")
    return {"": "\n".join(lines), "lr_probe": "\n".join(probe)}


def qsift_quality_sections(doc: dict) -> dict[str, str]:
    """One row per method: held-out loss per seed and the mean."""
    results = doc["result"]
    lines = ["| method | trainable | lr | held-out loss per seed | mean |", "|---|---:|---:|---|---:|"]
    for s in results["summary"]:
        rs = [r for r in results["runs"] if r["method"] == s["method"]]
        per_seed = ", ".join(f"{r['heldout_loss']:.4f} (seed {r['seed']})" for r in rs)
        lines.append(f"| {s['method']} | {s['trainable_entries'] / 1e6:.2f} M | {rs[0]['lr']:g} | {per_seed} | "
                     f"**{s['mean']:.4f}** |")
    return {"": "\n".join(lines)}


def regrow_quality_sections(doc: dict) -> dict[str, str]:
    """Per method: held-out Alpaca and ShareGPT losses after training (mean, per seed), the paired
    difference to its reference (same seed: same data order and first selection) with its range over
    seeds, and the ShareGPT change from before (forgetting); the learning-rate sweep apart."""
    res = doc["result"]

    def cell(row, key):
        d = row.get(f"{key}_paired")
        return "" if d is None else f"{d:+.4f} [{row[f'{key}_paired_spread'][0]:+.4f}, {row[f'{key}_paired_spread'][1]:+.4f}]"

    lines = ["| method | trainable | lr | Alpaca held-out after (per seed) | paired Δ [range] | vs | "
             "ShareGPT after (per seed) | ShareGPT Δ vs before | paired Δ [range] | min / run |",
             "|---|---:|---:|---|---:|---|---|---:|---:|---:|"]
    summary = res["summary"]
    bases = {}  # (held-out, other) loss before training -> the methods starting there
    for method, row in summary.items():
        bases.setdefault((row["heldout_before"], row["other_before"]), []).append(method)
    for (heldout, other), methods in bases.items():
        lines.append(f"| before fine-tuning ({', '.join(methods)}) | 0 | | {heldout:.4f} | | | {other:.4f} | | | |")
    for method, row in summary.items():
        per = {key: ", ".join(f"{r['after'][f'{key}_loss']:.4f}" for r in sorted(res["runs"].values(),
                                                                                  key=lambda r: r["seed"])
                              if r["method"] == method) for key in ("heldout", "other")}
        lines.append(f"| {method} | {row['trained_entries'] / 1e6:.2f} M | {row['lr']:g} | **{row['heldout_after']:.4f}** "
                     f"({per['heldout']}) | {cell(row, 'heldout')} | {row.get('vs', '')} | **{row['other_after']:.4f}** "
                     f"({per['other']}) | {row['other_after'] - row['other_before']:+.4f} | {cell(row, 'other')} | "
                     f"{row['minutes']:.0f} |")
    if "compute" in res:
        lines.append(f"\nCompute: {res['compute']['runs']} runs (sweep included), "
                     f"{res['compute']['seconds'] / 3600:.1f} h in all, kept in the study's work directory; "
                     f"this table is regenerated from them in seconds.")
    sweep = ["| method | learning rate | validation loss after the sweep | chosen |", "|---|---:|---:|:-:|"]
    for r in sorted(res["sweep"].values(), key=lambda r: (r["method"], r["lr"])):
        sweep.append(f"| {r['method']} | {r['lr']:g} | {r['after']['heldout_loss']:.4f} | "
                     f"{'✓' if res['lrs'].get(r['method']) == r['lr'] else ''} |")
    return {"": "\n".join(lines), "lr_sweep": "\n".join(sweep)}


def core_speed_sections(doc: dict) -> dict[str, str]:
    lines = ["| weights | method | median step (s) | x floor (wall) | x floor (CPU time) | bitsandbytes update "
             "alone / floor | peak (MiB) | extra peak B / entry | state B / entry |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in doc["result"]["rows"]:
        extra = f"{r['extra_peak_bytes_per_entry']:.2f}" if r["entries"] else ""
        state = f"{r['state_bytes_per_entry']:.2f}" if r["state_bytes_per_entry"] else ""
        bnb = f"{r['bnb_update_vs_floor']:.3f}" if r["bnb_update_vs_floor"] else ""
        lines.append(f"| {r['dtype']} | {r['name']} | {r['median_step_s']:.3f} | {r['time_vs_floor']:.3f} | "
                     f"{r['cpu_time_vs_floor']:.3f} | {bnb} | {r['peak_bytes'] / MIB:.1f} | {extra} | {state} |")
    return {"": "\n".join(lines)}


def packing_sections(doc: dict) -> dict[str, str]:
    res = doc["result"]
    lines = ["| run | steps | label tokens | label tokens / s | per CPU s | padding share | held-out loss before → "
             "after | wall |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {'`--packing`' if r['packing'] else 'padded'} | {r['steps']} | {r['label_tokens']:,} | "
                     f"{r['label_tokens_per_s']:.1f} | {r['label_tokens_per_cpu_s']:.1f} | {r['padding_share']:.1%} | "
                     f"{r['heldout_loss_before']:.4f} → {r['heldout_loss_after']:.4f} | {r['wall_s']:.0f} s |")
    plain, packed = sorted(res["rows"], key=lambda r: r["packing"])
    lines.append(f"| **ratio** | | {packed['label_tokens'] / plain['label_tokens']:.2f} × | "
                 f"**{res['label_tokens_per_s_ratio']:.2f} ×** | {res['label_tokens_per_cpu_s_ratio']:.2f} × | | | |")
    return {"": "\n".join(lines)}


def packing_counts_sections(doc: dict) -> dict[str, str]:
    def per(r, key):
        return r["label_tokens"] / r[key]

    lines = ["| --model_max_length | loader | steps / epoch | label tokens / step | grid tokens / step "
             "| padding share | label tokens / grid token | packed / padded: label tokens per step | "
             "per grid token | per FLOP |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows = doc["result"]["rows"]
    for padded, packed in zip(rows[::2], rows[1::2]):
        ratios = [f"{per(packed, key) / per(padded, key):.2f} ×" for key in ("steps", "grid_tokens", "flops")]
        for r in (padded, packed):
            cells = [str(r["model_max_length"]), "packed" if r["packing"] else "padded", str(r["steps"]),
                     f"{per(r, 'steps'):,.0f}", f"{r['grid_tokens'] / r['steps']:,.0f}",
                     f"{1 - r['real_tokens'] / r['grid_tokens']:.1%}", f"{per(r, 'grid_tokens'):.3f}",
                     *(ratios if r is packed else ["", "", ""])]
            lines.append("| " + " | ".join(cells) + " |")
    return {"": "\n".join(lines)}


def gpu_sections(doc: dict) -> dict[str, str]:
    res = doc["result"]
    lines = ["| model | method | planned (GiB) | measured, later steps (GiB) | first step (GiB) | measured − planned "
             "| step (s) | kernels / step |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in res.get("rows", []):
        vs = r.get("measured_vs_plan")
        lines.append(f"| {r.get('model', 'llama-7b')} | {r['method']} | {_f(r.get('planned_peak_gib'), '.2f')} | "
                     f"{r['peak_later_steps_gib']:.2f} | {r['peak_first_step_gib']:.2f} | "
                     f"{'–' if vs is None else f'{vs:+.1%}'} | {r['step_s']:.3f} | "
                     f"{_f(r.get('kernel_launches_per_step'), ',')} |")
    return {"": "\n".join(lines)}


def plan_sections(doc: dict) -> dict[str, str]:
    """The one-rank table; under ZeRO-3 (`zero`) also the per-rank one (benchmarks.zero_plan)."""
    rows = doc["result"]["rows"]
    if "zero3" not in rows[0]:
        return {"": render_table(rows)}
    zero = rows[0]["zero3"]["zero"]
    return {"": render_table(rows) + f"\n\nPer rank under ZeRO-3 on {rows[0]['zero3']['world_size']} ranks "
                                    f"(`{zero['config']}`; GiB; composed from the rows above and DeepSpeed's "
                                    "buffers, benchmarks/zero_plan.py):\n\n" + zero_plan.render(rows)}


TABLES = {"memory": memory_sections, "plan": plan_sections, "sparsity": sparsity_sections,
          "quality": quality_sections, "qsift_quality": qsift_quality_sections, "core_speed": core_speed_sections,
          "regrow_quality": regrow_quality_sections,
          "packing": packing_sections, "packing_counts": packing_counts_sections, "gpu": gpu_sections}


def render(doc: dict, plots_dir: Path) -> dict[str, str]:
    """Draw the document's figures into `plots_dir`; its README sections, keyed by marker name."""
    slug = doc["experiment"].replace("/", "--")
    images = []
    plots_dir.mkdir(parents=True, exist_ok=True)
    for suffix, figure in plots.FIGURES.get(doc["stage"], {}).items():
        fig = figure(doc)
        if fig is not None:
            plots.save(fig, plots_dir / f"{slug}{suffix}.png")
            images.append(f"![{slug}{suffix}](plots/{slug}{suffix}.png)")
    sections = TABLES[doc["stage"]](doc) if doc["stage"] in TABLES else {"": ""}
    main = [source_line(doc), sections.pop("")] + images
    return {slug: "\n\n".join(p for p in main if p),
            **{f"{slug} {name}": body for name, body in sections.items()}}


def index(results_dir: Path) -> str:
    """Every result: what made it, when, and its wall time; and the total a full regeneration takes."""
    lines = ["| result | command | commit | date | wall time | how it was made |", "|---|---|---|---|---:|---|"]
    total, unknown = 0.0, 0
    for path in sorted(results_dir.glob("*.json")):
        doc = json.loads(path.read_text())
        st = doc.get("stamp", {"command": "(no stamp)"})
        seconds = cost_seconds(doc)
        total += seconds or 0
        unknown += seconds is None
        how = "kept from before the driver" if st.get("note") else "rerun by the driver"
        lines.append(f"| `results/{path.name}` | `{st['command']}` | {str(st.get('commit'))[:7]} | "
                     f"{st.get('date', '')[:10]} | {_minutes(seconds)} | {how} |")
    lines.append(f"| **all** | `python -m benchmarks.run '*'` | | | **{total / 3600:.1f} h** | "
                 f"+ {unknown} without a recorded wall time |")
    return "\n".join(lines)


def cost_seconds(doc: dict) -> float | None:
    """What the result took to make from nothing: its kept runs' compute where it reuses kept runs
    (result["compute"]), else the wall time in its stamp."""
    res = doc.get("result")
    kept = res.get("compute", {}).get("seconds") if isinstance(res, dict) else None
    return kept if kept is not None else doc.get("stamp", {}).get("seconds")


def _minutes(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds / 60:.1f} min"


def refresh_readme(readme: Path, sections: dict[str, str]) -> list[str]:
    """Replace each section's marked block in `readme`; the names that have no markers there."""
    text = readme.read_text()
    missing = []
    for name, body in sections.items():
        pattern = re.compile(rf"(<!-- BEGIN {re.escape(name)} -->\n).*?(<!-- END {re.escape(name)} -->)", re.S)
        text, n = pattern.subn(lambda m: m.group(1) + body + "\n" + m.group(2), text)
        if not n:
            missing.append(name)
    from common.atomic import atomic_write

    atomic_write(readme, [text])
    return missing
