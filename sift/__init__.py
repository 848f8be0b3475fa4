"""SIFT core: sparse increment fine-tuning (Song et al., ICML 2024).

The public names load on first use, so that `sift.atomic` (used by data_prep and eval) does not
pull in torch and bitsandbytes."""
from importlib import import_module

_EXPORTS = {"SIFT": ".optimizer", "SIFTConfig": ".config", "FILENAME": ".increment",
            "IncrementError": ".increment", "apply_increment": ".increment",
            "load_increment": ".increment", "save_increment": ".increment"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sift' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name], __name__), name)
