"""SIFT: sparse AdamW over the top-|grad| entries of each target weight, fed by backward hooks.

Memory per trained entry (deferred mode, adamw8bit): int32 index 4 B + fp32 master 4 B (none for
fp32 weights: the weight already is the fp32 master) + two 8-bit moments 2 B + blockwise absmax
8 B / 256 entries; plus the fp32 sparse gradient (4 B) that exists only between the first hook of
an accumulation window and `step()`. The dense gradient of a target exists only inside its hook.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
from bitsandbytes import functional as bnbf

from .config import SIFTConfig
from .targets import find_trainable

_BLOCK = 256  # bitsandbytes' blockwise quantisation block for optimizer states
_STATE_KEYS = ("indices", "state1", "state2", "absmax1", "absmax2")


def index_dtype(numel: int) -> torch.dtype:
    return torch.int64 if numel >= 2**31 else torch.int32


def numel(p: nn.Parameter) -> int:
    """Entries of the full parameter (ZeRO-3 leaves `p.data` empty between gathers)."""
    return getattr(p, "ds_numel", None) or p.numel()


def shape(p: nn.Parameter) -> torch.Size:
    return getattr(p, "ds_shape", None) or p.shape


def flat_weight(p: nn.Parameter) -> torch.Tensor:
    """The persistent storage of the weight as a flat view: `p.data`, or under ZeRO-3 the parameter's
    own partition `ds_tensor` (on the host with offload_param; one rank holds every entry)."""
    if hasattr(p, "ds_tensor"):
        return p.ds_tensor.data.view(-1)[:p.ds_numel]
    return p.data.view(-1)


class _Slot:
    """All SIFT state of one trained parameter, as tensors on that parameter's device."""

    def __init__(self, name: str, param: nn.Parameter, k: int | None, eightbit: bool):
        self.name, self.param = name, param
        self.k = numel(param) if k is None else k  # k is None: trained densely
        self.sparse = k is not None
        self.eightbit = eightbit
        self.step = 0
        self.stepped = False  # step_in_backward: already updated since the last opt.step()
        self.indices = None  # sorted flat indices (int32 unless numel >= 2^31); None until selected / dense
        self.master = None   # fp32 copy of the trained entries; None when the weight is fp32 itself
        self.grad = None     # fp32 accumulated sparse gradient, alive only within an accumulation window
        self.base = None     # host copy of the trained entries' base values (weight dtype): the increment's deltas
        self.state1 = self.state2 = self.absmax1 = self.absmax2 = None

    def ready(self) -> bool:
        return self.state1 is not None

    def init_state(self, indices: torch.Tensor | None):
        """Allocate master and moments once the trained entries are known."""
        dev = self.param.device
        self.indices = indices
        self.base = _to_host(self.gather(flat_weight(self.param)))
        if self.param.dtype != torch.float32:
            # bf16 loses updates below half an ulp (~0.4 % of |w|), hence the fp32 master.
            self.master = self.values().clone()
        sdtype = torch.uint8 if self.eightbit else torch.float32
        self.state1 = torch.zeros(self.k, dtype=sdtype, device=dev)
        self.state2 = torch.zeros(self.k, dtype=sdtype, device=dev)
        if self.eightbit:
            blocks = math.ceil(self.k / _BLOCK)
            self.absmax1 = torch.zeros(blocks, dtype=torch.float32, device=dev)
            self.absmax2 = torch.zeros(blocks, dtype=torch.float32, device=dev)

    def gather(self, dense: torch.Tensor) -> torch.Tensor:
        flat = dense.reshape(-1)
        return flat.index_select(0, self.indices) if self.sparse else flat

    def values(self) -> torch.Tensor:
        """Current trained values in fp32 (a new tensor unless the dense weight is fp32)."""
        if self.master is not None:
            return self.master
        flat = flat_weight(self.param)
        return self.gather(flat).float().to(self.param.device)

    def write_back(self, values: torch.Tensor):
        targets = [flat_weight(self.param)]
        if hasattr(self.param, "ds_tensor") and self.param.data.numel() == self.k:
            targets.append(self.param.data.view(-1))  # a ZeRO-3 persistent (or gathered) copy too
        for flat in targets:
            if self.sparse:  # indexed copy: no dense temporary of the weight
                flat.index_put_((self.indices.to(flat.device),), values.to(flat.device, flat.dtype))
            elif values.data_ptr() != flat.data_ptr():
                flat.copy_(values)

    def state(self) -> dict:
        """Self-contained: the trained values travel too, so a fresh base model can resume."""
        st = {k: getattr(self, k) for k in _STATE_KEYS if getattr(self, k) is not None}
        return {"step": self.step, "values": self.values().clone(), "base": self.base, **st}

    def load(self, st: dict):
        if self.sparse and st["indices"].numel() != self.k:
            raise ValueError(f"SIFT state for {self.name}: {st['indices'].numel()} indices, expected "
                             f"{self.k} (was it saved with another rate?)")
        dev = self.param.device
        for key in _STATE_KEYS:
            setattr(self, key, st[key].to(dev).clone() if key in st else None)
        self.step = st["step"]
        self.base = st["base"].clone() if "base" in st else None
        values = st["values"].to(dev)
        self.master = values.clone() if self.param.dtype != torch.float32 else None
        self.write_back(values)


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy; from CUDA into pinned memory without a host sync (once per tensor, at selection)."""
    if t.device.type == "meta":  # the memory planner: a stand-in it tags as host memory
        return torch.empty_like(t)
    if t.device.type != "cuda":
        return t.detach().to("cpu", copy=True)
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return out.copy_(t, non_blocking=True)


def _select(slot: _Slot, how: str, generator: torch.Generator, grad: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted flat indices of the k entries to train."""
    p, k, n = slot.param, slot.k, numel(slot.param)
    if how == "random":
        idx = torch.randperm(n, generator=generator)[:k].to(p.device)
    else:
        score = (grad if how == "grad" else flat_weight(p)).reshape(-1).abs()  # dense temporary: one |grad| copy, once
        idx = torch.topk(score, k, sorted=False).indices.to(p.device)
    return idx.sort().values.to(index_dtype(n))


class SIFT(torch.optim.Optimizer):
    """Sparse increment fine-tuning optimizer (see docs/DESIGN.md for the contract)."""

    def __init__(self, model: nn.Module, cfg: SIFTConfig | None = None):
        cfg = cfg or SIFTConfig()
        sparse, dense = find_trainable(model, cfg.targets, cfg.dense)
        self.cfg = cfg
        trainable = {id(p) for _, p in sparse + dense}
        for p in model.parameters():
            p.requires_grad_(id(p) in trainable)
        eightbit = cfg.optimizer == "adamw8bit"
        self.slots = [_Slot(n, p, math.ceil(cfg.rate * numel(p)), eightbit) for n, p in sparse]
        self.slots += [_Slot(n, p, None, eightbit) for n, p in dense]
        defaults = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
        super().__init__([s.param for s in self.slots], defaults)
        self.skipped_steps = 0
        self.last_grad_norm = None
        # Data parallel (DeepSpeed ZeRO-2, DDP-style launch): ranks sum their sparse gradients.
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.comm_bytes = 0  # bytes all-reduced by SIFT so far (k values per tensor, not the dense size)
        self._qmaps = {}
        self._nonfinite = None  # step_in_backward only: a device flag, read once in step()
        generator = torch.Generator().manual_seed(cfg.seed)
        for s in self.slots:
            if not s.sparse:
                s.init_state(None)
            elif cfg.selection != "grad":
                s.init_state(_select(s, cfg.selection, generator))
        self._hooks = [s.param.register_post_accumulate_grad_hook(self._make_hook(s)) for s in self.slots]

    # ---------------------------------------------------------------- backward
    def _make_hook(self, slot: _Slot):
        group = self.param_groups[0]

        @torch.no_grad()
        def hook(p: nn.Parameter):
            grad, p.grad = p.grad, None  # the dense gradient dies with this hook
            if not slot.ready():
                score = grad
                if self.world > 1:  # every rank must pick the same entries: those of the summed
                    score = grad.clone()  # gradient (a dense all-reduce, once per tensor, first micro-batch)
                    dist.all_reduce(score)
                slot.init_state(_select(slot, "grad", None, score))
                del score
            g = slot.gather(grad).float()
            del grad
            if self.cfg.step_in_backward:
                self._all_reduce([g])
                if slot.stepped:
                    raise RuntimeError(
                        f"SIFT step_in_backward: {slot.name} received a second gradient before opt.step(); "
                        "this mode cannot accumulate gradients: call opt.step() after every backward "
                        "(gradient_accumulation_steps=1) or use step_in_backward=False")
                slot.stepped = True
                self._step_in_hook(slot, g, group)
            elif slot.grad is None:
                slot.grad = g  # a fresh gather, or (dense fp32) the gradient itself, no longer p.grad
            else:
                slot.grad.add_(g)

        return hook

    def _step_in_hook(self, slot: _Slot, g: torch.Tensor, group: dict):
        """Update now. A non-finite gradient leaves this tensor (entries and moments) untouched,
        decided on the device with torch.where: the hook never syncs to the host."""
        finite = torch.isfinite(g).all()
        kept = [t for t in (slot.master, slot.state1, slot.state2, slot.absmax1, slot.absmax2) if t is not None]
        backup = [t.clone() for t in kept]  # k-sized copies: far below the dense grad alive right now
        old = None if slot.master is not None else slot.values().clone()
        values = self._update(slot, g, 1.0, group)
        for t, b in zip(kept, backup):
            torch.where(finite, t, b, out=t)  # in place: no second k-sized temporary
        if old is not None:
            torch.where(finite, values, old, out=values)
        slot.write_back(values)
        bad = ~finite
        self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad.to(self._nonfinite.device)

    # ---------------------------------------------------------------- step
    def _qmap(self, device, signed: bool) -> torch.Tensor:
        key = (str(device), signed)
        if key not in self._qmaps:
            self._qmaps[key] = bnbf.create_dynamic_map(signed=signed).to(device)
        return self._qmaps[key]

    def _update(self, slot: _Slot, g: torch.Tensor, scale: float, group: dict) -> torch.Tensor:
        """One AdamW step of `slot` on gradient `g` (times `scale`); returns the new fp32 values."""
        slot.step += 1
        values = slot.values()
        beta1, beta2 = group["betas"]
        if slot.eightbit:
            bnbf.optimizer_update_8bit_blockwise(
                "adam", g, values, slot.state1, slot.state2, beta1, beta2, 0.0, 0.0, group["eps"],
                slot.step, group["lr"], self._qmap(g.device, True), self._qmap(g.device, False),
                slot.absmax1, slot.absmax2, weight_decay=group["weight_decay"], gnorm_scale=scale)
        else:
            bnbf.optimizer_update_32bit(
                "adam", g, values, slot.state1, beta1, group["eps"], slot.step, group["lr"],
                slot.state2, beta2, weight_decay=group["weight_decay"], gnorm_scale=scale)
        return values

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
        self._all_reduce([s.grad for s in pending])
        dev = pending[0].grad.device
        norms = torch._foreach_norm([s.grad for s in pending])  # one launch per device, not per tensor
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
            s.write_back(self._update(s, s.grad, scale, group))
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
        for s in self.slots:
            s.stepped = False
        if self._nonfinite is not None and bool(self._nonfinite):  # host sync, once per step
            self.skipped_steps += 1
            warnings.warn("SIFT step_in_backward: non-finite gradients; the affected tensors were left "
                          "untouched, the others had already stepped inside backward")
        self._nonfinite = None

    def zero_grad(self, set_to_none: bool = True):
        for s in self.slots:
            s.grad = None
            s.param.grad = None

    # ---------------------------------------------------------------- introspection & state
    def selected_indices(self) -> dict[str, torch.Tensor]:
        return {s.name: s.indices for s in self.slots if s.sparse and s.indices is not None}

    def trained_values(self) -> dict[str, torch.Tensor]:
        """{name: fp32 values} of every trained entry: what an increment file stores."""
        return {s.name: s.values() for s in self.slots if s.ready()}

    def base_values(self) -> dict[str, torch.Tensor]:
        """{name: base values (weight dtype, on the host)} of every trained entry, as they were
        before training: what an increment's deltas are taken against."""
        return {s.name: s.base for s in self.slots if s.ready()}

    def state_tensors(self) -> list[torch.Tensor]:
        """Every persistent device tensor of SIFT's state (indices, masters, moments, their scales,
        quantile maps): what a memory count should call optimizer state."""
        keys = ("indices", "master", "state1", "state2", "absmax1", "absmax2")
        return list(self._qmaps.values()) + [getattr(s, k) for s in self.slots for k in keys
                                             if getattr(s, k) is not None]

    def host_tensors(self) -> list[torch.Tensor]:
        """State kept in host memory (the base values of the trained entries)."""
        return [s.base for s in self.slots if s.base is not None]

    def grad_tensors(self) -> list[torch.Tensor]:
        """The sparse gradients alive between backward and step()."""
        return [s.grad for s in self.slots if s.grad is not None]

    def trained_entries(self) -> int:
        return sum(s.k for s in self.slots)

    def state_dict(self) -> dict:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        return {
            "config": self.cfg.to_dict(),
            "param_groups": groups,
            "skipped_steps": self.skipped_steps,
            "slots": {s.name: s.state() for s in self.slots if s.ready()},
        }

    def load_state_dict(self, state_dict: dict) -> None:
        slots = {s.name: s for s in self.slots}
        unknown = sorted(set(state_dict["slots"]) - set(slots))
        if unknown:
            raise ValueError(f"SIFT state has parameters this model lacks: {unknown[:5]}")
        for name, st in state_dict["slots"].items():
            slots[name].load(st)
        for g, saved in zip(self.param_groups, state_dict["param_groups"]):
            g.update(saved)
        self.skipped_steps = state_dict["skipped_steps"]

    def memory_report(self) -> dict:
        """Bytes held by SIFT's state, by kind, and per trained entry."""
        def nbytes(*keys):
            return sum(getattr(s, k).nbytes for s in self.slots for k in keys if getattr(s, k) is not None)

        entries = sum(s.k for s in self.slots if s.ready())
        report = {
            "entries": entries,
            "indices": nbytes("indices"),
            "master": nbytes("master"),
            "optimizer_states": nbytes("state1", "state2", "absmax1", "absmax2"),
            "sparse_grads": nbytes("grad"),
        }
        report["persistent"] = report["indices"] + report["master"] + report["optimizer_states"]
        report["total"] = report["persistent"] + report["sparse_grads"]
        report["bytes_per_entry"] = report["persistent"] / max(entries, 1)
        report["bytes_per_entry_with_grad"] = (report["persistent"] + 4 * entries) / max(entries, 1)
        return report

    def remove_hooks(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []
