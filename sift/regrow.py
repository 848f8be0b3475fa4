"""Drop and regrow: a mask that keeps learning (SpIEL's accumulated-gradient growth: Ansell et al.,
"Scaling Sparse Fine-Tuning to Large Language Models"), written once for both holders.

Every `regrow_steps` optimizer steps r (r < T, the run's length), each trained tensor that has entries
(a sparse weight, a QSIFT delta) replaces n = floor(p_r k_slice) of the k_slice entries of its slice,
p_r = regrow_fraction (T - r) / (T - regrow_steps): the fraction at the first regrow, 0 at the end.

    window  the `regrow_window` optimizer steps ending with step r. At the window's first gradient the
            tensor's candidates are chosen: the c = min(CANDIDATES n, unselected) unselected entries of
            its slice with the largest |gradient| summed over ranks (sift.selection.agree: one dense
            all-reduce per tensor and window, none on one rank). Each step of the window adds the step's
            gradient at the candidates (all its micro-batches, summed over ranks, clipped as the step
            clips it) into a sum and a sum of squares. Skipped steps add nothing. The candidates'
            gradient is gathered where the dense gradient exists for an instant (sift.entries.sparse_grad:
            SIFT's hook, QSIFTLinear's backward); nothing dense outlives it.
    drop    the n entries with the smallest |trained - base| (the fp32 trained value, the host base): a
            weight gets its base value back bit for bit; a delta entry leaves (its base is 0).
    grow    the n candidates with the largest |sum|. They start at their base value (the weight as it
            is: an unselected entry is bit-identical to its base; a delta 0), with Adam moments seeded
            from the window, m = (1 - b1^t) mean(g) and v = (1 - b2^t) mean(g^2), t the tensor's step
            count: bitsandbytes corrects the bias with the tensor's t, so these are the moments whose
            corrected values are the window's mean and mean square. Zero moments would be corrected as
            if they were t steps old: the first updates of a new entry would be up to
            (1 - b1) / sqrt(1 - b2) = 3.2x the learning rate (b = 0.9, 0.999) where a kept entry's are ~1x.
    reorder the entries stay sorted (sift.codec), so the new set is encoded again (`entries.select`)
            and every per-entry row moves with its entry: the values (`set_values`), the host base, the
            moments. 8-bit moments are dequantized, moved and quantized again blockwise, as every 8-bit
            step re-quantizes them: a kept entry's moment moves by at most half a code step of the block
            it lands in. fp32 moments move exactly.

Every rank makes the same choice: the candidates come from the gradient summed over ranks, the
statistics are summed over ranks each step, the trained values and bases are replicated (ZeRO-2) or
the slice's own (a rank holding a slice decides for the entries of its slice).

Memory. Between windows: nothing, the state is the static run's byte for byte. During a window, per
tensor: its candidates' indices with sift.codec (2 B each + an int32 per 2^15-entry block of the
slice) and three fp32 rows (the step's gradient, the sum, the sum of squares): `Window.nbytes()` =
14 c + 4 blocks B, c <= CANDIDATES x regrow_fraction x k, i.e. <= 5.6 B per trained entry at the
default fraction 0.2 (SIFT.memory_report: "regrow_candidates"). Transient: at the window's first
gradient one dense |gradient| of the slice (as the selection's), at each gradient the c decoded
indices (4 B each); at a regrow, one tensor at a time, k-sized rows (values, base, the fp32 moments).

The window's statistics and the step count are in SIFT.state_dict (`state()` / `load()`): a resume
inside a window or right after a regrow continues bit for bit.
"""
from __future__ import annotations

import torch

from .codec import block_starts, decode, encode, index_dtype, num_blocks
from .selection import agree
from .state import BLOCK, to_host

CANDIDATES = 2  # candidates gathered per entry a regrow replaces (bounds the window's memory)
FIELDS = ("regrow_steps", "regrow_fraction", "regrow_window")  # what a resumed run must share


class Window:
    """One tensor's gradient statistics before a regrow: it replaces `n` entries, from `c` candidates."""

    def __init__(self, slot, n: int, c: int):
        self.slot, self.n, self.c = slot, n, c
        self.samples = 0  # steps added to the sums (host int: the same on every rank)
        self.offsets = self.counts = None  # the candidates, relative to the slice (sift.codec), once chosen
        self.sum = self.sumsq = self.pending = None  # fp32 [c]: sum and sum of squares of the steps' gradients;
        # pending: the current step's, until SIFT.step folds it in

    def chosen(self) -> bool:
        return self.offsets is not None

    def _allocate(self, rel: torch.Tensor) -> None:
        """Take the candidates `rel` (sorted indices into the slice) with zero statistics."""
        e, dev = self.slot.entries, self.slot.device
        self.offsets, self.counts = encode(rel.to(dev), 0, e.hi - e.lo)
        self.sum, self.sumsq, self.pending = (torch.zeros(self.c, dtype=torch.float32, device=dev) for _ in range(3))

    def indices(self) -> torch.Tensor:
        """The candidates as sorted indices into the slice (index_dtype of the slice), decoded on the device."""
        e = self.slot.entries
        size = e.hi - e.lo
        return decode(self.offsets, self.counts, block_starts(0, size, self.offsets.device, index_dtype(size)))

    def observe(self, dense: torch.Tensor, flat: torch.Tensor, selected: torch.Tensor) -> None:
        """Gather the candidates' gradient (sift.entries.sparse_grad calls this while the dense gradient
        exists). `dense`: the whole weight's gradient; `flat`: this slice's flat view of it; `selected`:
        the trained entries' indices into the slice. The first call chooses the candidates: every rank
        takes part (the dense all-reduce of sift.selection.agree), whatever its c."""
        if not self.chosen():
            total = agree(dense).reshape(-1)  # every rank alike: the gradient summed over ranks
            score = total[self.slot.entries.lo:self.slot.entries.hi].abs()  # a new tensor: the gradient stays
            del total
            score.nan_to_num_(0.0, 0.0, 0.0).index_fill_(0, selected.to(score.device).long(), -1.0)
            self._allocate(torch.topk(score, self.c, sorted=False).indices.sort().values)
            del score
        if self.c:
            g = flat.index_select(0, self.indices().to(flat.device))
            self.pending.add_(g.to(self.pending.device))

    def fold(self, scale: float) -> None:
        """Add the step's gradient, clipped by `scale` (already summed over ranks), to the statistics.
        A non-finite entry (the step's selected entries were finite) adds 0."""
        g = self.pending.nan_to_num_(0.0, 0.0, 0.0).mul_(scale)
        self.sum.add_(g)
        self.sumsq.addcmul_(g, g)
        self.pending.zero_()
        self.samples += 1

    def seeds(self, pick: torch.Tensor, step: int, betas) -> torch.Tensor:
        """[2, n] Adam moments of the candidates `pick` (positions): bias-corrected, at the tensor's
        step count, to the window's mean and mean square."""
        b1, b2 = betas
        return torch.stack([self.sum[pick].div(self.samples).mul_(1 - b1 ** step),
                            self.sumsq[pick].div(self.samples).mul_(1 - b2 ** step)])

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.offsets, self.counts, self.sum, self.sumsq, self.pending) if t is not None]

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    def bound(self) -> int:
        """The most bytes this window holds: 14 B per candidate + an int32 per index block."""
        e = self.slot.entries
        return 14 * self.c + 4 * num_blocks(0, e.hi - e.lo)

    def state(self) -> dict:
        st = {"n": self.n, "c": self.c, "samples": self.samples}
        if self.chosen():
            e = self.slot.entries
            st["candidates"] = (self.indices().long() + e.lo).to(index_dtype(e.numel))
            st["sum"], st["sumsq"] = self.sum.clone(), self.sumsq.clone()
        return st

    @classmethod
    def from_state(cls, slot, st: dict) -> "Window":
        w = cls(slot, int(st["n"]), int(st["c"]))
        w.samples = int(st["samples"])
        if "candidates" in st:
            w._allocate(st["candidates"].long() - slot.entries.lo)
            w.sum.copy_(st["sum"])
            w.sumsq.copy_(st["sumsq"])
        return w


class Regrow:
    """SIFT's schedule of windows and regrows, over its slots that have entries (SIFT builds it when
    cfg.regrow_steps > 0). `reduce(tensors)` sums tensors over ranks in place (SIFT's all-reduce);
    `qmaps(device)` gives the 8-bit moments' quantile maps."""

    def __init__(self, slots, cfg, reduce, qmaps):
        self.slots = [s for s in slots if s.entries is not None]
        self.every, self.fraction, self.width = cfg.regrow_steps, cfg.regrow_fraction, cfg.regrow_window
        self.reduce, self.qmaps = reduce, qmaps
        self.total: int | None = None  # the run's length in optimizer steps (plan)
        self.steps = 0                  # optimizer steps taken (skipped ones included)
        self.windows: dict[str, Window] = {}  # slot name -> its open window

    # ---------------------------------------------------------------- schedule
    def plan(self, total_steps: int) -> None:
        """The run's length: the replaced share decays to 0 at its end, and no regrow happens there."""
        self.total = total_steps
        self.open_due()

    def share(self, r: int) -> float:
        """p_r: the share of each tensor's entries the regrow after step r replaces."""
        return self.fraction * (self.total - r) / max(self.total - self.every, 1)

    def open_due(self) -> None:
        """Open the windows when the next regrow's window starts with the next step."""
        r = (self.steps // self.every + 1) * self.every
        if self.windows or self.total is None or r >= self.total or r - self.width != self.steps:
            return
        p = self.share(r)
        for s in self.slots:
            e = s.entries
            free = (e.hi - e.lo) - e.k  # unselected entries of the slice
            n = min(int(p * e.k), free)
            self._open(s, Window(s, n, min(CANDIDATES * n, free)))

    def _open(self, slot, window: Window) -> None:
        self.windows[slot.name] = slot.entries.window = window

    def close(self) -> None:
        for s in self.slots:
            s.entries.window = None
        self.windows = {}

    # ---------------------------------------------------------------- each step
    def zero_pending(self) -> None:
        """Drop the current step's candidate gradients (SIFT.zero_grad)."""
        for w in self.windows.values():
            if w.chosen():
                w.pending.zero_()

    def after_step(self, scale: float | None, skipped: set[str], betas) -> None:
        """After optimizer step: fold its candidate gradients in (`scale`: its clip factor, None when it
        was skipped as a whole; `skipped`: names of tensors it skipped), count it, regrow when due."""
        if self.total is None:
            raise RuntimeError("SIFT regrow_steps > 0: call opt.plan_regrow(total_steps) before the first step "
                               "(the replaced share decays to 0 at the end of the run)")
        live = [w for name, w in self.windows.items() if w.chosen() and w.c and scale is not None and name not in skipped]
        self.reduce([w.pending for w in live])
        for w in live:
            w.fold(scale)
        self.zero_pending()
        self.steps += 1
        if self.windows and self.steps % self.every == 0:
            self.regrow(betas)
        self.open_due()

    @torch.no_grad()
    def regrow(self, betas) -> None:
        windows = self.windows
        self.close()
        for s in self.slots:
            w = windows.get(s.name)
            if w is not None and w.n and w.samples and w.chosen():
                replace(s, w, betas, self.qmaps(s.device) if s.bank.eightbit else None)

    # ---------------------------------------------------------------- state
    def tensors(self) -> list[torch.Tensor]:
        return [t for w in self.windows.values() for t in w.tensors()]

    def nbytes(self) -> int:
        return sum(w.nbytes() for w in self.windows.values())

    def state(self) -> dict:
        return {"steps": self.steps, "windows": {name: w.state() for name, w in self.windows.items()}}

    def problems(self, st: dict | None) -> list[str]:
        known = {s.name for s in self.slots}
        unknown = sorted(set((st or {}).get("windows", {})) - known)
        return [f"{len(unknown)} saved regrow windows of tensors this run does not train, e.g. {unknown[:3]}"] if unknown else []

    def load(self, st: dict | None) -> None:
        self.close()
        self.steps = int(st["steps"]) if st else 0
        slots = {s.name: s for s in self.slots}
        for name, ws in (st or {}).get("windows", {}).items():
            self._open(slots[name], Window.from_state(slots[name], ws))


def resume_problems(saved: dict, cfg) -> list[str]:
    """The regrow options a resumed run must share with the saved config (a config saved before
    these options existed had regrow off)."""
    from .config import SIFTConfig

    default = SIFTConfig()
    if not (saved.get("regrow_steps") or cfg.regrow_steps):
        return []
    out = []
    for key in FIELDS:
        a, b = saved.get(key, getattr(default, key)), getattr(cfg, key)
        if a != b:
            out.append(f"config {key}: saved {a!r}, this run {b!r}")
    return out


# -------------------------------------------------------------------- one regrow of one tensor
@torch.no_grad()
def replace(slot, window: Window, betas, qmaps) -> None:
    """Drop `window.n` entries of `slot` and grow as many of the window's candidates (see the module)."""
    e, n, dev = slot.entries, window.n, slot.device
    old = e.indices().to(dev).long()  # into the slice, sorted
    k = old.numel()
    vals = slot.values()  # fp32, index order
    base = slot.base.to(dev) if not slot.zero_base else torch.zeros(k, dtype=slot.param.dtype, device=dev)
    drop = torch.topk((vals - base.float()).abs(), n, largest=False, sorted=False).indices
    keep = torch.ones(k, dtype=torch.bool, device=dev).index_fill_(0, drop, False)
    pick = torch.topk(window.sum.abs(), n, sorted=False).indices
    grown = window.indices().to(dev).long()[pick]
    new, order = torch.sort(torch.cat([old[keep], grown]))
    fresh = torch.zeros(n, dtype=base.dtype, device=dev) if slot.zero_base else slot.weights(grown)  # == base
    moments = read_moments(slot, qmaps)  # [2, kp] fp32
    moments[:, :k] = torch.cat([moments[:, :k][:, keep], window.seeds(pick, slot.step, betas)], 1)[:, order]
    if not slot.zero_base:
        slot.write_weights(base[drop], old[drop])  # the dropped entries are their base again, bit for bit
    e.select(new + e.lo)  # re-encodes (a weight's base is re-taken from the weight: right for `fresh` only)
    if not slot.zero_base:
        slot.base = to_host(torch.cat([base[keep], fresh])[order])
    slot.set_values(torch.cat([vals[keep], fresh.float()])[order])
    write_moments(slot, moments, qmaps)


def read_moments(slot, qmaps) -> torch.Tensor:
    """The slot's two moment rows (padding included) in fp32, [2, kp]."""
    rows, absmax = slot.moment_rows()
    if absmax is None:
        return rows.clone()
    return torch.stack([torch.ops.bitsandbytes.dequantize_blockwise(rows[i], absmax[i], qmaps[i], BLOCK, torch.float32)
                        for i in (0, 1)])


def write_moments(slot, moments: torch.Tensor, qmaps) -> None:
    """Store fp32 `moments` [2, kp] in the slot's rows: 8-bit ones quantized blockwise, as bitsandbytes'
    step does."""
    rows, absmax = slot.moment_rows()
    if absmax is None:
        rows.copy_(moments)
        return
    for i in (0, 1):
        codes, scale = torch.ops.bitsandbytes.quantize_blockwise(moments[i].contiguous(), qmaps[i], BLOCK)
        rows[i].copy_(codes)
        absmax[i].copy_(scale)
