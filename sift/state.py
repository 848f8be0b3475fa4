"""What SIFT keeps per trained tensor, in a few flat buffers per device.

Layout (bytes per trained entry; k = trained entries of a tensor, padded to kp, a multiple of 256):

    indices    2 B   sift.codec: int16 per entry, the entry's offset inside its 2^15-entry block of
                     the tensor's slice (15 bits) + the master's tie bit (below); plus per tensor the
                     entry count of each block (int32, 4 B per 32,768 weight entries: 0.002 B/entry at
                     5 %) and the bank's one arange of block starts. Decoded on the device when the
                     hook gathers and when the step writes back: repeat_interleave(starts, counts,
                     output_size=k) + the offsets, 2 kernels (3 with the tie bit's mask), no host sync.
    master     2 B   bf16 weights: the fp32 master is the bf16 weight + an int16 remainder (below);
               0 B   fp32 weights are their own master; other dtypes (fp16) keep a 4 B fp32 master.
    moments    2 B   two 8-bit blockwise moments (adamw8bit; 8 B with adamw) + fp32 absmax per 256.

    => 6.04 B on bf16 weights, 4.04 B on fp32 weights (+ the 256-padding of each tensor).

The bf16 master. With m the fp32 master and w = bf16_rn(m) (what the forward sees: the weight
stays the round-to-nearest-even bf16 of the master, as with a plain fp32 master), the residual
d = bits(m) - bits(w) << 16, taken on the IEEE bit patterns as integers, lies in [-2^15, 2^15]:
rounding moves the top 16 bits by at most one step, and the low 16 bits differ by at most half a
step. bits(m) = (bits(w) << 16) + d is then exact. Working on bit patterns (not in units of the
ulp) handles the binade edges by itself: where rounding carried m into the next binade (or to
+-inf, or from a subnormal to a normal), bits(w) - 1 is the previous bf16, so the integer
difference stays in range, and the sign (sign-magnitude) never changes under rounding.
d takes 2^16 + 1 values: the two ties (low bits exactly 0x8000, rounded down or up to an even w)
are d = +2^15 and d = -2^15. The int16 remainder stores d mod 2^16 and the spare top bit of the
index offset (blocks of 2^15, not 2^16, for that reason) says "d = +2^15": the master is exact
for every finite fp32 value, so a run is bit-identical to one with an fp32 master (tested over
40+ bf16 steps against the fp32-master path, kept for fp16 weights and for that test).

Step. All states of one (device, weight dtype) share flat buffers, so the 8-bit AdamW update runs
as one bitsandbytes call per chunk of up to CHUNK entries (slots padded to the 256-entry
quantisation blocks, so the result equals per-tensor calls bit for bit). Transient memory of a
step: per chunk, an fp32 master scratch (4 B) and fp32 gradient (4 B), bf16 weights gathered
(2 B) and int32 encode temporaries (<= 12 B) per entry, plus one tensor's int64 decoded indices
(8 B x its k): <= 22 B x max(CHUNK, largest k) + 8 B x largest k, i.e. ~110 MiB at LLaMA-7B.
With step_in_backward, a run's pending fp32 gradients and decoded indices wait for it (12 B per
entry, up to the larger of SIFT.IN_BACKWARD_GROUP and one tensor's k), and on a GPU its state
slices are cloned once for the sync-free restore (~7 B per entry); the plans at LLaMA-7B and 13B
do not move (this scratch lives between the peaks of the layers' recomputation).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from bitsandbytes import functional as bnbf

from .codec import FLAG, OFFSET_MASK, block_starts, decode, encode, index_dtype

BLOCK = 256          # bitsandbytes' blockwise quantisation block for the 8-bit moments
CHUNK = 2**22        # entries per batched optimizer call (bounds the step's scratch)


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


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy; from CUDA into pinned memory without a host sync (once per tensor, at selection)."""
    if t.device.type == "meta":  # the memory planner: a stand-in it tags as host memory
        return torch.empty_like(t)
    if t.device.type != "cuda":
        return t.detach().to("cpu", copy=True)
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return out.copy_(t, non_blocking=True)


def master_kind(dtype: torch.dtype, fp32_master: bool = False) -> str:
    """"own": the fp32 weight is the master; "rem": bf16 weight + int16 remainder; "fp32": a copy."""
    if dtype == torch.float32:
        return "own"
    return "rem" if dtype == torch.bfloat16 and not fp32_master else "fp32"


def decode_master(w: torch.Tensor, rem: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
    """fp32 masters from bf16 weights `w`, int16 remainders and the tie bits of `aux` (see above):
    bits(m) = (bits(w) + tie) << 16 + rem, with tie = 1 where aux's top bit is set (aux >> 15 = -1)."""
    hi = w.view(torch.int16).int().sub_(aux >> 15)  # no int32 overflow for finite w
    return torch.add(rem, hi, alpha=65536).view(torch.float32)


def encode_master(m: torch.Tensor, rem: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
    """Split fp32 masters `m` into the bf16 weights (returned) and remainder / tie bit, in place."""
    w = m.bfloat16()  # round to nearest even: what a plain fp32 master writes into the weight
    d = torch.sub(m.view(torch.int32), w.view(torch.int16).int(), alpha=65536)  # in [-2^15, 2^15]
    rem.copy_(d)  # int16: d mod 2^16 (the tie d = 2^15 wraps to -2^15, its flag says which)
    aux.bitwise_and_(OFFSET_MASK).add_(d == 32768, alpha=FLAG)  # the tie bit set exactly where d == 2^15
    return w


class Bank:
    """Flat state buffers of every trained tensor of one device and weight dtype."""

    def __init__(self, device, dtype: torch.dtype, eightbit: bool, fp32_master: bool, entries: int,
                 sparse: bool = True):
        self.device, self.dtype, self.eightbit, self.sparse = torch.device(device), dtype, eightbit, sparse
        self.kind = master_kind(dtype, fp32_master)
        n, dev = entries, self.device
        self.moments = torch.zeros(2, n, dtype=torch.uint8 if eightbit else torch.float32, device=dev)
        self.absmax = torch.zeros(2, n // BLOCK, dtype=torch.float32, device=dev) if eightbit else None
        # int16 rows: offsets + tie bits, and (bf16 weights) the remainders; one buffer, so that the
        # in-backward guard backs a tensor's slice of both up with one clone. A bank of densely trained
        # fp32 tensors (QSIFT's deltas) needs neither: no side buffer, 2 B per entry less.
        rows = 2 if self.kind == "rem" else int(sparse)
        self.side = torch.zeros(rows, n, dtype=torch.int16, device=dev) if rows else None
        self.aux = self.side[0] if rows else None
        self.rem = self.side[1] if self.kind == "rem" else None
        self.master = torch.zeros(n, dtype=torch.float32, device=dev) if self.kind == "fp32" else None
        self.tables = {}  # (lo, hi) -> the block table of that run of sparse slots (chunk_indices)
        self.starts = torch.zeros(0, dtype=torch.int64, device=dev)  # block b's first index in a slice, b * 2^15
        self.sizes = {}   # (lo, hi) -> int32 padded size of each slot of that run (skip_mask)
        self._pad = torch.zeros(BLOCK, dtype=torch.float32, device=dev)  # zeros between slots in a chunk

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.moments, self.absmax, self.side, self.master, self._pad, self.starts)
                if t is not None] + [t for table in self.tables.values() for t in table] + list(self.sizes.values())

    def chunk_indices(self, slots: list[SparseState], lo: int, hi: int) -> torch.Tensor:
        """Every entry's index into its own weight's slice, for the sparse slots filling [lo, hi) of
        this bank, decoded in one pass (2-3 launches for the run, not per tensor); padding entries get
        index 0. The run's table is its slots' block starts and counts end to end, each slot followed
        by a (0, padding) block, built once and kept (12 B per 2^15 weight entries)."""
        if (lo, hi) not in self.tables:
            starts, counts = [], []
            for s in slots:
                starts += [self.starts[:s.counts.numel()], self.starts[:1]]
                counts += [s.counts, s.counts.new_full((1,), s.kp - s.k)]
            self.tables[(lo, hi)] = (torch.cat(counts), torch.cat(starts))
        return decode(self.aux[lo:hi], *self.tables[(lo, hi)], flagged=self.flagged)

    @property
    def flagged(self) -> bool:
        """Whether the offsets carry the master's tie bit (only bf16 remainders set it)."""
        return self.kind == "rem"

    # ------------------------------------------------------------ the sync-free in-backward guard
    def skip_mask(self, slots: list[SparseState], flags: torch.Tensor) -> torch.Tensor:
        """Per entry of the run [lo, hi) that `slots` fill, its slot's skip flag (bool, on the device)."""
        lo, hi = slots[0].start, slots[-1].start + slots[-1].kp
        if (lo, hi) not in self.sizes:
            self.sizes[(lo, hi)] = torch.cat([flags.new_full((1,), s.kp, dtype=torch.int32) for s in slots])
        return torch.repeat_interleave(flags, self.sizes[(lo, hi)], output_size=hi - lo)

    def backup(self, lo: int, hi: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(view, copy) of every state slice a step of [lo, hi) changes: moments, remainder / offsets
        and tie bits (or the fp32 master), absmax; one clone each, whatever the number of slots."""
        views = [self.moments[:, lo:hi]] + ([self.side[:, lo:hi]] if self.side is not None else [])
        views += [self.master[lo:hi]] if self.master is not None else []
        views += [self.absmax[:, lo // BLOCK:hi // BLOCK]] if self.absmax is not None else []
        return [(v, v.clone()) for v in views]

    @staticmethod
    def restore(saved: list[tuple[torch.Tensor, torch.Tensor]], skip: torch.Tensor) -> None:
        """Put the saved values back where `skip` (per entry; absmax: its 256-entry blocks) is True."""
        for view, copy in saved:
            mask = skip if view.shape[-1] == skip.numel() else skip[::BLOCK]  # slots are 256-aligned
            torch.where(mask, copy, view, out=view)  # in place: no second temporary

    def shared_nbytes(self) -> dict[str, int]:
        """Bytes of the bank's own tensors beyond its slots' shares: the block starts, the runs'
        tables and the padding zeros."""
        return {"indices": self.starts.nbytes + sum(t.nbytes for table in self.tables.values() for t in table),
                "optimizer_states": self._pad.nbytes + sum(t.nbytes for t in self.sizes.values())}

    def step(self, states: list[SparseState], grads: list[torch.Tensor], hp: dict, qmaps, scale: float = 1.0,
             skip: torch.Tensor | None = None, idx: list[torch.Tensor] | None = None) -> None:
        """One AdamW step of `states` (consecutive in this bank, same step count, already advanced)
        on `grads`, in chunks of <= CHUNK entries: one bitsandbytes call per chunk. `skip`: a device
        bool per entry of the run (skip_mask), True leaves those weights untouched (the caller
        restores the state); `idx`: per state its decoded indices, when the caller has them already."""
        items = list(zip(states, grads, idx or [None] * len(states)))
        chunk, size = [], 0
        for item in items + [None]:
            s = item[0] if item else None
            if chunk and (s is None or size + s.kp > CHUNK or s.start != chunk[-1][0].start + chunk[-1][0].kp):
                lo = chunk[0][0].start - states[0].start
                part = None if skip is None else skip[lo:lo + size]
                self._step_chunk(chunk, hp, qmaps, scale, part)
                chunk, size = [], 0
            if item:
                chunk.append(item)
                size += s.kp

    def _step_chunk(self, chunk, hp, qmaps, scale, skip):
        slots, grads, given = (list(t) for t in zip(*chunk))
        lo, hi = slots[0].start, slots[-1].start + slots[-1].kp
        n, dev = hi - lo, self.device
        parts = []  # the gradients and zeros for each slot's padding, concatenated into fp32 in one call
        for s, grad in zip(slots, grads):
            parts += [grad, self._pad[:s.kp - s.k]]
        g = torch.cat(parts, out=torch.empty(n, dtype=torch.float32, device=dev))
        if given[0] is not None:
            idx = given
        elif all(s.sparse for s in slots):  # one decode for the run
            flat = self.chunk_indices(slots, lo, hi)
            idx = [flat[s.start - lo:s.start - lo + s.k] for s in slots]
        else:
            idx = [s.indices() for s in slots]
        w = None
        if self.kind != "fp32" or skip is not None:
            w = torch.zeros(n, dtype=self.dtype, device=dev)  # padding stays 0 (no effect on the moments)
            for s, i in zip(slots, idx):
                s.weights(i, out=w[s.start - lo:s.start - lo + s.k])
        if self.kind == "fp32":
            p = self.master[lo:hi]  # the kernel updates the master in place
        else:
            p = w if self.kind == "own" else decode_master(w, self.rem[lo:hi], self.aux[lo:hi])
        old = w.clone() if skip is not None and self.kind == "own" else w  # "own": the kernel updates w
        beta1, beta2 = hp["betas"]
        step = slots[0].step
        if self.eightbit:
            bnbf.optimizer_update_8bit_blockwise(
                "adam", g=g, p=p, state1=self.moments[0, lo:hi], state2=self.moments[1, lo:hi],
                beta1=beta1, beta2=beta2, beta3=0.0, alpha=0.0, eps=hp["eps"], step=step, lr=hp["lr"],
                qmap1=qmaps[0], qmap2=qmaps[1], absmax1=self.absmax[0, lo // BLOCK:hi // BLOCK],
                absmax2=self.absmax[1, lo // BLOCK:hi // BLOCK], weight_decay=hp["weight_decay"],
                gnorm_scale=scale)
        else:
            bnbf.optimizer_update_32bit(
                "adam", g=g, p=p, state1=self.moments[0, lo:hi], beta1=beta1, eps=hp["eps"], step=step,
                lr=hp["lr"], state2=self.moments[1, lo:hi], beta2=beta2, weight_decay=hp["weight_decay"],
                gnorm_scale=scale)
        new = encode_master(p, self.rem[lo:hi], self.aux[lo:hi]) if self.kind == "rem" else p
        if skip is not None:  # one where for the chunk: skipped slots write their old weights back
            new = torch.where(skip, old, new.to(self.dtype))
        for s, i in zip(slots, idx):
            s.write_weights(new[s.start - lo:s.start - lo + s.k], i)


class SparseState:
    """One trained tensor: which entries, their master values and moments (views into its Bank).

    `k` entries (all of them when trained densely), padded to `kp` in the bank at entry `start`.
    Sparse, it is the `sift.entries.Entries` holder of a weight whose trained values live in the
    weight itself: k entries of the slice [lo, hi) of its flat weight, chosen by rule `selection`.
    Dense, it trains a whole parameter, which may be the values of another holder's entries
    (`holder`: QSIFTLinear for its delta, whose base is 0 by definition). `entries` is, either way,
    the holder whose entries these values are (None for a plain dense parameter).
    Public: indices(), flat_indices(), values(), set_values(), nbytes(), state(), load(), ready(),
    select(); the rest serves SIFT's hooks and step.
    """

    def __init__(self, name: str, param: nn.Parameter, k: int | None, grad_dtype: torch.dtype | None = None,
                 holder=None, selection: str = "grad", lo: int = 0, hi: int | None = None):
        self.name, self.param = name, param
        self.zero_base = holder is not None  # an increment itself (QSIFT's delta): base 0, no host copy
        self.grad_dtype = grad_dtype or param.dtype  # the deferred gradient's until it accumulates (exact)
        self.numel = numel(param)
        # The slice [lo, hi) of the flat weight this rank holds, whose storage flat_weight(param) is:
        # all of it with one rank, ZeRO-2, ZeRO-3 on one rank. Indices are kept, decoded and written
        # relative to lo; the selection and the increment speak of the whole weight. A dense state
        # trains its whole parameter.
        self.lo, self.hi = lo, self.numel if hi is None else hi
        self.selection = selection
        self.sparse = k is not None
        self.entries = self if self.sparse else holder
        self.k = k if self.sparse else self.numel
        self.kp = math.ceil(self.k / BLOCK) * BLOCK
        self.start = 0
        self.bank: Bank | None = None
        self.step = 0
        self.stepped = False  # step_in_backward: already updated since the last opt.step()
        self.counts = None    # int32 [blocks]: how many trained entries each index block holds
        self.grad = None      # the accumulated sparse gradient (weight dtype; fp32 once accumulated)
        self.base = None      # host copy of the trained entries' base values (weight dtype): the increment's deltas
        self._ready = not self.sparse

    # ---------------------------------------------------------------- views into the bank
    def _view(self, t):
        return None if t is None else t[..., self.start:self.start + self.k]

    @property
    def device(self) -> torch.device:
        return self.bank.device

    def ready(self) -> bool:
        return self._ready

    def select(self, idx: torch.Tensor | None) -> None:
        """Fix the trained entries (sorted flat indices of the whole weight inside [lo, hi), on any
        device; None: dense) and take their base values."""
        if idx is not None:
            b = self.bank
            idx = idx.to(self.device)
            self.counts = encode(idx, self.lo, self.hi, out=self._view(b.aux))[1]
            if b.starts.numel() < self.counts.numel():
                b.starts = block_starts(0, self.hi - self.lo, idx.device)
            b.tables.clear()
            self._ready = True
        w = self.weights(self.indices())
        self.base = None if self.zero_base else to_host(w)
        if self.bank.kind == "fp32":
            self._view(self.bank.master).copy_(w)

    def indices(self) -> torch.Tensor | None:
        """Sorted int64 indices into this rank's slice of the flat weight (the flat indices when the
        slice is the whole weight), decoded on the device (a k-sized temporary); None if dense."""
        if not self.sparse:
            return None
        b = self.bank
        return decode(self._view(b.aux), self.counts, b.starts[:self.counts.numel()], flagged=b.flagged)

    def flat_indices(self) -> torch.Tensor:
        """The trained entries as flat indices of the whole weight (int32 unless numel >= 2^31), in a
        new tensor: what state_dict and the increment store."""
        idx = self.indices()
        return (idx + self.lo if self.lo else idx).to(index_dtype(self.numel))

    def dense_weight(self) -> torch.Tensor:
        """The weight as the rank holds it, flat (what the magnitude rule reads)."""
        return flat_weight(self.param)

    # ---------------------------------------------------------------- gather / scatter
    def gather(self, dense: torch.Tensor, idx: torch.Tensor | None, out: torch.Tensor | None = None):
        """`dense`'s trained entries, on this state's device. Device-correct both ways: the indices
        move to the dense tensor's device (ZeRO-3: the host partition), the result to ours."""
        flat = dense.reshape(-1)
        if idx is None:
            return flat.to(self.device) if out is None else out.copy_(flat)
        idx = idx.to(flat.device)
        if out is not None and out.device == flat.device and out.dtype == flat.dtype:
            return torch.index_select(flat, 0, idx, out=out)  # straight into the chunk: no copy
        vals = flat.index_select(0, idx)
        return vals.to(self.device) if out is None else out.copy_(vals)

    def weights(self, idx, out=None) -> torch.Tensor:
        return self.gather(flat_weight(self.param), idx, out)

    def write_weights(self, values: torch.Tensor, idx: torch.Tensor | None) -> None:
        targets = [flat_weight(self.param)]
        if hasattr(self.param, "ds_tensor") and self.param.data.numel() == self.numel:
            targets.append(self.param.data.view(-1))  # a ZeRO-3 persistent (or gathered) copy too
        for flat in targets:
            vals = values.to(flat.device, flat.dtype)
            if idx is None:
                if vals.data_ptr() != flat.data_ptr():
                    flat.copy_(vals)
            else:  # indexed copy: no dense temporary of the weight
                flat.index_copy_(0, idx.to(flat.device), vals)

    def values(self) -> torch.Tensor:
        """Current trained values in fp32, as a new tensor (k)."""
        kind = self.bank.kind
        if kind == "fp32":
            return self._view(self.bank.master).clone()
        w = self.weights(self.indices())
        if kind == "own":
            return w.clone() if w.data_ptr() == flat_weight(self.param).data_ptr() else w
        return decode_master(w, self._view(self.bank.rem), self._view(self.bank.aux))

    def set_values(self, values: torch.Tensor) -> None:
        """Master and weight from fp32 `values` (resume)."""
        values = values.to(self.device, torch.float32)
        kind, idx = self.bank.kind, self.indices()
        if kind == "rem":
            w = encode_master(values.clone(), self._view(self.bank.rem), self._view(self.bank.aux))
        else:
            if kind == "fp32":
                self._view(self.bank.master).copy_(values)
            w = values
        self.write_weights(w, idx)

    # ---------------------------------------------------------------- public state
    def nbytes(self) -> dict[str, int]:
        """Persistent device bytes of this tensor's share of the bank (padding included), by kind."""
        b, kp = self.bank, self.kp
        out = {"indices": (2 * kp if b.sparse else 0) + (self.counts.nbytes if self.counts is not None else 0),
               "master": (2 * kp if b.rem is not None else 0) + (4 * kp if b.master is not None else 0),
               "optimizer_states": b.moments.element_size() * 2 * kp + (8 * kp // BLOCK if b.absmax is not None else 0)}
        return out

    def state(self) -> dict:
        """Self-contained: indices, values and base travel, so a fresh base model can resume."""
        b, nb = self.bank, self.kp // BLOCK
        st = {"step": self.step, "shape": list(shape(self.param)), "k": self.k, "values": self.values(),
              # padded: an 8-bit padding code is the quantised 0 after a step, not the initial code 0
              "state1": b.moments[0, self.start:self.start + self.kp].clone(),
              "state2": b.moments[1, self.start:self.start + self.kp].clone()}
        if self.base is not None:
            st["base"] = self.base
        if self.sparse:
            st["indices"] = self.flat_indices()
        if b.absmax is not None:
            st["absmax1"], st["absmax2"] = (b.absmax[i, self.start // BLOCK:self.start // BLOCK + nb].clone()
                                            for i in (0, 1))
        return st

    def problems(self, st: dict) -> list[str]:
        """Why `st` cannot continue this tensor (empty if it can); touches nothing."""
        out = []
        if "shape" in st and list(st["shape"]) != list(shape(self.param)):
            out.append(f"{self.name}: saved shape {list(st['shape'])}, this model's is {list(shape(self.param))}")
        n = st["indices"].numel() if "indices" in st else st["values"].numel()
        if ("indices" in st) != self.sparse:
            out.append(f"{self.name}: saved {'sparse' if 'indices' in st else 'dense'}, trained "
                       f"{'sparse' if self.sparse else 'dense'} here")
        elif n != self.k:
            out.append(f"{self.name}: {n} saved entries, this configuration trains {self.k}")
        want = torch.uint8 if self.bank.eightbit else torch.float32
        if st["state1"].dtype != want:
            out.append(f"{self.name}: saved moments are {st['state1'].dtype}, this optimizer keeps {want}")
        elif st["state1"].numel() != self.kp and not out:
            out.append(f"{self.name}: {st['state1'].numel()} saved moments, expected {self.kp}")
        return out

    def load(self, st: dict) -> None:
        b, nb = self.bank, self.kp // BLOCK
        if self.sparse:
            self.select(st["indices"].long())
        self.base = st["base"].clone() if "base" in st and not self.zero_base else self.base
        for i, key in enumerate(("state1", "state2")):
            b.moments[i, self.start:self.start + self.kp].copy_(st[key])
        if b.absmax is not None:
            for i, key in enumerate(("absmax1", "absmax2")):
                b.absmax[i, self.start // BLOCK:self.start // BLOCK + nb].copy_(st[key])
        self.step = st["step"]
        self.set_values(st["values"])
        self._ready = True
