"""Plumbing shared by the converter commands: common arguments, read → clean → write, the summary.

Output is written atomically (a temporary file in the same directory, fsynced, then renamed), so
an interrupted run never leaves a half-written JSONL where a complete one is expected. The summary
(`report.Report.to_dict()` plus the command's options) goes to `<output without suffix>.summary.json`
and is printed. Exit status: 0 written, 1 bad data (strict mode, an unreadable JSON file, or no
conversation left: then nothing is written, an existing output stays), 2 missing input or an output
that would overwrite an input (or is a directory).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from common.atomic import atomic_write

from .clean import deduplicate
from .formats import iter_conversations
from .report import DataError, Report


def base_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="IN",
                        help="JSON or JSONL files, or hub dataset ids (owner/name)")
    parser.add_argument("-o", "--output", required=True,
                        help="unified JSONL to write; the summary goes next to it as <name>.summary.json")
    parser.add_argument("--split", default="train", help="split to read from hub datasets")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first bad record instead of skipping and counting it")
    parser.add_argument("--keep_duplicates", action="store_true",
                        help="keep conversations whose id or messages repeat an earlier one")
    return parser


def convert(args: argparse.Namespace, fmt: str, role_map: dict[str, str] | None = None,
            transform: Callable[[str], str] | None = None,
            postprocess: Callable[[list[dict], Report], list[dict]] | None = None) -> int:
    """Run the pipeline for parsed `args`; returns the exit status."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    problem = output_problem(args.inputs, Path(args.output))
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    report = Report(strict=args.strict)
    try:
        items = list(iter_conversations(args.inputs, report, fmt=fmt, role_map=role_map,
                                        transform=transform, split=args.split))
        if not args.keep_duplicates:
            items = deduplicate(items, report)
        conversations = [conv for _, conv in items]
        if postprocess is not None:
            conversations = postprocess(conversations, report)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report.kept = len(conversations)
    output = Path(args.output)
    if not conversations:
        print(report.summary())
        print(f"error: no usable conversation in {', '.join(map(str, args.inputs))}: nothing written to {output}",
              file=sys.stderr)
        return 1
    atomic_write(output, (json.dumps(unified_record(c), ensure_ascii=False) + "\n" for c in conversations))
    summary = {"format": fmt, "inputs": args.inputs, "output": str(output), **report.to_dict(),
               "options": {k: v for k, v in vars(args).items() if k not in ("inputs", "output")}}
    atomic_write(summary_path(output), [json.dumps(summary, indent=2, ensure_ascii=False) + "\n"])
    print(report.summary())
    print(f"wrote {len(conversations)} conversations to {output} (summary: {summary_path(output)})")
    return 0


def output_problem(inputs: list[str], output: Path) -> str | None:
    """Refuse an output (or its summary) that is one of the inputs: the atomic rename would replace
    the data with its own conversion."""
    from common.inputs import output_problem as writable_problem

    problem = writable_problem("-o", output, "file")
    if problem:
        return problem
    targets = {output.resolve(), summary_path(output).resolve()}
    for source in inputs:
        if Path(source).exists() and Path(source).resolve() in targets:
            return f"-o {output}: would overwrite the input {source}: write the output to another file"
    return None


def unified_record(conv: dict) -> dict:
    """The unified JSONL record: id, messages with role and content only, source."""
    return {"id": conv["id"], "messages": [{"role": m["role"], "content": m["content"]} for m in conv["messages"]],
            "source": conv["source"]}


def summary_path(output: Path) -> Path:
    return output.with_name(output.stem + ".summary.json")


