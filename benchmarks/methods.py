"""The training methods the benchmarks compare, each reduced to one `train_step` on one model
(full / lora / sift built by trainer.methods and trained through trainer.loss, as train_sft.py does).

    floor          forward + backward with the target weights' gradients dropped in their hooks:
                   what any method that trains those weights must at least spend
    full           all parameters, torch AdamW (fp32 moments) or bitsandbytes AdamW8bit
    lora           PEFT LoRA on the same target modules, torch AdamW on the adapters
    original       the SIFT paper's implementation's memory profile (benchmarks/original_sift.py)
    sift           ours: sift.SIFT, deferred (`step()` after backward) or step_in_backward

Every method trains the same targets (sift.config.LLAMA_LINEARS), so trainable counts compare.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from sift.config import LLAMA_LINEARS
from sift.quantize import base_tensors, quantize_base
from sift.quantize import layers as qlayers
from sift.targets import find_trainable

from trainer import methods as trainer_methods
from trainer import offload, tiled_decoder
from trainer.loss import causal_lm_loss, unwrap

from .original_sift import OriginalSIFTProfile

KINDS = ("floor", "full", "lora", "original", "sift")
# torch AdamW (moments in the weights' dtype), bitsandbytes AdamW with fp32 / 8-bit moments
FULL_OPTIMIZERS = ("adamw", "adamw32bit", "adamw8bit")
# A planned regrow window (sift.regrow): every PLANNED_WINDOW steps with a window as long, in a run twice
# as long, so the first window opens before step 1 and outlasts every tracked step
PLANNED_WINDOW = 1000


@dataclass(frozen=True)
class Method:
    name: str
    kind: str
    optimizer: str | None = None      # full: adamw (default) | adamw32bit | adamw8bit;
                                      # sift: adamw8bit (default) | adamw
    rate: float | None = None         # sift / original: fraction of each target's entries
    rank: int | None = None           # lora
    step_in_backward: bool = False    # sift only
    selection: str = "grad"           # sift only
    lr: float = 1e-5
    quantization: str | None = None   # sift (QSIFT) / lora (QLoRA): nf4 | fp4 4-bit base of the targets
    double_quant: bool = True
    offload_activations: bool = False  # trainer.offload: saved activations in host memory
    embeddings_on_host: bool = False   # trainer.offload: the frozen input embedding table in host memory
    regrow_fraction: float | None = None  # sift only: step inside a regrow window replacing this share
    tile_tokens: int | None = None     # trainer.tiled_decoder: layers in chunks of this many tokens (0: its rule)

    def __post_init__(self):
        if self.optimizer is None:
            object.__setattr__(self, "optimizer", "adamw8bit" if self.kind == "sift" else "adamw")
        problems = []
        if self.kind not in KINDS:
            problems.append(f"kind={self.kind!r}: one of {KINDS}")
        if self.kind in ("sift", "original") and not (self.rate and 0 < self.rate <= 1):
            problems.append(f"{self.name}: rate in (0, 1] required")
        if self.kind == "lora" and not (self.rank and self.rank > 0):
            problems.append(f"{self.name}: a positive LoRA rank required")
        if self.kind == "full" and self.optimizer not in FULL_OPTIMIZERS:
            problems.append(f"{self.name}: full fine-tuning optimizer is one of {FULL_OPTIMIZERS}")
        if self.regrow_fraction is not None and self.kind != "sift":
            problems.append(f"{self.name}: a regrow window is SIFT's (and QSIFT's)")
        if self.quantization and self.kind not in ("sift", "lora"):
            problems.append(f"{self.name}: a 4-bit base is for sift (QSIFT) or lora (QLoRA)")
        if problems:
            raise ValueError("invalid Method:\n  - " + "\n  - ".join(problems))


def targets_of(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return find_trainable(model, LLAMA_LINEARS, ())[0]


def target_shape_sums(model: nn.Module) -> tuple[int, int]:
    """(sum of numel, sum of in+out features) over the target weights."""
    ts = [p for _, p in targets_of(model)]
    return sum(p.numel() for p in ts), sum(p.shape[0] + p.shape[1] for p in ts)


def lora_rank_for_rate(model: nn.Module, rate: float) -> int:
    """The LoRA rank whose adapter count is closest to SIFT's at `rate`:
    r * sum(in + out) ~= rate * sum(in * out) over the same targets."""
    numel, sides = target_shape_sums(model)
    return max(1, round(rate * numel / sides))


def sift_rate_for_rank(model: nn.Module, rank: int) -> float:
    """The SIFT rate that trains as many entries as LoRA of `rank` on the same targets."""
    numel, sides = target_shape_sums(model)
    return rank * sides / numel


def compared_methods(model: nn.Module, rates=(0.01, 0.05), lora_rate: float = 0.05,
                     original_rate: float = 0.05) -> list[Method]:
    """The CPU memory / speed comparison: floor, full AdamW / AdamW8bit, LoRA (rank matched to SIFT
    at `lora_rate`), the original SIFT profile, and SIFT at each rate in both step modes."""
    rank = lora_rank_for_rate(model, lora_rate)
    methods = [Method("floor", "floor"),
               Method("full AdamW", "full"),
               Method("full AdamW8bit", "full", "adamw8bit"),
               Method(f"LoRA r={rank}", "lora", rank=rank),
               Method(f"original SIFT {original_rate:.0%} (profile)", "original", rate=original_rate)]
    for rate in rates:
        methods.append(Method(f"SIFT {rate:.0%} deferred", "sift", rate=rate))
        methods.append(Method(f"SIFT {rate:.0%} in-backward", "sift", rate=rate, step_in_backward=True))
    return methods


class Trainee:
    """One method bound to one model: `train_step(batch, tracker)` and what the tracker should name.

    full / lora / sift are built by trainer.methods, the code `train_sft.py` runs; floor and the
    original-SIFT profile are measurement devices of the benchmarks only."""

    def __init__(self, method: Method, model: nn.Module, seed: int = 0, max_grad_norm: float | None = 1.0):
        self.method, self.model = method, model
        self.opt = None
        self.trained = None  # trainer.methods.Method for full / lora / sift
        self._hooks = []
        self.phase_times = {}
        self._clip = []  # the original profile's parameters clipped by global norm before its step
        self.max_grad_norm = max_grad_norm
        kind = method.kind
        if method.quantization:  # the targets' base in 4 bits, quantized where the weights lie
            quantize_base(model, kind, method.quantization, method.double_quant, method.rate, method.selection, seed)
        if kind == "floor":
            targets = targets_of(model)
            self._train_only([p for _, p in targets])
            self._hooks = [p.register_post_accumulate_grad_hook(_drop_grad) for _, p in targets]
            self.entries = 0
        elif kind == "original":
            targets = targets_of(model)
            self._train_only([p for _, p in targets])
            self.opt = OriginalSIFTProfile(targets, method.rate, lr=method.lr)
            self.entries = self.opt.entries
            self._clip = self.opt.deltas
        else:
            if kind == "lora":
                self._train_only([])  # PEFT freezes the base; the adapters it adds train
            self.trained = trainer_methods.build(model, trainer_arguments(method, seed, max_grad_norm))
            self.trained.plan(2 * PLANNED_WINDOW)  # the run's length (SIFT's regrow schedule; no-op otherwise)
            self.model, self.opt = self.trained.model, self.trained.opt
            self.entries = self.trained.trained_entries()
        self.offload = offload.enable(self.model) if method.offload_activations else None
        if method.embeddings_on_host:
            offload.embeddings_on_host(unwrap(self.model))
        if method.tile_tokens is not None:
            tiled_decoder.enable(self.model, method.tile_tokens or None)

    def _train_only(self, params):
        keep = {id(p) for p in params}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in keep)

    # ------------------------------------------------------------------ one step
    def train_step(self, batch: dict, tracker=None, accumulation: int = 1) -> torch.Tensor:
        """forward, backward (`accumulation` micro-batches of `batch`), optimizer step, zero_grad;
        phases and names reported to `tracker`."""
        phase = tracker.phase if tracker is not None else _no_phase
        t0 = time.perf_counter()
        for _ in range(accumulation):
            with phase("forward"):
                loss = causal_lm_loss(self.model, batch)  # the trainer's loss: chunked, no full fp32 logits
            t1 = time.perf_counter()
            with phase("backward"):
                loss.backward()  # SIFT's hooks (and its whole update, in step_in_backward mode) run here
        t2 = time.perf_counter()
        if tracker is not None:
            tracker.tag(self.grads(), "grads")  # before the step frees them
        with phase("step"):
            if self.trained is not None:
                self.trained.step()  # clip (SIFT: inside its step), step, zero_grad: as train_sft.py
            elif self.opt is not None:
                if self._clip and self.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(self._clip, self.max_grad_norm)
                self.opt.step()
                self.opt.zero_grad()
        # CPU: each phase has finished when its call returns; on a GPU these would need syncs
        self.phase_times = {"forward": t1 - t0, "backward": t2 - t1, "step": time.perf_counter() - t2}
        if tracker is not None:
            tracker.tag(self.state_tensors(), "optimizer")
            if self.trained is not None:
                tracker.tag(self.trained.host_tensors(), "host")
            elif self.method.kind == "original":
                tracker.tag(self.opt.host_tensors(), "host")
            params = list(self.model.parameters()) + base_tensors(self.model)  # LoRA adapters; 4-bit bases
            device = next((p.device for p in params if p.device.type != "cpu"), None)  # None: all on the CPU
            host = [device is not None and p.device != device for p in params]  # --embeddings_on_host
            tracker.tag([p for p, h in zip(params, host) if not h], "params")
            tracker.tag([p for p, h in zip(params, host) if h], "host")
        return loss.detach()

    # ------------------------------------------------------------------ naming for the tracker
    def grads(self) -> list[torch.Tensor]:
        """Gradients alive between backward and step (SIFT: its sparse k-vectors)."""
        if self.trained is not None:
            return self.trained.grad_tensors()
        if self.method.kind == "original":
            return self.opt.grads()
        return [p.grad for p in self.model.parameters() if p.grad is not None]

    def state_tensors(self) -> list[torch.Tensor]:
        """Optimizer-side state (SIFT: indices, fp32 masters, 8-bit moments and their scales)."""
        if self.trained is not None:  # QSIFT's indices live in its 4-bit modules
            return self.trained.state_tensors() + [t for l in qlayers(self.model).values() for t in l.index_tensors()]
        return self.opt.state_tensors() if self.opt is not None else []

    def sift_report(self) -> dict | None:
        return self.trained.memory_report() if self.trained is not None else None

    def close(self):
        for h in self._hooks:
            h.remove()
        if self.trained is not None:
            self.trained.close()
        elif self.method.kind == "original":
            self.opt.remove_hooks()


def trainer_arguments(method: Method, seed: int, max_grad_norm: float | None):
    """The train_sft.py arguments (trainer.args.Arguments) that build `method` (full / lora / sift) on
    LLAMA_LINEARS."""
    from trainer.args import Arguments, MethodArguments, ModelArguments, TrainArguments

    clip = 0.0 if method.step_in_backward or max_grad_norm is None else max_grad_norm
    regrow = {} if method.regrow_fraction is None else dict(
        sift_regrow_steps=PLANNED_WINDOW, sift_regrow_window=PLANNED_WINDOW, sift_regrow_fraction=method.regrow_fraction)
    return Arguments(
        model=ModelArguments(quantization=method.quantization or "none", double_quant=method.double_quant),
        method=MethodArguments(finetuning_type=method.kind, sift_rate=method.rate or 0.05,
                               sift_targets=",".join(LLAMA_LINEARS), sift_selection=method.selection,
                               optim=method.optimizer, step_in_backward=method.step_in_backward,
                               lora_rank=method.rank or 8, lora_alpha=2 * (method.rank or 8), lora_dropout=0.0,
                               **regrow),
        train=TrainArguments(learning_rate=method.lr, weight_decay=0.0, max_grad_norm=clip, seed=seed))


def _drop_grad(p: nn.Parameter):
    p.grad = None


@contextlib.contextmanager
def _no_phase(_name):
    yield

