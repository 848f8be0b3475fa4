"""SIFT: sparse AdamW over the top-|grad| entries of each target weight, fed by backward hooks.

State per trained entry: 6.04 B on bf16 weights, 4.04 B on fp32 weights (sift/state.py has the
layout and why the bf16 master is exact). The dense gradient of a target exists only inside its
hook; the sparse gradient of the deferred mode is kept in the weight's dtype (bf16: 2 B/entry, the
exact gathered values) and turns fp32 only when a second micro-batch accumulates onto it, so the
float64 reference holds either way. `step()` runs one bitsandbytes call per chunk of each bank.
"""
from __future__ import annotations

import math
import warnings
from collections import defaultdict

import torch
import torch.distributed as dist
import torch.nn as nn
from bitsandbytes import functional as bnbf

from .config import SIFTConfig
from .entries import select_before_training, sparse_grad
from .state import Bank, SparseState, flat_weight, index_dtype, numel, shape  # noqa: F401 (re-exported)
from .targets import exact_grad_dtypes, find_trainable, increment_holders

# What a resumed run must share with the run that saved the state (the rest may change: lr, ...)
RESUME_FIELDS = ("rate", "targets", "dense", "selection", "optimizer", "step_in_backward")


class SIFT(torch.optim.Optimizer):
    """Sparse increment fine-tuning optimizer (see docs/DESIGN.md for the contract).

    Side effect: the constructor sets `requires_grad=False` on every parameter of `model` that is
    neither a target nor dense (so autograd computes no gradient for them) and `True` on the
    trained ones, and registers a post-accumulate-grad hook on each trained one (`remove_hooks()`).
    """

    # Devices whose step_in_backward guard reads its non-finite flag on the host (no sync to wait for)
    HOST_BRANCH = ("cpu",)
    # step_in_backward: pending trained entries at which the waiting sparse gradients step together
    IN_BACKWARD_GROUP = 2**22

    def __init__(self, model: nn.Module, cfg: SIFTConfig | None = None, *, _fp32_master: bool = False):
        cfg = cfg or SIFTConfig()
        sparse, dense = find_trainable(model, cfg.targets, cfg.dense)
        self.cfg = cfg
        trainable = {id(p) for _, p in sparse + dense}
        for p in model.parameters():
            p.requires_grad_(id(p) in trainable)
        self.slots = [SparseState(n, p, math.ceil(cfg.rate * numel(p)), selection=cfg.selection) for n, p in sparse]
        narrow, holders = exact_grad_dtypes(model), increment_holders(model)
        self.slots += [SparseState(n, p, None, narrow.get(n), holders.get(n)) for n, p in dense]
        self.banks = self._make_banks(cfg.optimizer == "adamw8bit", _fp32_master)
        defaults = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
        super().__init__([s.param for s in self.slots], defaults)
        self.skipped_steps = 0
        self.last_grad_norm = None
        # Data parallel (DeepSpeed ZeRO-2, DDP-style launch): ranks sum their sparse gradients.
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.comm_bytes = 0  # bytes all-reduced by SIFT so far (k values per tensor, not the dense size)
        self._qmaps = {}
        # step_in_backward only: per-tensor "skipped" flags on the device, read once in step()
        self._bad = {dev: torch.zeros(len(self.slots), dtype=torch.bool, device=dev) for dev in self.banks_by_device()}
        self._slot_no = {id(s): i for i, s in enumerate(self.slots)}
        self._pending, self._pending_entries = [], 0  # step_in_backward: (slot, grad, indices, flag) to step
        generator = torch.Generator().manual_seed(cfg.seed)
        for s in self.slots:  # in model order: one generator stream, the same on every rank
            if not s.sparse:
                s.select(None)
            else:
                select_before_training(s, generator)
        self._hooks = [s.param.register_post_accumulate_grad_hook(self._make_hook(s)) for s in self.slots]

    def _make_banks(self, eightbit: bool, fp32_master: bool) -> list[Bank]:
        """One Bank per (device, weight dtype, needs offsets), slots laid out in model order, each padded to 256."""
        groups = defaultdict(list)
        for s in self.slots:
            # dense fp32 tensors apart: they need no offsets (nor remainders)
            groups[(str(s.param.device), s.param.dtype, s.sparse or s.param.dtype != torch.float32)].append(s)
        banks = []
        for (dev, dtype, sparse), slots in groups.items():
            start = 0
            for s in slots:
                s.start, start = start, start + s.kp
            bank = Bank(dev, dtype, eightbit, fp32_master, start, sparse)
            for s in slots:
                s.bank = bank
            banks.append(bank)
        return banks

    def banks_by_device(self) -> list[str]:
        return sorted({str(b.device) for b in self.banks})

    # ---------------------------------------------------------------- backward
    def _make_hook(self, slot: SparseState):
        @torch.no_grad()
        def hook(p: nn.Parameter):
            grad, p.grad = p.grad, None  # the dense gradient dies with this hook
            if slot.sparse:  # the first call selects (all ranks agree); k values in the gradient's dtype
                idx, g = sparse_grad(slot, grad, device=slot.device)
            else:
                idx, g = None, slot.gather(grad, None)
            del grad
            if self.cfg.step_in_backward:
                g = g.float()
                self._all_reduce([g])
                if slot.stepped:
                    raise RuntimeError(
                        f"SIFT step_in_backward: {slot.name} received a second gradient before opt.step(); "
                        "this mode cannot accumulate gradients: call opt.step() after every backward "
                        "(gradient_accumulation_steps=1) or use step_in_backward=False")
                slot.stepped = True
                self._step_in_hook(slot, g, idx)
            elif slot.grad is None:  # a fresh gather, or (dense) the gradient itself, no longer p.grad;
                slot.grad = g.to(slot.grad_dtype)  # QSIFT's delta: fp32 -> the bf16 it came from, exact
            else:  # a second micro-batch: accumulate in fp32 (bf16 sums would lose the small terms)
                if slot.grad.dtype != torch.float32:
                    slot.grad = slot.grad.float()
                slot.grad.add_(g)

        return hook

    def _step_in_hook(self, slot: SparseState, g: torch.Tensor, idx):
        """Update now, or with the tensors whose gradients came just before: the sparse gradients of
        consecutive hooks wait (with their decoded indices, 12 B per entry) until IN_BACKWARD_GROUP
        entries are pending, then step as one run, as the deferred step would: one bitsandbytes call,
        not one per tensor (at LLaMA-7B 5 %, 0.8-2.3 M entries per tensor: 2-4 tensors a run).
        A non-finite gradient leaves its tensor (entries, moments, step count) untouched. The flag
        is sum(g) * 0 != 0 (3 launches, one pass over g): NaN or inf anywhere makes it true, and so
        does an fp32 overflow of the sum itself (|sum| > 3.4e38), also skipped. Where reading the
        flag costs nothing (the CPU, see HOST_BRANCH) a skipped tensor is simply not stepped; on a
        GPU the hook never syncs to the host: the run steps whole and one torch.where per state
        buffer (and one on the run's weights) puts the skipped tensors back. The step count is a
        host int: advanced here, taken back in step() for skipped tensors."""
        bad = self._bad[str(slot.device)][self._slot_no[id(slot)]]
        torch.ne(g.sum().mul_(0), 0, out=bad)
        slot.step += 1
        if slot.device.type in self.HOST_BRANCH and bad.item():
            return
        if self._pending and self._pending_entries + slot.kp > self.IN_BACKWARD_GROUP:
            self._flush_in_backward()
        self._pending.append((slot, g, idx, bad))
        self._pending_entries += slot.kp

    def _flush_in_backward(self):
        """Step the pending tensors of step_in_backward, a run of consecutive slots at a time."""
        pending = {id(item[0]): item for item in self._pending}
        self._pending, self._pending_entries = [], 0
        for run in _runs([item[0] for item in pending.values()]):
            _, grads, idx, bad = (list(t) for t in zip(*(pending[id(s)] for s in run)))
            bank, qmaps, group = run[0].bank, self._qmap_pair(run[0].device), self.param_groups[0]
            if bank.device.type in self.HOST_BRANCH:  # skipped tensors never got here
                bank.step(run, grads, group, qmaps, idx=idx)
            else:  # sync-free: step all, then put skipped slots back (one clone + one where per buffer)
                skip = bank.skip_mask(run, torch.stack(bad))
                saved = bank.backup(run[0].start, run[-1].start + run[-1].kp)
                bank.step(run, grads, group, qmaps, skip=skip, idx=idx)
                bank.restore(saved, skip)

    # ---------------------------------------------------------------- step
    def _qmap_pair(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._qmaps:
            self._qmaps[key] = tuple(bnbf.create_dynamic_map(signed=s).to(device) for s in (True, False))
        return self._qmaps[key]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.cfg.step_in_backward:
            self._finish_backward_step()
            return loss
        pending = [s for s in self.slots if s.grad is not None]
        if not pending:
            return loss
        if self.world > 1:  # sum over ranks in fp32: a bf16 all-reduce would round the partial sums
            for s in pending:
                s.grad = s.grad.float()
        grads = [s.grad for s in pending]
        self._all_reduce(grads)
        dev = grads[0].device
        norms = torch._foreach_norm(grads, dtype=torch.float32)  # one launch per device, not per tensor
        norm = torch.linalg.vector_norm(torch.stack([n.to(dev) for n in norms]))
        # The one host sync per step: skipping a non-finite step as a whole, and the clip scale the
        # kernels take as a float, both need the norm on the host.
        norm = norm.item()
        self.last_grad_norm = norm
        if not math.isfinite(norm):
            self.skipped_steps += 1
            self.zero_grad()
            return loss
        scale = 1.0
        if self.cfg.max_grad_norm is not None:
            scale = min(1.0, self.cfg.max_grad_norm / (norm + 1e-6))
        group = self.param_groups[0]
        for s in pending:
            s.step += 1
        for run in _runs(pending):
            run[0].bank.step(run, [r.grad for r in run], group, self._qmap_pair(run[0].device), scale)
        for s in pending:
            s.grad = None
        return loss

    def _all_reduce(self, tensors: list[torch.Tensor]) -> None:
        """Sum compact gradients over ranks, in place (async, no concatenated copy)."""
        if self.world == 1:
            return
        handles = [dist.all_reduce(t, async_op=True) for t in tensors]
        for h in handles:
            h.wait()
        self.comm_bytes += sum(t.nbytes for t in tensors)

    def _finish_backward_step(self):
        self._flush_in_backward()
        for s in self.slots:
            s.stepped = False
        # one host sync per step (the memory planner's meta flags have no values: nothing to take back)
        bad = [f.nonzero().view(-1).tolist() for f in self._bad.values() if f.device.type != "meta" and bool(f.any())]
        if not bad:
            return
        for i in sorted({i for b in bad for i in b}):
            self.slots[i].step -= 1  # the skipped update never happened
        for flags in self._bad.values():
            flags.zero_()
        self.skipped_steps += 1
        warnings.warn("SIFT step_in_backward: non-finite gradients; the affected tensors were left "
                      "untouched, the others had already stepped inside backward")

    def zero_grad(self, set_to_none: bool = True):
        self._flush_in_backward()  # step_in_backward's updates were due in backward: none is dropped
        for s in self.slots:
            s.grad = None
            s.param.grad = None

    # ---------------------------------------------------------------- introspection & state
    def selected_indices(self) -> dict[str, torch.Tensor]:
        """{name: sorted flat indices (int32 unless numel >= 2^31)}, decoded into a new tensor."""
        return {s.name: s.flat_indices() for s in self.slots if s.sparse and s.ready()}

    def trained_values(self) -> dict[str, torch.Tensor]:
        """{name: fp32 values} of every trained entry: what an increment file stores."""
        self._flush_in_backward()
        return {s.name: s.values() for s in self.slots if s.ready()}

    def base_values(self) -> dict[str, torch.Tensor]:
        """{name: base values (weight dtype, on the host)} of every trained entry, as they were
        before training: what an increment's deltas are taken against (zeros, made on the call,
        for a parameter that is an increment itself)."""
        return {s.name: torch.zeros(s.k, dtype=s.param.dtype) if s.zero_base else s.base
                for s in self.slots if s.ready()}

    def shapes(self) -> dict[str, torch.Size]:
        """{name: full parameter shape} of every trained tensor (ZeRO-3: the unpartitioned one)."""
        return {s.name: shape(s.param) for s in self.slots if s.ready()}

    def state_tensors(self) -> list[torch.Tensor]:
        """Every persistent device tensor of SIFT's state (flat banks, index tables, quantile maps,
        skip flags): what a memory count should call optimizer state."""
        return ([q for pair in self._qmaps.values() for q in pair] + list(self._bad.values())
                + [t for b in self.banks for t in b.tensors()]
                + [s.counts for s in self.slots if s.counts is not None])

    def host_tensors(self) -> list[torch.Tensor]:
        """State kept in host memory (the base values of the trained entries)."""
        return [s.base for s in self.slots if s.base is not None]

    def grad_tensors(self) -> list[torch.Tensor]:
        """The sparse gradients alive between backward and step()."""
        return [s.grad for s in self.slots if s.grad is not None]

    def trained_entries(self) -> int:
        return sum(s.k for s in self.slots)

    def state_dict(self) -> dict:
        self._flush_in_backward()
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        return {
            "config": self.cfg.to_dict(),
            "param_groups": groups,
            "skipped_steps": self.skipped_steps,
            "slots": {s.name: s.state() for s in self.slots if s.ready()},
        }

    def resume_problems(self, state_dict: dict) -> list[str]:
        """Every reason `state_dict` cannot continue this run (empty if it can); touches nothing."""
        out = []
        saved = state_dict.get("config") or {}
        mine = self.cfg.to_dict()
        for key in RESUME_FIELDS:
            a, b = saved.get(key), mine[key]
            if isinstance(a, list | tuple):
                a, b = list(a), list(b)
            if a != b:
                out.append(f"config {key}: saved {a!r}, this run {b!r}")
        slots = {s.name: s for s in self.slots}
        saved_slots = state_dict.get("slots", {})
        unknown = sorted(set(saved_slots) - set(slots))
        if unknown:
            out.append(f"{len(unknown)} saved tensors this model does not train, e.g. {unknown[:3]}")
        missing = sorted(n for n, s in slots.items() if n not in saved_slots and (s.ready() or not s.sparse))
        if missing and saved_slots:
            out.append(f"{len(missing)} trained tensors have no saved state, e.g. {missing[:3]}")
        for name, st in saved_slots.items():
            if name in slots:
                out += slots[name].problems(st)
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Continue a saved run exactly, or raise ValueError listing every difference first."""
        problems = self.resume_problems(state_dict)
        if problems:
            raise ValueError("SIFT state does not fit this run:\n  - " + "\n  - ".join(problems))
        slots = {s.name: s for s in self.slots}
        for name, st in state_dict["slots"].items():
            slots[name].load(st)
        for g, saved in zip(self.param_groups, state_dict["param_groups"]):
            g.update(saved)
        self.skipped_steps = state_dict["skipped_steps"]

    def memory_report(self) -> dict:
        """Bytes held by SIFT's state, by kind, and per trained entry (padding and tables included)."""
        parts = defaultdict(int)
        for s in self.slots:
            for key, n in s.nbytes().items():
                parts[key] += n
        parts["optimizer_states"] += sum(q.nbytes for pair in self._qmaps.values() for q in pair)
        parts["optimizer_states"] += sum(f.nbytes for f in self._bad.values())
        for b in self.banks:
            for key, n in b.shared_nbytes().items():
                parts[key] += n
        entries = sum(s.k for s in self.slots if s.ready())
        report = {"entries": entries, "indices": parts["indices"], "master": parts["master"],
                  "optimizer_states": parts["optimizer_states"],
                  "sparse_grads": sum(s.grad.nbytes for s in self.slots if s.grad is not None),
                  "host_base": sum(t.nbytes for t in self.host_tensors())}
        report["persistent"] = report["indices"] + report["master"] + report["optimizer_states"]
        report["total"] = report["persistent"] + report["sparse_grads"]
        report["bytes_per_entry"] = report["persistent"] / max(entries, 1)
        grad_bytes = sum(s.k * s.grad_dtype.itemsize for s in self.slots if s.ready())  # deferred, no accumulation
        report["bytes_per_entry_with_grad"] = (report["persistent"] + grad_bytes) / max(entries, 1)
        return report

    def remove_hooks(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []


def _runs(slots: list[SparseState]):
    """`slots` as runs that one Bank.step takes: consecutive in one bank, one step count."""
    run = []
    for s in sorted(slots, key=lambda s: (id(s.bank), s.start)):
        if run and (s.bank is not run[-1].bank or s.step != run[-1].step or s.start != run[-1].start + run[-1].kp):
            yield run
            run = []
        run.append(s)
    if run:
        yield run
