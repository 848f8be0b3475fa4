"""Clean ShareGPT conversations and convert them into unified chat JSONL.

    python -m data_prep.sharegpt sharegpt.json [more.json ...] -o sharegpt.jsonl \\
        [--html_to_markdown] [--max_tokens 2048 [--model_name_or_path PATH_OR_HUB_ID] [--template auto]] \\
        [--role_map function_call=assistant observation=user] [--keep_duplicates] [--strict]

Steps, in order (FastChat's clean_sharegpt / split_long_conversation are the reference):
1. parse and validate: `from` mapped (human/user → user; gpt/assistant/chatgpt/bard/bing/model →
   assistant; system → system; `--role_map` adds names); unknown roles, missing fields and wrong
   types drop the record with file and line;
2. `--html_to_markdown`: scraped HTML → markdown (data_prep.clean.html_to_markdown);
3. turns made canonical (data_prep.conversation.normalize): a leading system message is kept;
   empty turns removed; consecutive same-role turns merged; leading assistant turns and a
   trailing unanswered user turn removed; conversations without a complete round dropped;
4. duplicates dropped (same id, or same messages) unless `--keep_duplicates`;
5. `--max_tokens N`: conversations longer than N tokens, as the trainer will encode them with the
   tokenizer of `--model_name_or_path` (default: the embedded SmolLM2) and `--template`, are split
   into chunks of whole rounds; the final round is kept, no chunk starts with an assistant turn.
A summary with the count per drop reason and per change is printed and saved next to the output.
"""
from __future__ import annotations

import sys

from .cli import base_parser, convert
from .clean import html_to_markdown, split_conversation
from .conversation import ROLES
from .templates import TEMPLATES


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("python -m data_prep.sharegpt", __doc__)
    parser.add_argument("--html_to_markdown", action="store_true",
                        help="convert scraped HTML message bodies to markdown")
    parser.add_argument("--role_map", nargs="+", default=[], metavar="FROM=ROLE",
                        help="extra `from` names, e.g. function_call=assistant observation=user")
    parser.add_argument("--max_tokens", type=int, default=None,
                        help="split conversations into chunks of whole rounds within this many tokens")
    parser.add_argument("--model_name_or_path", default=None,
                        help="tokenizer that --max_tokens counts with (default: the embedded SmolLM2)")
    parser.add_argument("--template", default="auto", choices=TEMPLATES,
                        help="prompt format that --max_tokens counts with")
    args = parser.parse_args(argv)

    problems, role_map = [], {}
    for item in args.role_map:
        name, _, role = item.partition("=")
        if not name or role not in ROLES:
            problems.append(f"--role_map {item!r}: expected FROM=ROLE with ROLE one of {', '.join(ROLES)}")
        role_map[name] = role
    if args.max_tokens is not None and args.max_tokens < 1:
        problems.append(f"--max_tokens must be positive, got {args.max_tokens}")
    if args.max_tokens is not None:  # the tokenizer is read only to count: checked before any data is
        from common.inputs import model_problem

        problem = model_problem("--model_name_or_path", args.model_name_or_path, tokenizer_only=True)
        if problem:
            problems.append(problem)
    if problems:
        parser.error("; ".join(problems))

    postprocess = None
    if args.max_tokens is not None:
        postprocess = _splitter(args.max_tokens, args.model_name_or_path, args.template)
    return convert(args, fmt="sharegpt", role_map=role_map,
                   transform=html_to_markdown if args.html_to_markdown else None, postprocess=postprocess)


def _splitter(max_tokens: int, model_name_or_path: str | None, template: str):
    from transformers import AutoTokenizer

    from common.modeling import resolve_model_path

    from .encode import encoded_length

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model_name_or_path))

    def count(messages: list[dict]) -> int:
        return encoded_length(messages, tokenizer, template)

    def split_all(conversations: list[dict], report) -> list[dict]:
        return [chunk for conv in conversations for chunk in split_conversation(conv, max_tokens, count, report)]

    return split_all


if __name__ == "__main__":
    sys.exit(main())
