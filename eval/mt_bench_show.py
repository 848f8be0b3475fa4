"""MT-bench scores from a judgment file: what fastchat/llm_judge/show_result.py --mode single prints
(first turn, second turn, average over all scored judgments) plus per-category averages, the failed
judgments (score -1: API errors and unparseable replies, excluded from every mean) and plots."""
from __future__ import annotations

from statistics import mean

from eval.mt_bench_data import API_ERROR_OUTPUT


def _avg(scores: list[float]) -> float | None:
    return round(mean(scores), 4) if scores else None


def summarize(rows: list[dict], questions: list[dict], models: list[str] | None = None) -> dict:
    category = {q["question_id"]: q["category"] for q in questions}
    order = list(dict.fromkeys(q["category"] for q in questions))
    unknown = sorted({r["question_id"] for r in rows} - set(category))
    if unknown:
        raise ValueError(f"judgments for question ids not in the question file: {unknown}")
    out = {}
    for model in models or sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == model]
        if not mine:
            raise ValueError(f"no judgments for model {model!r}")
        ok = [r for r in mine if r["score"] != -1]
        api_errors = sum(r["judgment"] == API_ERROR_OUTPUT for r in mine)
        by_cat = {c: [r["score"] for r in ok if category[r["question_id"]] == c] for c in order}
        out[model] = {
            "turn_1": _avg([r["score"] for r in ok if r["turn"] == 1]),
            "turn_2": _avg([r["score"] for r in ok if r["turn"] == 2]),
            "overall": _avg([r["score"] for r in ok]),
            "num_judgments": len(mine), "num_scored": len(ok), "num_failed": len(mine) - len(ok),
            "num_api_errors": api_errors, "num_unparseable": len(mine) - len(ok) - api_errors,
            "num_out_of_range": sum(not 1 <= r["score"] <= 10 for r in ok),
            "categories": {c: _avg(s) for c, s in by_cat.items() if s},
        }
    return out


def format_summary(summary: dict) -> str:
    """Models best-first: the FastChat numbers and failures, then per-category means."""
    def cell(x, width=8):
        return f"{x:{width}.3f}" if x is not None else f"{'-':>{width}}"

    models = sorted(summary, key=lambda m: -(summary[m]["overall"] or 0))
    width = max(5, *(len(m) for m in models))
    lines = [f"{'model':<{width}}{'turn 1':>8}{'turn 2':>8}{'average':>9}{'scored':>8}  failed (api / unparseable)"]
    for m in models:
        s = summary[m]
        lines.append(f"{m:<{width}}{cell(s['turn_1'])}{cell(s['turn_2'])}{cell(s['overall'], 9)}{s['num_scored']:>8}"
                     f"  {s['num_failed']} ({s['num_api_errors']} / {s['num_unparseable']})")
    cats = list(dict.fromkeys(c for m in models for c in summary[m]["categories"]))
    lines.append("\n" + f"{'model':<{width}}" + "".join(f"{c[:11]:>12}" for c in cats))
    for m in models:
        lines.append(f"{m:<{width}}" + "".join(cell(summary[m]["categories"].get(c), 12) for c in cats))
    flagged = {m: s["num_out_of_range"] for m, s in summary.items() if s["num_out_of_range"]}
    if flagged:
        lines.append(f"\nnote: ratings outside 1-10 (kept, as FastChat does): {flagged}")
    return "\n".join(lines)


def plot(summary: dict, radar_path: str, bars_path: str) -> None:
    """A radar of per-category means (one polygon per model) and bars of turn 1 / turn 2 / average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cats = list(dict.fromkeys(c for s in summary.values() for c in s["categories"]))
    angles = np.linspace(0, 2 * np.pi, len(cats), endpoint=False).tolist()
    fig, ax = plt.subplots(figsize=(7, 7), subplot_kw={"polar": True})
    for model, s in summary.items():
        values = [s["categories"].get(c) or 0.0 for c in cats]
        ax.plot(angles + angles[:1], values + values[:1], label=model, linewidth=1.5)
        ax.fill(angles + angles[:1], values + values[:1], alpha=0.1)
    ax.set_xticks(angles, cats)
    ax.set_ylim(0, 10)
    ax.set_title("MT-bench score per category")
    ax.legend(loc="upper right", bbox_to_anchor=(1.3, 1.1), fontsize=8)
    fig.savefig(radar_path, dpi=120, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(5, 1.8 * len(summary)), 4))
    keys, x = ("turn_1", "turn_2", "overall"), np.arange(len(summary))
    for j, key in enumerate(keys):
        ax.bar(x + (j - 1) * 0.27, [s[key] or 0.0 for s in summary.values()], 0.27, label=key.replace("_", " "))
    ax.set_xticks(x, list(summary), rotation=20, ha="right")
    ax.set_ylim(0, 10)
    ax.set_ylabel("mean judge score (1-10)")
    ax.set_title("MT-bench score per turn")
    ax.legend(fontsize=8)
    fig.savefig(bars_path, dpi=120, bbox_inches="tight")
    plt.close(fig)
