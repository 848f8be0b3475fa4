"""SIGINT / SIGTERM end a run at the next step boundary, with a checkpoint, instead of mid-step.

The first signal only sets a flag (a handler that saved from inside a half-done backward would save
a half-done step); the loop checks it once per optimizer step, writes a checkpoint, prints where and
how to resume, and exits 128 + the signal number (130 for Ctrl-C, 143 for a scheduler's SIGTERM), as
a shell reports a process the signal killed. A second signal means "now": exit at once, without a
checkpoint (the last complete one stays; a half-written one is only a temp directory that the next
start removes). Outside the step loop (`raising`) a signal stops the process where it is, as
Signalled, which the recipe turns into run.json's "interrupted", a line and 128 + the signal number.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupts:
    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def install(self) -> "Interrupts":
        if threading.current_thread() is not threading.main_thread():
            return self  # Python delivers signals to the main thread only: its handlers stay as they are
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            os._exit(128 + signum)  # the user insists: no cleanup that could hang (e.g. a collective)
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint at the end of this step "
              "(send it again to exit at once, without one)", file=sys.stderr, flush=True)

    def requested(self, distributed: bool = False) -> bool:
        """Has any rank been signalled? With several ranks, every rank must stop at the same step
        (a rank that left alone would hang the others' collectives): one tiny all-reduce per step."""
        if not distributed:
            return self.signum is not None
        import torch
        import torch.distributed as dist

        flag = torch.tensor([self.signum or 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if self.signum is None and int(flag):
            self.signum = int(flag)
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or 0)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


class Signalled(KeyboardInterrupt):
    """SIGINT or SIGTERM outside the step loop (start-up, the final save): the process stops where it
    is. A KeyboardInterrupt, so whatever handles Ctrl-C handles it; `signum` says which signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise(signum, frame):
    raise Signalled(signum)


@contextmanager
def raising():
    """For the block, SIGINT and SIGTERM raise Signalled where the process is (the step loop's
    Interrupts replace this while it runs): without it a SIGTERM would end the process with no word
    and no status in run.json."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _raise) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
