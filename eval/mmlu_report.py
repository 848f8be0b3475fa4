"""MMLU aggregation (hendrycks/test semantics) and the result files.

Every level is micro-averaged over its questions, as the reference pools the per-question
correctness of its subjects: "accuracy" is correct / all questions (the standard MMLU number), a
subcategory or category is correct / its questions, not a mean of subject accuracies.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass

from eval.common import atomic_write_json, atomic_write_text
from eval.mmlu_categories import categories as CATEGORIES
from eval.mmlu_categories import subcategories as SUBCATEGORIES
from eval.mmlu_data import CHOICES


@dataclass(frozen=True)
class Prediction:
    subject: str
    index: int
    prediction: str
    answer: str
    probs: tuple[float, float, float, float]
    shots: int                       # k actually used (fewer than --ntrain if the prompt did not fit)
    truncated: bool = False          # even 0-shot exceeded the context: left-truncated

    @property
    def correct(self) -> bool:
        return self.prediction == self.answer


def _acc(correct: int, total: int) -> dict:
    return {"accuracy": correct / total, "num_questions": total}


def aggregate(predictions: list[Prediction], subcategories: dict = SUBCATEGORIES,
              categories: dict = CATEGORIES) -> dict:
    """{"accuracy", "num_questions", "subjects", "subcategories", "categories"}; groups without an
    evaluated question are left out (the reference would print a NaN)."""
    if not predictions:
        raise ValueError("no predictions to aggregate")
    counts: dict[str, dict[str, list[int]]] = {"subjects": {}, "subcategories": {}, "categories": {}}

    def add(level: str, key: str, ok: bool) -> None:
        c = counts[level].setdefault(key, [0, 0])
        c[0] += ok
        c[1] += 1

    missing = sorted({p.subject for p in predictions if p.subject not in subcategories})
    if missing:
        raise ValueError(f"subjects without a subcategory in the MMLU mapping: {missing}")
    for p in predictions:
        add("subjects", p.subject, p.correct)
        for sub in subcategories[p.subject]:
            add("subcategories", sub, p.correct)
        for cat in {cat for sub in subcategories[p.subject] for cat, subs in categories.items() if sub in subs}:
            add("categories", cat, p.correct)
    total_correct = sum(p.correct for p in predictions)
    result = {"accuracy": total_correct / len(predictions), "num_questions": len(predictions)}
    for level, order in (("subjects", sorted(counts["subjects"])),
                         ("subcategories", list(dict.fromkeys(x for v in subcategories.values() for x in v))),
                         ("categories", list(categories))):
        result[level] = {k: _acc(*counts[level][k]) for k in order if k in counts[level]}
    return result


def predictions_csv(predictions: list[Prediction]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["subject", "index", "prediction", "answer", "correct", "shots", "truncated"]
                    + [f"prob_{c}" for c in CHOICES])
    for p in sorted(predictions, key=lambda p: (p.subject, p.index)):
        writer.writerow([p.subject, p.index, p.prediction, p.answer, int(p.correct), p.shots, int(p.truncated)]
                        + [f"{x:.6f}" for x in p.probs])
    return buf.getvalue()


def format_table(results: dict) -> str:
    lines = []
    for level in ("subjects", "subcategories", "categories"):
        rows = results[level]
        width = max(len(level), *(len(k) for k in rows))
        lines.append(f"\n{level:<{width}}  accuracy      n")
        lines += [f"{k:<{width}}  {v['accuracy'] * 100:7.2f}  {v['num_questions']:5d}" for k, v in rows.items()]
    lines.append(f"\nMMLU accuracy (micro, {results['num_questions']} questions, {results['ntrain']}-shot"
                 f"{', chat template' if results.get('chat_template') else ''}): {results['accuracy'] * 100:.2f}")
    return "\n".join(lines)


def write_outputs(output_dir: str, results: dict, predictions: list[Prediction]) -> None:
    atomic_write_text(f"{output_dir}/mmlu_predictions.csv", predictions_csv(predictions))
    atomic_write_json(f"{output_dir}/mmlu_results.json", results)
