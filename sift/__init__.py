"""SIFT core: sparse increment fine-tuning (Song et al., ICML 2024). See docs/DESIGN.md."""
import sys as _sys

if _sys.argv[:1] == ["-m"]:  # `python -m sift.export` imports this first: quiet bitsandbytes before it loads
    from common.quiet import silence_unrelated_warnings

    silence_unrelated_warnings(_sys.argv[1:])
from .config import SIFTConfig
from .increment import FILENAME, IncrementError, apply_increment, load_increment, save_increment
from .optimizer import SIFT

__all__ = ["SIFT", "SIFTConfig", "FILENAME", "IncrementError", "apply_increment", "load_increment",
           "save_increment"]
