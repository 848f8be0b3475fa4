"""MT-bench single-answer grading, as fastchat/llm_judge/gen_judgment.py --mode single does it.

Turn 1 is graded with `single-v1` (or `single-math-v1` + the reference answer for math, reasoning and
coding), turn 2 with the `-multi-turn` variants that show the whole conversation. The rating is the
first `[[x]]` in the judge's reply, else the first `[x]`; none gives score -1 (kept, reported,
never averaged). Each finished judgment is appended to the output file at once, so a crash or
Ctrl-C loses nothing; a rerun skips what is judged and redoes API failures.
"""
from __future__ import annotations

import ast
import json
import re
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from eval.common import atomic_write_jsonl, read_jsonl
from eval.judge_client import ChatClient, JudgeAPIError, redact_all
from eval.mt_bench_data import API_ERROR_OUTPUT, NEED_REF_CATS, SINGLE_JUDGES, answer_turns

# fastchat/llm_judge/common.py
ONE_SCORE_PATTERN = re.compile(r"\[\[(\d+\.?\d*)\]\]")
ONE_SCORE_PATTERN_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


@dataclass(frozen=True)
class Match:
    question: dict
    model: str
    answer: dict
    prompt: dict                     # one row of judge_prompts.jsonl
    ref_answer: dict | None
    multi_turn: bool

    @property
    def turn(self) -> int:
        return 2 if self.multi_turn else 1


def judgment_key(question_id: int, model: str, turn: int, judge) -> tuple:
    return question_id, model, turn, tuple(judge)


def make_matches(questions: list[dict], answers: dict[str, dict[int, dict]], prompts: dict[str, dict],
                 refs: dict[int, dict]) -> list[Match]:
    """In FastChat's order: general turn 1, reference-based turn 1, then the same for turn 2."""
    matches = []
    for multi_turn in (False, True):
        for ref_based in (False, True):
            prompt = prompts[SINGLE_JUDGES[(ref_based, multi_turn)]]
            for q in questions:
                if (q["category"] in NEED_REF_CATS) != ref_based or (multi_turn and len(q["turns"]) != 2):
                    continue
                for model, rows in answers.items():
                    if q["question_id"] not in rows:  # not answered yet: nothing to judge
                        continue
                    matches.append(Match(q, model, rows[q["question_id"]], prompt,
                                         refs[q["question_id"]] if ref_based else None, multi_turn))
    return matches


def user_prompt(match: Match) -> str:
    kwargs = {}
    if match.ref_answer is not None:
        ref = answer_turns(match.ref_answer)
        kwargs = {"ref_answer_1": ref[0], "ref_answer_2": ref[1] if len(ref) > 1 else ""}
    q, a = match.question["turns"], answer_turns(match.answer)
    template = match.prompt["prompt_template"]
    if match.multi_turn:
        return template.format(question_1=q[0], question_2=q[1], answer_1=a[0], answer_2=a[1], **kwargs)
    return template.format(question=q[0], answer=a[0], **kwargs)


def parse_rating(judgment: str) -> int | float:
    """FastChat's rule: first `[[x]]`, else first `[x]`, else -1."""
    match = ONE_SCORE_PATTERN.search(judgment) or ONE_SCORE_PATTERN_BACKUP.search(judgment)
    return ast.literal_eval(match.group(1)) if match else -1


def judge_one(client: ChatClient, match: Match, max_tokens: int) -> dict:
    if match.prompt["output_format"] != "[[rating]]":
        raise ValueError(f"judge prompt {match.prompt['name']}: output format {match.prompt['output_format']!r} "
                         "is not a single rating")
    prompt = user_prompt(match)
    messages = [{"role": "system", "content": match.prompt["system_prompt"]}, {"role": "user", "content": prompt}]
    row = {"question_id": match.question["question_id"], "model": match.model,
           "judge": [client.model, match.prompt["name"]], "user_prompt": prompt}
    try:
        judgment = client.complete(messages, temperature=0.0, max_tokens=max_tokens)
        row.update(judgment=judgment, score=parse_rating(judgment))
    except JudgeAPIError as e:       # recorded like FastChat ($ERROR$, -1) with the cause; redone on resume
        row.update(judgment=API_ERROR_OUTPUT, score=-1, error=str(e))
    row.update(turn=match.turn, tstamp=time.time())
    return redact_all(row, client.api_key)  # every field, whatever put the key there


def load_judgments(path: str | Path) -> dict[tuple, dict]:
    """{key: row}, the last row per key winning; a torn last line (crash mid-append) is dropped."""
    if not Path(path).exists():
        return {}
    rows = {}
    for line, r in read_jsonl(path, tolerate_torn_tail=True):
        try:
            rows[judgment_key(r["question_id"], r["model"], r["turn"], r["judge"])] = r
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}:{line}: not a single-mode judgment row ({e})") from e
    return rows


def say(message: str) -> None:
    """A line on stderr that does not tear a progress bar."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def run_judging(client: ChatClient, matches: list[Match], output_file: str | Path, parallel: int = 4,
                max_tokens: int = 2048, progress=None, stop_after: int = 5) -> dict[tuple, dict]:
    """Judge the matches not already in `output_file` (API failures there are redone); returns all rows.
    Each failed judgment is said on stderr as it lands; `stop_after` failures in a row (0: never)
    stop the run with a JudgeAPIError, keeping what is done: a judge that is down or answers garbage
    is not asked about every question."""
    done = load_judgments(output_file)

    def pending(m: Match) -> bool:
        row = done.get(judgment_key(m.question["question_id"], m.model, m.turn, (client.model, m.prompt["name"])))
        return row is None or row["judgment"] == API_ERROR_OUTPUT

    todo = [m for m in matches if pending(m)]
    print(f"{len(matches)} judgments wanted, {len(matches) - len(todo)} already in {output_file}, "
          f"{len(todo)} to run with {parallel} in parallel")
    _write_canonical(output_file, done)  # drops a torn last line before anything is appended after it
    lock, failures, stopped = threading.Lock(), [0], threading.Event()  # failures in a row, as they land

    def work(match: Match) -> None:
        if stopped.is_set():         # a worker that started before the stop asks nothing more
            return
        row = judge_one(client, match, max_tokens)
        with lock:                   # one write of one whole line: a crash tears at most the last line
            with open(output_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            done[judgment_key(row["question_id"], row["model"], row["turn"], row["judge"])] = row
            if progress is not None:
                progress.update(1)
            failures[0] = failures[0] + 1 if row.get("error") else 0
            if row.get("error"):
                say(f"judge failed on model {row['model']}, question {row['question_id']}, turn {row['turn']}: "
                    f"{row['error']}")
            if stop_after and failures[0] >= stop_after and not stopped.is_set():
                stopped.set()
                raise JudgeAPIError(f"{failures[0]} judgments in a row failed, stopping (the last: {row['error']}): "
                                    "check --judge_base_url, --judge_model and the endpoint, then rerun; finished "
                                    "judgments are kept")

    pool = ThreadPoolExecutor(max_workers=parallel)
    futures = [pool.submit(work, m) for m in todo]
    try:
        finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((f for f in finished if f.exception() is not None), None)
        if failed is not None:       # e.g. JudgeConfigError (bad key or URL): stop, keep what is done
            raise failed.exception()
    finally:                         # also on Ctrl-C: drop the queue, let the requests in flight land
        pool.shutdown(wait=True, cancel_futures=True)
    _write_canonical(output_file, done)  # the appends came in completion order
    return done


def _write_canonical(output_file: str | Path, rows: dict[tuple, dict]) -> None:
    """One row per key, sorted by model, turn, question."""
    atomic_write_jsonl(output_file, sorted(rows.values(), key=lambda r: (r["model"], r["turn"], r["question_id"],
                                                                       r["judge"][1])))
