"""Bad data: the error that names where it came from, and the report that counts what was dropped.

Every problem found in input data is a `DataError` carrying a short machine-readable `reason`
(the key it is counted under) and a message that starts with the place: `file.jsonl:7` for JSON
Lines, `file.json:12 (record 3)` for a JSON array, `owner/name[train][41]` for a hub dataset, then
the field (`messages[1].role`) and what is wrong with it.

A `Report` collects them. With `strict=True` the first one is raised; otherwise it is counted under
its reason, the first few messages per reason are kept for the summary (with `verbose=True` every
one is logged as it comes), and the record is skipped. Cleaning steps that keep a record but change it (merged turns, removed empty
turns, truncation) are counted in `notes`, so nothing changes silently either.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

EXAMPLES_PER_REASON = 3


class DataError(ValueError):
    """A record (or a whole file) that cannot be used. `str(err)` is `"<where>: <detail>"`."""

    def __init__(self, reason: str, where: str, detail: str):
        super().__init__(f"{where}: {detail}")
        self.reason = reason
        self.where = where
        self.detail = detail


@dataclass
class Report:
    """Counts of a data pass. `read` records came in, `kept` went out, the rest are in `dropped`."""

    strict: bool = False
    verbose: bool = False  # log every skipped record ("skipped <where>: <detail>")
    read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def drop(self, err: DataError) -> None:
        """Raise `err` in strict mode, else count it and remember the first few messages."""
        if self.strict:
            raise err
        self.dropped[err.reason] += 1
        seen = self.examples.setdefault(err.reason, [])
        if len(seen) < EXAMPLES_PER_REASON:
            seen.append(str(err))
        if self.verbose:
            logger.warning("skipped %s", err)

    def note(self, what: str, count: int = 1) -> None:
        if count:
            self.notes[what] += count

    def to_dict(self) -> dict:
        return {"read": self.read, "kept": self.kept, "dropped": dict(sorted(self.dropped.items())),
                "notes": dict(sorted(self.notes.items())), "examples": self.examples}

    def summary(self, examples: bool = True) -> str:
        """A few human-readable lines: totals, then one line per drop reason and per note (and with
        `examples`, the first record dropped for each reason)."""
        lines = [f"read {self.read}, kept {self.kept}, dropped {sum(self.dropped.values())}"]
        lines += [f"  dropped {n:>6}  {reason}" for reason, n in sorted(self.dropped.items())]
        lines += [f"  note    {n:>6}  {what}" for what, n in sorted(self.notes.items())]
        for reason, messages in sorted(self.examples.items()) if examples else ():
            lines += [f"  e.g. [{reason}] {m}" for m in messages[:1]]
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)
