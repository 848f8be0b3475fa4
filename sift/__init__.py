"""SIFT core: sparse increment fine-tuning (Song et al., ICML 2024). See docs/DESIGN.md."""
from .config import SIFTConfig
from .increment import FILENAME, IncrementError, apply_increment, load_increment, save_increment
from .optimizer import SIFT

__all__ = ["SIFT", "SIFTConfig", "FILENAME", "IncrementError", "apply_increment", "load_increment",
           "save_increment"]
