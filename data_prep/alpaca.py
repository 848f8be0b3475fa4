"""Convert Alpaca instruction data into unified chat JSONL.

    python -m data_prep.alpaca alpaca_data.json [more.json ...] -o alpaca.jsonl
    python -m data_prep.alpaca tatsu-lab/alpaca -o alpaca.jsonl          # a hub dataset

Each record `{"instruction", "input"?, "output", "system"?}` becomes one user/assistant round; the
user message is the instruction, then a blank line and the input when there is one. Bad records
are reported with file and line and skipped (`--strict`: the first one stops the run); duplicates
are dropped unless `--keep_duplicates`. To train with Stanford's exact `prompt_input` (which keeps
instruction and input apart), give the trainer the raw Alpaca file instead of this output.
"""
from __future__ import annotations

import sys

from .cli import base_parser, convert


def main(argv: list[str] | None = None) -> int:
    args = base_parser("python -m data_prep.alpaca", __doc__).parse_args(argv)
    return convert(args, fmt="alpaca")


if __name__ == "__main__":
    sys.exit(main())
