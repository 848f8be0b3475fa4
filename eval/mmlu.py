"""MMLU (Hendrycks et al., ICLR 2021) with the original protocol of hendrycks/test.

    python eval/mmlu.py                                   # embedded SmolLM2-135M-Instruct, 57 subjects, 5-shot
    python eval/mmlu.py --model out/run1/merged --output_dir out/run1/mmlu
    python eval/mmlu.py --model huggyllama/llama-7b --increment out/run1/sift_increment.safetensors
    python eval/mmlu.py --ntrain 0 --subjects anatomy virology   # the paper's zero-shot, two subjects

k-shot prompts from the first k dev rows (fewer if the prompt exceeds the context), the answer =
argmax of the next-token logits of the four letters as they are tokenized after "Answer:" in
context. Writes <output_dir>/mmlu_results.json (micro accuracy, per subject / subcategory / category)
and mmlu_predictions.csv (one row per question), then prints the tables.
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python eval/mmlu.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.quiet import silence_unrelated_warnings  # noqa: E402

silence_unrelated_warnings(sys.argv[1:])  # before bitsandbytes / DeepSpeed load and log

from common.inputs import dir_problem, output_problem  # noqa: E402
from eval.common import ModelArgs, atomic_write_text, context_length, load_eval_model, raise_if_problems  # noqa: E402
from eval.mmlu_data import CHOICES, DEFAULT_DATA_DIR, Subject, load_hub, load_local  # noqa: E402
from eval.mmlu_forward import next_token_logits  # noqa: E402
from eval.mmlu_prompts import answer_token_ids, encode, render, render_answered  # noqa: E402
from eval.mmlu_report import Prediction, aggregate, format_table, predictions_csv, write_outputs  # noqa: E402
from common.modeling import EMBEDDED  # noqa: E402


@dataclass
class MMLUArgs(ModelArgs):
    output_dir: str = field(default="outputs/mmlu", metadata={"help": "where the result files go"})
    data_dir: str = field(default=str(DEFAULT_DATA_DIR), metadata={
        "help": "directory with dev/<subject>_dev.csv and test/<subject>_test.csv (hendrycks layout); "
                "default: the copy shipped in eval/data/mmlu"})
    hf_dataset: str | None = field(default=None, metadata={
        "help": "load from the hub through `datasets` instead of --data_dir, e.g. cais/mmlu"})
    ntrain: int = field(default=5, metadata={"help": "few-shot examples per prompt (0 = the paper's zero-shot)"})
    subjects: list[str] | None = field(default=None, metadata={"help": "restrict to these subjects"})
    limit: int | None = field(default=None, metadata={
        "help": "only the first N test questions per subject (smoke runs; not an MMLU number)"})
    chat_template: bool = field(default=False, metadata={
        "help": "wrap the prompt in the tokenizer's chat template (shots as turns); off = the protocol"})
    max_length: int | None = field(default=None, metadata={
        "help": "context limit for the k-shrinking; default: the model's max_position_embeddings"})
    max_batch_tokens: int = field(default=16384, metadata={
        "help": "per forward: rows x (shared prefix + longest row), bounds activation/KV memory"})
    max_batch_size: int = field(default=16, metadata={"help": "rows per forward at most (raise on a GPU)"})
    prefix_cache: bool = field(default=True, metadata={
        "help": "run the few-shot prefix shared by a subject's prompts once (exact; --no_prefix_cache "
                "runs every full prompt, e.g. for architectures without a DynamicCache)"})

    def __post_init__(self):
        problems = self.model_problems()
        if self.ntrain < 0:
            problems.append(f"--ntrain must be >= 0, got {self.ntrain}")
        if self.limit is not None and self.limit < 1:
            problems.append(f"--limit must be >= 1, got {self.limit}")
        if self.max_length is not None and self.max_length < 8:
            problems.append(f"--max_length must be >= 8, got {self.max_length}")
        if self.max_batch_tokens < 1 or self.max_batch_size < 1:
            problems.append("--max_batch_tokens and --max_batch_size must be >= 1")
        if self.hf_dataset is None and not Path(self.data_dir, "test").is_dir():
            problems.append(dir_problem("--data_dir", self.data_dir) or f"--data_dir {self.data_dir}: no test/ subdirectory")
        if self.hf_dataset and not Path(self.hf_dataset).exists():
            from common.hub import hub_problem

            hub = hub_problem(self.hf_dataset, "dataset")
            problems += [f"--hf_dataset {self.hf_dataset}: {hub}"] if hub else []
        problem = output_problem("--output_dir", self.output_dir)  # found now, not after the whole evaluation
        raise_if_problems(problems + [problem] if problem else problems, "invalid MMLU arguments")


def fit_prompts(tokenizer, subject: Subject, ntrain: int, chat: bool, max_length: int):
    """Per test question: (shots k, token ids, truncated). k starts at ntrain and shrinks while the
    prompt exceeds max_length, as the reference does; a question too long even at k = 0 keeps its
    last max_length tokens (the end holds the options and "Answer:")."""
    seqs = encode(tokenizer, [render(tokenizer, subject.dev, q, ntrain, chat) for q in subject.test], chat)
    out = []
    for q, ids in zip(subject.test, seqs):
        k = ntrain
        while len(ids) > max_length and k > 0:
            k -= 1
            ids = encode(tokenizer, [render(tokenizer, subject.dev, q, k, chat)], chat)[0]
        out.append((k, ids[-max_length:], len(ids) > max_length))
    return out


def evaluate_subject(model, tokenizer, subject: Subject, args: MMLUArgs, max_length: int, pad_id: int,
                     progress) -> list[Prediction]:
    fitted = fit_prompts(tokenizer, subject, args.ntrain, args.chat_template, max_length)
    predictions = [None] * len(fitted)
    for k in sorted({k for k, _, _ in fitted}, reverse=True):  # one shared prefix per shot count
        members = [i for i, (kk, _, _) in enumerate(fitted) if kk == k]
        first = subject.test[members[0]]
        letters = answer_token_ids(
            tokenizer, render(tokenizer, subject.dev, first, k, args.chat_template),
            [render_answered(tokenizer, subject.dev, first, k, args.chat_template, c) for c in CHOICES],
            args.chat_template)
        logits = next_token_logits(model, [fitted[i][1] for i in members], letters, pad_id,
                                   prefix_cache=args.prefix_cache, max_batch_tokens=args.max_batch_tokens,
                                   max_batch_size=args.max_batch_size, on_batch=progress.update)
        probs = logits.softmax(-1)
        for row, i in enumerate(members):
            q = subject.test[i]
            predictions[i] = Prediction(q.subject, q.index, CHOICES[int(probs[row].argmax())], q.answer,
                                        tuple(probs[row].tolist()), k, fitted[i][2])
    return predictions


def main(argv: list[str] | None = None) -> dict:
    from tqdm import tqdm
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(MMLUArgs).parse_args_into_dataclasses(args=argv)
    start = time.time()
    subjects = load_hub(args.hf_dataset, args.subjects) if args.hf_dataset else load_local(args.data_dir, args.subjects)
    short = [s.name for s in subjects if len(s.dev) < args.ntrain]
    if short:
        raise ValueError(f"--ntrain {args.ntrain}: fewer dev examples than that in {short}")
    if args.limit:
        subjects = [Subject(s.name, s.dev, s.test[: args.limit]) for s in subjects]
    # SDPA, not flash-attention-2: the masks of prefix-cached batches (pads between the shared prefix
    # and each question) are what the tests verify, and SDPA takes any mask
    model, tokenizer = load_eval_model(args.model, args.increment, args.device, args.dtype, "sdpa", args.force,
                                       quantization=args.quantization)
    if args.chat_template and not tokenizer.chat_template:
        raise ValueError(f"--chat_template: the tokenizer of {args.model or 'the embedded model'} has none")
    max_length = args.max_length or context_length(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    print(f"MMLU: {len(subjects)} subjects, {sum(len(s.test) for s in subjects)} questions, "
          f"{args.ntrain}-shot, {'chat template' if args.chat_template else 'plain prompts (protocol)'}, "
          f"context {max_length}, {model.device} {model.dtype}")

    predictions = []
    partial = Path(args.output_dir, "mmlu_predictions.partial.csv")
    with tqdm(total=sum(len(s.test) for s in subjects), unit="q", dynamic_ncols=True) as progress:
        for subject in subjects:
            progress.set_description(subject.name)
            predictions += evaluate_subject(model, tokenizer, subject, args, max_length, pad_id, progress)
            progress.set_postfix(acc=f"{sum(p.correct for p in predictions) / len(predictions):.4f}")
            atomic_write_text(partial, predictions_csv(predictions))  # progress survives an interrupted run

    results = aggregate(predictions)
    truncated = sum(p.truncated for p in predictions)
    results.update(ntrain=args.ntrain, chat_template=args.chat_template,
                   num_fewer_shots=sum(p.shots < args.ntrain for p in predictions),
                   num_truncated=truncated, model=args.model or EMBEDDED,
                   increment=args.increment, max_length=max_length, wall_time_s=round(time.time() - start, 1),
                   args=asdict(args))
    # the documented keys first, provenance after
    order = ["accuracy", "num_questions", "ntrain", "subjects", "subcategories", "categories"]
    results = {k: results[k] for k in order} | {k: v for k, v in results.items() if k not in order}
    write_outputs(args.output_dir, results, predictions)
    partial.unlink(missing_ok=True)
    print(format_table(results))
    if truncated:
        print(f"warning: {truncated} prompts exceeded {max_length} tokens even 0-shot and were left-truncated")
    print(f"wrote {args.output_dir}/mmlu_results.json and mmlu_predictions.csv ({results['wall_time_s']} s)")
    return results


if __name__ == "__main__":
    from common import cli

    # bad input (options, data files, an increment that does not fit) as one line and exit 2
    sys.exit(cli.run(main, errors=(ValueError, OSError), prog="mmlu.py"))
