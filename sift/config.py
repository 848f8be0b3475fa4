"""SIFTConfig: the one place where SIFT's options are defined and checked."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .selection import RULES

OPTIMIZERS = ("adamw8bit", "adamw")
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class SIFTConfig:
    rate: float = field(default=0.05, metadata={"help": "fraction of each target tensor's entries trained, 0 < rate <= 1"})
    targets: tuple[str, ...] = field(default=LLAMA_LINEARS, metadata={"help": "module names (dotted path components) whose weights are trained sparsely"})
    dense: tuple[str, ...] = field(default=(), metadata={"help": "parameter-name substrings trained densely (e.g. 'norm')"})
    selection: str = field(default="grad", metadata={"help": "a rule of sift.selection.RULES: grad (top-|grad| of the first micro-batch, the paper) | random | magnitude"})
    optimizer: str = field(default="adamw8bit", metadata={"help": "adamw8bit (8-bit blockwise moments) | adamw (fp32 moments)"})
    lr: float = field(default=2e-5, metadata={"help": "learning rate (param_groups[0]['lr'], so schedulers work)"})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "AdamW betas"})
    eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    weight_decay: float = field(default=0.0, metadata={"help": "decoupled weight decay, selected entries only"})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "global L2 clipping over all sparse and dense grads; None = off"})
    step_in_backward: bool = field(default=False, metadata={"help": "update inside each hook; no accumulation buffers, no global clipping"})
    seed: int = field(default=0, metadata={"help": "seed of the torch.Generator used by random selection"})

    def __post_init__(self):
        self.targets, self.dense, self.betas = tuple(self.targets), tuple(self.dense), tuple(self.betas)
        problems = self.problems()
        if problems:
            raise ValueError("invalid SIFTConfig:\n  - " + "\n  - ".join(f"{f}={getattr(self, f)!r}: {msg}"
                                                                       for f, msg in problems))

    def problems(self) -> list[tuple[str, str]]:
        """Every inconsistency at once, as (field name, what to change): the CLI translates the
        field names to its flag names, so this is the one place these rules are written."""
        out = []
        if not 0.0 < self.rate <= 1.0:
            out.append(("rate", "must be in (0, 1], e.g. 0.05 for 5 % of each target's entries"))
        if self.selection not in RULES:
            out.append(("selection", f"choose one of {', '.join(RULES)}"))
        if self.optimizer not in OPTIMIZERS:
            out.append(("optimizer", f"choose one of {', '.join(OPTIMIZERS)}"))
        if not self.targets and not self.dense:
            out.append(("targets", "targets and dense are both empty: name at least one module to train"))
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            out.append(("betas", "two values in [0, 1)"))
        if not (math.isfinite(self.lr) and self.lr > 0):
            out.append(("lr", "must be a finite number > 0, e.g. 2e-4"))
        if not (math.isfinite(self.eps) and self.eps > 0):
            out.append(("eps", "must be a finite number > 0"))
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            out.append(("weight_decay", "must be a finite number >= 0"))
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            out.append(("max_grad_norm", "a finite positive number, or None to disable clipping"))
        if self.step_in_backward and self.max_grad_norm is not None:
            out.append(("step_in_backward", "cannot clip by the global norm (each tensor steps before the "
                        "others' gradients exist): set max_grad_norm=None, or step_in_backward=False"))
        return out

    def to_dict(self) -> dict:
        return asdict(self)
