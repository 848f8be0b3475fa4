"""Third-party startup warnings that do not concern the run, silenced before their libraries load.

bitsandbytes logs at import that its optional CPU 4-bit kernel package (`kernels`) is missing: it
matters only to a 4-bit (--quantization) run on the CPU. DeepSpeed logs at import that it fell back
to the CPU accelerator: it matters only to a --deepspeed run. Both are dropped by message, through a
logging filter, so every other warning of those libraries still shows.
"""
from __future__ import annotations

import logging
import os

_BNB_KERNELS = ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward")
_DS_ACCELERATOR = ("DeepSpeed", "Setting accelerator to CPU")


class _DropMessage(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


def silence_unrelated_warnings(argv: list[str]) -> None:
    """From the raw command line (and an options file first on it), before anything is parsed: a
    word that names the feature keeps its warning."""
    text = " ".join(argv)
    if argv and argv[0].endswith((".yaml", ".yml", ".json")) and os.path.isfile(argv[0]):
        try:
            with open(argv[0], encoding="utf-8", errors="replace") as f:
                text += " " + f.read()
        except OSError:
            pass  # the parser reports it
    for (logger, start), feature in ((_BNB_KERNELS, "quantization"), (_DS_ACCELERATOR, "deepspeed")):
        if feature not in text:
            logging.getLogger(logger).addFilter(_DropMessage(start))
