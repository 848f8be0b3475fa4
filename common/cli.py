"""How every command reports a mistake the user can fix: one line naming the option or file and
what to do, exit status 2 (the usage-error convention of argparse and the shells), no traceback."""
from __future__ import annotations

import difflib
import os
import sys


class UsageError(SystemExit):
    """Bad options or input files. A SystemExit, so nothing catches it by accident on its way out;
    `run` prints it, and `str()` is the message (what tests match on)."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def problems_error(prog: str, problems: list[str]) -> UsageError:
    """Every problem at once: one line for one, a list for several."""
    if len(problems) == 1:
        return UsageError(f"{prog}: {problems[0]}")
    return UsageError(f"{prog}: invalid options:\n  - " + "\n  - ".join(problems))


def did_you_mean(word: str, choices) -> str | None:
    """The one of `choices` closest to a misspelled `word` (difflib's ratio >= 0.6), or None."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return match[0] if match else None


def run(main, *args, errors: tuple = (), prog: str = "") -> int:
    """`sys.exit(run(main))` for a command's entry point: its exit status (0 for a non-int return),
    2 with the message on stderr for a UsageError or one of `errors` (the exception types a command
    raises for bad input: its message names the file or option; SIFT_TRACEBACK=1 re-raises them), 130
    for Ctrl-C."""
    try:
        status = main(*args)
    except UsageError as e:
        print(e.message, file=sys.stderr)
        return 2
    except errors as e:
        if os.environ.get("SIFT_TRACEBACK"):
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C where nothing is in flight to save: no 85-line traceback
        print("interrupted", file=sys.stderr)
        return 130
    return status if isinstance(status, int) else 0
