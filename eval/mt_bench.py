"""MT-bench (Zheng et al., 2023): answers from our models, grades from an LLM judge, FastChat's files.

    python eval/mt_bench.py gen   [--model DIR|HUB_ID] [--increment FILE] [--model_id NAME]
    python eval/mt_bench.py judge --judge_model gpt-4 [--judge_base_url URL] [--model_list A B]
    python eval/mt_bench.py show  [--judge_model gpt-4] [--model_list A B]
All three take --question_begin / --question_end (a subset, e.g. for a smoke run); `judge` judges the
answers there are and says which are missing.

Layout under --output_dir (default outputs/mt_bench), as FastChat's data/mt_bench/:
    model_answer/<model_id>.jsonl  model_judgment/<judge>_single.jsonl  mt_bench_results.json  *.png
The judge is any OpenAI-compatible chat-completions endpoint; its key is read from the environment
variable named by --judge_api_key_env (default OPENAI_API_KEY) and is never printed or written.
Nothing asks for confirmation: every step runs unattended and can be rerun to resume.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python eval/mt_bench.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.quiet import silence_unrelated_warnings  # noqa: E402

silence_unrelated_warnings(sys.argv[1:])  # before bitsandbytes / DeepSpeed load and log

from common import cli  # noqa: E402
from common.inputs import file_problem, output_problem  # noqa: E402
from data_prep.templates import TEMPLATES  # noqa: E402
from eval.common import ModelArgs, atomic_write_json, raise_if_problems  # noqa: E402
from eval.judge_client import JudgeAPIError, JudgeConfigError, key_problem  # noqa: E402
from eval.mt_bench_data import (DEFAULT_JUDGE_FILE, DEFAULT_QUESTION_FILE, DEFAULT_REF_ANSWER_FILE,  # noqa: E402
                                load_questions)

OUTPUT_DIR = "outputs/mt_bench"


def _judgment_file(output_dir: str, judge_model: str) -> str:
    return f"{output_dir}/model_judgment/{judge_model.replace('/', '_')}_single.jsonl"


@dataclass
class QuestionRange:
    """The same subset flags for gen, judge and show (FastChat's gen_model_answer names)."""
    question_begin: int | None = field(default=None, metadata={"help": "debug: first question index"})
    question_end: int | None = field(default=None, metadata={"help": "debug: one past the last question index"})

    def range_problems(self) -> list[str]:
        out = [f"--{name} must be >= 0, got {getattr(self, name)}" for name in ("question_begin", "question_end")
               if getattr(self, name) is not None and getattr(self, name) < 0]
        if not out and None not in (self.question_begin, self.question_end) and self.question_begin >= self.question_end:
            out.append(f"--question_begin {self.question_begin} is not below --question_end {self.question_end}: "
                       "that selects no question")
        return out

    def questions(self, question_file: str) -> list[dict]:
        questions = load_questions(question_file)
        chosen = questions[self.question_begin: self.question_end]
        if not chosen:
            raise ValueError(f"--question_begin {self.question_begin} / --question_end {self.question_end}: select none "
                             f"of the {len(questions)} questions in {question_file}")
        return chosen


@dataclass
class GenArgs(ModelArgs, QuestionRange):
    model_id: str | None = field(default=None, metadata={
        "help": "name of the answer file and the `model_id` field; default: from --model / --increment"})
    output_dir: str = field(default=OUTPUT_DIR, metadata={"help": "bench directory (model_answer/ goes here)"})
    question_file: str = field(default=str(DEFAULT_QUESTION_FILE), metadata={
        "help": "questions in FastChat's format; default: the 80 MT-bench questions shipped in eval/data"})
    max_new_tokens: int = field(default=1024, metadata={"help": "per turn (FastChat's default)"})
    batch_size: int = field(default=8, metadata={"help": "conversations generated together"})
    seed: int = field(default=0, metadata={"help": "sampling seed (writing/roleplay/stem/humanities sample)"})
    template: str = field(default="auto", metadata={
        "help": "prompt format, as train_sft.py uses it: chat (the tokenizer's chat template) | alpaca (the "
                "Stanford Alpaca prompt, for tuned base models) | auto (chat if the tokenizer has one)"})

    def __post_init__(self):
        problems = self.model_problems() + self.range_problems()
        if self.max_new_tokens < 1 or self.batch_size < 1:
            problems.append("--max_new_tokens and --batch_size must be >= 1")
        if self.template not in TEMPLATES:
            problems.append(f"--template must be one of {', '.join(TEMPLATES)}, got {self.template!r}")
        problems += [p for p in (file_problem("--question_file", self.question_file),
                                 output_problem("--output_dir", self.output_dir)) if p]
        raise_if_problems(problems, "invalid gen arguments")


@dataclass
class JudgeArgs(QuestionRange):
    judge_model: str = field(default="gpt-4", metadata={"help": "model name sent to the endpoint (FastChat: gpt-4)"})
    judge_base_url: str | None = field(default=None, metadata={
        "help": "OpenAI-compatible base URL (.../v1); default: $OPENAI_BASE_URL, else https://api.openai.com/v1"})
    judge_api_key_env: str = field(default="OPENAI_API_KEY", metadata={
        "help": "environment variable holding the API key (unset: no Authorization header, e.g. local vLLM)"})
    output_dir: str = field(default=OUTPUT_DIR, metadata={"help": "bench directory with model_answer/"})
    model_list: list[str] | None = field(default=None, metadata={
        "help": "model ids to judge; default: all answer files"})
    question_file: str = field(default=str(DEFAULT_QUESTION_FILE), metadata={"help": "the questions"})
    judge_file: str = field(default=str(DEFAULT_JUDGE_FILE), metadata={"help": "FastChat's judge_prompts.jsonl"})
    ref_answer_file: str = field(default=str(DEFAULT_REF_ANSWER_FILE), metadata={
        "help": "reference answers for math / reasoning / coding (FastChat's GPT-4 ones)"})
    parallel: int = field(default=4, metadata={"help": "concurrent API requests at most"})
    max_tokens: int = field(default=2048, metadata={"help": "judge reply length limit (FastChat: 2048)"})
    max_retries: int = field(default=8, metadata={"help": "retries per request on 429 / 5xx / network errors"})
    retry_base_delay: float = field(default=2.0, metadata={"help": "first backoff in seconds, doubled per retry"})
    retry_max_delay: float = field(default=60.0, metadata={"help": "longest backoff in seconds"})
    timeout: float = field(default=120.0, metadata={"help": "seconds per HTTP request"})
    max_consecutive_failures: int = field(default=5, metadata={
        "help": "stop after this many judgments in a row failed (after their retries), e.g. a judge that is down "
                "or answers garbage; 0 = never stop. Each failure is said on stderr as it happens"})

    def __post_init__(self):
        self.judge_base_url = self.judge_base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        problems = self.range_problems()
        if self.parallel < 1 or self.max_tokens < 1 or self.max_retries < 0 or self.max_consecutive_failures < 0:
            problems.append("--parallel and --max_tokens must be >= 1, --max_retries and --max_consecutive_failures >= 0")
        if not self.judge_base_url.startswith(("http://", "https://")):
            problems.append(f"--judge_base_url must be an http(s) URL, got {self.judge_base_url!r}")
        problems += [p for p in (file_problem(f"--{name}", getattr(self, name))
                                 for name in ("question_file", "judge_file", "ref_answer_file")) if p]
        if not Path(self.output_dir, "model_answer").is_dir():
            problems.append(output_problem("--output_dir", self.output_dir)
                            or f"--output_dir {self.output_dir}: no model_answer/ (run `gen` first)")
        key = key_problem(os.environ.get(self.judge_api_key_env))
        if key:  # before any request: http.client would put the key, in clear, into its error message
            problems.append(f"${self.judge_api_key_env}: the API key {key}")
        raise_if_problems(problems, "invalid judge arguments")


@dataclass
class ShowArgs(QuestionRange):
    judge_model: str = field(default="gpt-4", metadata={"help": "selects model_judgment/<judge>_single.jsonl"})
    output_dir: str = field(default=OUTPUT_DIR, metadata={"help": "bench directory; results and plots go here"})
    input_file: str | None = field(default=None, metadata={"help": "a judgment file to read instead"})
    model_list: list[str] | None = field(default=None, metadata={"help": "models to show; default: all judged"})
    question_file: str = field(default=str(DEFAULT_QUESTION_FILE), metadata={"help": "for the categories"})
    plot: bool = field(default=True, metadata={"help": "write the radar and bar PNGs (--no_plot to skip)"})

    def __post_init__(self):
        problems = self.range_problems() + [p for p in (
            file_problem("--question_file", self.question_file), output_problem("--output_dir", self.output_dir),
            self.input_file and file_problem("--input_file", self.input_file)) if p]
        raise_if_problems(problems, "invalid show arguments")


def run_gen(args: GenArgs) -> int:
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from data_prep.templates import resolve_template
    from eval.common import context_length, default_model_id, load_eval_model
    from eval.mt_bench_gen import generate_answers
    from common.modeling import resolve_model_path

    questions = args.questions(args.question_file)
    model_id = args.model_id or default_model_id(args.model, args.increment)
    # the prompt format is settled from the tokenizer alone, before a multi-GB model load
    template = resolve_template(AutoTokenizer.from_pretrained(resolve_model_path(args.model)), args.template)
    model, tokenizer = load_eval_model(args.model, args.increment, args.device, args.dtype, force=args.force,
                                       quantization=args.quantization)
    answer_file = f"{args.output_dir}/model_answer/{model_id}.jsonl"
    print(f"{model_id}: {template} prompts, {model.device} {model.dtype}")
    with tqdm(total=len(questions), unit="question", dynamic_ncols=True, desc=model_id) as progress:
        generate_answers(model, tokenizer, questions, answer_file, model_id, template, args.max_new_tokens,
                         args.batch_size, args.seed, context_length(model, tokenizer), progress)
    print(f"wrote {answer_file}")
    return 0


def run_judge(args: JudgeArgs) -> int:
    from tqdm import tqdm

    from eval.judge_client import ChatClient
    from eval.mt_bench_data import check_answers, load_answer_file, load_judge_prompts, load_model_answers
    from eval.mt_bench_judge import make_matches, run_judging, say

    questions = args.questions(args.question_file)
    answers = load_model_answers(f"{args.output_dir}/model_answer", args.model_list)
    refs = load_answer_file(args.ref_answer_file)
    prompts = load_judge_prompts(args.judge_file)
    for model, n in check_answers(questions, answers, refs).items():
        if n < len(questions):
            print(f"note: model {model} answered {n} of the {len(questions)} questions; judging those "
                  "(run `gen` to answer the rest)")
    matches = make_matches(questions, answers, prompts, refs)
    client = ChatClient(args.judge_base_url, args.judge_model, os.environ.get(args.judge_api_key_env) or None,
                        timeout=args.timeout, max_retries=args.max_retries, base_delay=args.retry_base_delay,
                        max_delay=args.retry_max_delay, warn=lambda m: say(f"judge: {m}"))
    if client.api_key is None:
        print(f"note: ${args.judge_api_key_env} is not set; sending requests without an API key")
    output_file = _judgment_file(args.output_dir, args.judge_model)
    print(f"judge {args.judge_model} at {args.judge_base_url}: models {list(answers)}, "
          f"{len(questions)} questions, {len(matches)} judgments -> {output_file}")
    with tqdm(total=len(matches), unit="judgment", dynamic_ncols=True) as progress:
        rows = run_judging(client, matches, output_file, args.parallel, args.max_tokens, progress,
                           args.max_consecutive_failures)
    wanted = {(m.question["question_id"], m.model, m.turn) for m in matches}
    mine = [r for r in rows.values() if (r["question_id"], r["model"], r["turn"]) in wanted]
    api_errors = sum(r.get("error") is not None for r in mine)
    unparseable = sum(r["score"] == -1 for r in mine) - api_errors
    print(f"{len(mine)} judgments: {api_errors} API failures (rerun to retry them), "
          f"{unparseable} without a parseable rating (score -1)")
    return 1 if api_errors else 0


def run_show(args: ShowArgs) -> int:
    from eval.mt_bench_judge import load_judgments
    from eval.mt_bench_show import format_summary, plot, summarize

    input_file = args.input_file or _judgment_file(args.output_dir, args.judge_model)
    if not Path(input_file).is_file():
        raise FileNotFoundError(f"{input_file}: no judgment file (run `judge` first, or pass --input_file)")
    questions = args.questions(args.question_file)
    subset = args.question_begin is not None or args.question_end is not None
    wanted = {q["question_id"] for q in questions}  # without a subset unknown ids stay, for summarize to refuse
    rows = [r for r in load_judgments(input_file).values() if not subset or r["question_id"] in wanted]
    summary = summarize(rows, questions, args.model_list)
    print(f"Input file: {input_file}\n")
    print(format_summary(summary))
    atomic_write_json(f"{args.output_dir}/mt_bench_results.json", {"judgment_file": input_file, "models": summary})
    if args.plot:
        plot(summary, f"{args.output_dir}/mt_bench_radar.png", f"{args.output_dir}/mt_bench_scores.png")
        print(f"\nplots: {args.output_dir}/mt_bench_radar.png, {args.output_dir}/mt_bench_scores.png")
    return 0


COMMANDS = {"gen": (GenArgs, run_gen), "judge": (JudgeArgs, run_judge), "show": (ShowArgs, run_show)}


def main(argv: list[str] | None = None) -> int:
    from transformers import HfArgumentParser

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__)
        print(f"usage: mt_bench.py {{{','.join(COMMANDS)}}} [--help | options]")
        return 2
    args_cls, run = COMMANDS[argv[0]]
    parser = HfArgumentParser(args_cls, prog=f"mt_bench.py {argv[0]}")
    try:
        (args,) = parser.parse_args_into_dataclasses(args=argv[1:])
    except ValueError as e:
        raise cli.UsageError(f"mt_bench.py {argv[0]}: {e}") from None
    return run(args)


if __name__ == "__main__":
    # bad input of any kind (files, increments, a refused key) as one line and exit 2; API failures
    # of single judgments are recorded and give exit 1 from run_judge
    sys.exit(cli.run(main, errors=(ValueError, OSError, JudgeConfigError, JudgeAPIError), prog="mt_bench.py"))
