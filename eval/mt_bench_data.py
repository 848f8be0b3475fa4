"""MT-bench files in FastChat's formats (fastchat/llm_judge), read with validation.

    question.jsonl               {question_id, category, turns: [t1, t2], reference?}
    model_answer/<model>.jsonl   {question_id, answer_id, model_id, choices: [{index, turns: [a1, a2]}], tstamp}
    reference_answer/gpt-4.jsonl same shape as an answer file
    judge_prompts.jsonl          {name, type, system_prompt, prompt_template, category, output_format}
    model_judgment/<judge>_single.jsonl
                                 {question_id, model, judge: [judge model, prompt name], user_prompt,
                                  judgment, score, turn, tstamp}
"""
from __future__ import annotations

from pathlib import Path

from eval.common import DATA_DIR, raise_if_problems, read_jsonl

BENCH_DIR = DATA_DIR / "mt_bench"
DEFAULT_QUESTION_FILE = BENCH_DIR / "question.jsonl"
DEFAULT_JUDGE_FILE = BENCH_DIR / "judge_prompts.jsonl"
DEFAULT_REF_ANSWER_FILE = BENCH_DIR / "reference_answer" / "gpt-4.jsonl"

# fastchat/llm_judge/common.py
NEED_REF_CATS = ("math", "reasoning", "coding")
TEMPERATURE_CONFIG = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                      "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}
DEFAULT_TEMPERATURE = 0.7            # FastChat's value for a category not in the table
API_ERROR_OUTPUT = "$ERROR$"         # FastChat's judgment text when the judge API never answered
SINGLE_JUDGES = {                    # (reference-based, multi-turn) -> FastChat prompt name
    (False, False): "single-v1", (True, False): "single-math-v1",
    (False, True): "single-v1-multi-turn", (True, True): "single-math-v1-multi-turn"}


def answer_turns(obj: dict) -> list[str] | None:
    """choices[0].turns of an answer row, None if it has none (FastChat grades the first choice)."""
    choices = obj.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    turns = choices[0].get("turns")
    return turns if isinstance(turns, list) and all(isinstance(t, str) for t in turns) else None


def load_questions(path: str | Path) -> list[dict]:
    questions, seen, problems = [], set(), []
    for line, q in read_jsonl(path):
        where = f"{path}:{line}"
        if not isinstance(q.get("question_id"), int):
            problems.append(f"{where}: question_id must be an integer, got {q.get('question_id')!r}")
        elif q["question_id"] in seen:
            problems.append(f"{where}: duplicate question_id {q['question_id']}")
        if not isinstance(q.get("category"), str):
            problems.append(f"{where}: category must be a string")
        if not (isinstance(q.get("turns"), list) and q["turns"] and all(isinstance(t, str) for t in q["turns"])):
            problems.append(f"{where}: turns must be a non-empty list of strings")
        seen.add(q.get("question_id"))
        questions.append(q)
    raise_if_problems(problems, f"malformed question file {path}")
    if not questions:
        raise ValueError(f"{path}: no questions")
    return questions


def load_answer_file(path: str | Path, tolerate_torn_tail: bool = False) -> dict[int, dict]:
    """{question_id: row}; a later row for the same question replaces an earlier one."""
    answers, problems = {}, []
    for line, a in read_jsonl(path, tolerate_torn_tail=tolerate_torn_tail):
        if not isinstance(a.get("question_id"), int) or answer_turns(a) is None:
            problems.append(f"{path}:{line}: needs an integer question_id and choices[0].turns (list of strings)")
            continue
        answers[a["question_id"]] = a
    raise_if_problems(problems, f"malformed answer file {path}")
    return answers


def load_model_answers(answer_dir: str | Path, models: list[str] | None = None) -> dict[str, dict[int, dict]]:
    """{model id: {question_id: answer}} for model_answer/<model id>.jsonl (all, or `models`)."""
    answer_dir = Path(answer_dir)
    available = sorted(p.name[: -len(".jsonl")] for p in answer_dir.glob("*.jsonl"))
    wanted = models or available
    missing = [m for m in wanted if m not in available]
    if missing or not wanted:
        raise FileNotFoundError(f"{answer_dir}: no answer file for {missing or 'any model'}; found {available}")
    return {m: load_answer_file(answer_dir / f"{m}.jsonl") for m in wanted}


def load_judge_prompts(path: str | Path) -> dict[str, dict]:
    prompts, problems = {}, []
    for line, p in read_jsonl(path):
        keys = ("name", "type", "system_prompt", "prompt_template", "output_format")
        absent = [k for k in keys if not isinstance(p.get(k), str)]
        if absent:
            problems.append(f"{path}:{line}: missing string field(s) {absent}")
            continue
        prompts[p["name"]] = p
    absent = [n for n in SINGLE_JUDGES.values() if n not in prompts]
    if absent:
        problems.append(f"{path}: lacks the single-answer prompts {absent}")
    raise_if_problems(problems, f"malformed judge prompt file {path}")
    return prompts


def check_answers(questions: list[dict], answers: dict[str, dict[int, dict]], refs: dict[int, dict]) -> dict[str, int]:
    """Every answer has as many turns as its question; every question that needs a reference (math /
    reasoning / coding) has one. All gaps reported at once. A question a model has not answered yet
    (a partial answer file, e.g. from `gen --question_end`) is no error: it is not judged. Returns
    {model: questions it answered}."""
    problems, answered = [], {model: 0 for model in answers}
    for q in questions:
        qid = q["question_id"]
        for model, rows in answers.items():
            if qid not in rows:
                continue
            answered[model] += 1
            if len(answer_turns(rows[qid])) < len(q["turns"]):
                problems.append(f"model {model}: question {qid} has {len(answer_turns(rows[qid]))} answer "
                                f"turn(s), the question {len(q['turns'])}")
        if q["category"] in NEED_REF_CATS:
            if qid not in refs:
                problems.append(f"question {qid} ({q['category']}): no reference answer")
            elif len(answer_turns(refs[qid])) < len(q["turns"]):
                problems.append(f"question {qid}: the reference answer has fewer turns than the question")
    raise_if_problems(problems, "answers do not cover the questions")
    return answered
