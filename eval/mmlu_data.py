"""MMLU questions from the standard CSVs (hendrycks/test layout) or from the hub (`cais/mmlu`).

The CSVs are read with the csv module, not pandas: `pd.read_csv` turns the 10 answer options that
read "None" into NaN, which the reference code then prints as "nan".
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from eval.common import DATA_DIR, raise_if_problems

CHOICES = ("A", "B", "C", "D")
DEFAULT_DATA_DIR = DATA_DIR / "mmlu"


@dataclass(frozen=True)
class Question:
    subject: str
    index: int                       # row in its split, 0-based
    question: str
    choices: tuple[str, str, str, str]
    answer: str                      # "A" .. "D"


@dataclass(frozen=True)
class Subject:
    name: str
    dev: list[Question]              # few-shot pool, in file order (the protocol takes the first k)
    test: list[Question]


def read_split(path: Path, subject: str) -> list[Question]:
    """Rows of `question,A,B,C,D,answer` without a header; errors name the file and line."""
    questions, problems = [], []
    with open(path, newline="", encoding="utf-8") as f:
        reader, start = csv.reader(f), 1
        for row in reader:
            where = f"{path}:{start}"
            start = reader.line_num + 1  # a quoted field may span lines; the next record starts here
            if len(row) != 6:
                problems.append(f"{where}: expected 6 fields (question, A, B, C, D, answer), got {len(row)}")
            elif row[5].strip() not in CHOICES:
                problems.append(f"{where}: field 6 (answer) is {row[5]!r}, expected one of A/B/C/D")
            else:
                questions.append(Question(subject, len(questions), row[0], tuple(row[1:5]), row[5].strip()))
    raise_if_problems(problems, f"malformed MMLU file {path}")
    return questions


def available_subjects(data_dir: str | Path) -> list[str]:
    test_dir = Path(data_dir) / "test"
    if not test_dir.is_dir():
        raise FileNotFoundError(f"--data_dir {data_dir}: no test/ directory of <subject>_test.csv files")
    return sorted(p.name[: -len("_test.csv")] for p in test_dir.glob("*_test.csv"))


def select_subjects(available: list[str], wanted: list[str] | None) -> list[str]:
    if not wanted:
        return available
    unknown = [s for s in wanted if s not in available]
    if unknown:
        raise ValueError(f"--subjects: unknown {unknown}; available: {', '.join(available)}")
    return [s for s in available if s in wanted]


def load_local(data_dir: str | Path, subjects: list[str] | None = None) -> list[Subject]:
    data_dir = Path(data_dir)
    out = []
    for name in select_subjects(available_subjects(data_dir), subjects):
        dev_path = data_dir / "dev" / f"{name}_dev.csv"
        if not dev_path.is_file():
            raise FileNotFoundError(f"{dev_path}: missing (the few-shot examples of {name})")
        out.append(Subject(name, read_split(dev_path, name),
                           read_split(data_dir / "test" / f"{name}_test.csv", name)))
    return out


def questions_from_records(records, subject: str, source: str) -> list[Question]:
    """`cais/mmlu` rows ({question, choices: [4], answer: 0..3}) as Questions."""
    out, problems = [], []
    for i, r in enumerate(records):
        if len(r["choices"]) != 4 or not 0 <= int(r["answer"]) < 4:
            problems.append(f"{source} row {i}: needs 4 choices and an answer index in 0..3, got {r}")
            continue
        out.append(Question(subject, len(out), r["question"], tuple(r["choices"]), CHOICES[int(r["answer"])]))
    raise_if_problems(problems, f"malformed MMLU records in {source}")
    return out


def load_hub(name: str, subjects: list[str] | None = None) -> list[Subject]:
    """From the hub through `datasets` (config "all", splits dev and test; needs network or cache)."""
    from datasets import load_dataset

    splits = {split: load_dataset(name, "all", split=split) for split in ("dev", "test")}
    by_subject = {split: {} for split in splits}
    for split, ds in splits.items():
        for row in ds:
            by_subject[split].setdefault(row["subject"], []).append(row)
    out = []
    for subject in select_subjects(sorted(by_subject["test"]), subjects):
        out.append(Subject(subject,
                           questions_from_records(by_subject["dev"].get(subject, []), subject, f"{name}/dev"),
                           questions_from_records(by_subject["test"][subject], subject, f"{name}/test")))
    return out
