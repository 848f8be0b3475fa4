"""SIFT on several ranks that each hold a slice of every weight (DeepSpeed ZeRO-3).

ZeRO-3 partitions each flat weight of `numel` entries over the N ranks of its process group: rank r
holds [r P, min((r + 1) P, numel)) in `p.ds_tensor` (P: the partition size; the last rank's partition
ends in padding). A sharded slot (`ShardedState`) is the sift.state.SparseState of that slice: rank r
keeps indices, master remainder and moments only of the selected entries inside its slice, and its
updates go straight into its partition, so SIFT's state per rank is 1/N of a single rank's (plus
each tensor's 256-entry padding). What takes collectives, per slot (`Shard`):

  selection  every rank picks over the whole weight alike (sift.selection: the first micro-batch's
             gradient summed over ranks by `agree`, a dense all-reduce once per tensor) and keeps what
             lies in its slice: one host read per tensor (where the slice begins and ends in the
             sorted selection). A rank's k_r depends on the data, so a sharded sparse slot gets a
             Bank of its own, sized to k_r then: its step is one bitsandbytes call per tensor, not
             one per 2^22 entries of a bank.
  gradient   (`sparse_sum`, per tensor and micro-batch, in the hook while the local dense gradient
             exists) every rank needs the others' gradients at its entries, and only those values
             cross: the ranks all-gather their compact indices (int16 offsets + int32 block counts of
             their slice), decode them all in one pass, gather their local gradient at every rank's
             entries and send each rank its part (all_to_all in the gradient's dtype), which sums the
             N parts in fp32, in rank order. Per tensor, with k = sum of k_r and s the gradient's
             bytes (2 bf16, 4 fp32), a rank sends 2 B x k_r + 4 B x P / 2^15 (indices, to each of the
             others) + s x (k - k_r) (values) and receives the same pattern; transient: k x (4 + 8 + s)
             B (gathered and packed offsets, decoded int64 indices, gathered values) + N x k_r x (s + 4),
             freed in the hook. No dense gradient crosses ranks, and DeepSpeed reduces none (the
             trained weights are not in its optimizer, trainer.ds).
  dense      a densely trained parameter (norms under --sift_dense, QSIFT's delta) trains its slice
             [lo, hi); its gradient is the same all_to_all with the slices as the parts (`dense_sum`).
  norm       the clipping norm's sum of squares is all-reduced (sift.optimizer).
  skip       in-backward, each tensor's non-finite flag is all-reduced (`agree_flag`): every rank
             skips the same tensors; deferred, the all-reduced norm decides alike on every rank.
  files      a checkpoint holds each rank's own state; the increment is gathered into the one-rank
             file (`gather_whole`, `Whole`).
Writes into a partition reach DeepSpeed's gathered copies at its next step boundary (trainer.ds:
SIFT steps before DeepSpeed's boundary step, which releases every gathered weight).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn

from .codec import block_starts, decode, index_dtype, num_blocks
from .increment import Tables
from .state import BLOCK, SparseState, shape


def sharded(p: nn.Parameter) -> bool:
    """Whether `p` is a ZeRO-3 parameter partitioned over several ranks."""
    if not hasattr(p, "ds_tensor") or not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(getattr(p, "ds_process_group", None)) > 1


def _wire(t: torch.Tensor) -> torch.Tensor:
    """`t` as bytes for a collective that only moves data (gloo and NCCL move no int16)."""
    return t.contiguous().view(-1).view(torch.uint8)


def write_whole(param: nn.Parameter, full: torch.Tensor) -> None:
    """Set a parameter to the whole tensor `full`: under ZeRO-3 this rank's partition of it (and the
    gathered data, while the parameter is gathered); else its data."""
    flat = full.detach().reshape(-1)
    if not hasattr(param, "ds_tensor"):
        param.data.view(-1).copy_(flat.to(param.device))
        return
    part = param.ds_tensor.data.view(-1)
    group = getattr(param, "ds_process_group", None)
    rank = dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0
    lo = min(rank * part.numel(), flat.numel())
    n = min(part.numel(), flat.numel() - lo)
    part[:n].copy_(flat[lo:lo + n])
    if param.data.numel() == flat.numel():
        param.data.view(-1).copy_(flat.to(param.device))


class Shard:
    """The collectives of one ZeRO-3 parameter's slices: its process group, every rank's slice of
    the flat weight, and every rank's entry count (learnt at the first exchange)."""

    def __init__(self, p: nn.Parameter):
        self.group = getattr(p, "ds_process_group", None)
        self.rank, self.world = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.numel = p.ds_numel
        size = getattr(p.ds_tensor, "ds_numel", None) or p.ds_tensor.numel()  # P, the padded partition
        self.lows = [min(r * size, self.numel) for r in range(self.world)]
        self.highs = [min((r + 1) * size, self.numel) for r in range(self.world)]
        self.lo, self.hi = self.lows[self.rank], self.highs[self.rank]
        self.ks: list[int] | None = None  # entries of each rank's slice
        self.sent = 0                     # bytes this rank has sent for this tensor

    def sizes(self) -> list[int]:
        """Every rank's slice size: the parts of a densely trained parameter."""
        return [hi - lo for lo, hi in zip(self.lows, self.highs)]

    def learn(self, k: int, device) -> list[int]:
        """Every rank's entry count (an all-gather of one int, once per tensor and run)."""
        if self.ks is None:
            out = torch.zeros(self.world, dtype=torch.int64, device=device)
            dist.all_gather_into_tensor(out, torch.tensor([k], device=device), group=self.group)
            self.ks = out.tolist()
        return self.ks

    def sum_parts(self, values: torch.Tensor, parts: list[int]) -> torch.Tensor:
        """Each rank's part of `values` (consecutive, of sizes `parts`) sent to it; returns this rank's
        part summed over the ranks in fp32, in rank order."""
        mine = parts[self.rank]
        recv = values.new_empty(self.world * mine)
        dist.all_to_all_single(recv, values, output_split_sizes=[mine] * self.world, input_split_sizes=parts,
                               group=self.group)
        self.sent += (values.numel() - mine) * values.element_size()
        recv = recv.view(self.world, mine)
        out = recv[0].to(torch.float32, copy=True)
        for r in range(1, self.world):
            out.add_(recv[r])
        return out

    def dense_sum(self, flat: torch.Tensor, device) -> torch.Tensor:
        """The whole parameter's local gradient `flat`, summed over ranks on this rank's slice (fp32)."""
        return self.sum_parts(flat.to(device), self.sizes())

    def sparse_sum(self, state: "ShardedState", flat: torch.Tensor) -> torch.Tensor:
        """The local gradient `flat` of the whole weight, summed over ranks at this rank's entries."""
        offsets, counts, flagged = state.encoded()
        dev = offsets.device
        ks = self.learn(offsets.numel(), dev)
        width = max(ks) + max(ks) % 2  # even: every row's counts start 4-byte aligned
        blocks = num_blocks(0, self.highs[0] - self.lows[0])
        buf = torch.zeros(width + 2 * blocks, dtype=torch.int16, device=dev)
        buf[:offsets.numel()] = offsets
        buf[width:width + 2 * counts.numel()].view(torch.int32).copy_(counts)
        rows = torch.empty(self.world, buf.numel(), dtype=torch.int16, device=dev)
        dist.all_gather_into_tensor(_wire(rows), _wire(buf), group=self.group)
        self.sent += buf.nbytes * (self.world - 1)
        del buf
        dtype = index_dtype(self.numel)
        bounds = list(zip(self.lows, self.highs))
        starts = torch.cat([block_starts(lo, hi, dev, dtype) for lo, hi in bounds])
        packed = torch.cat([rows[r, :ks[r]] for r in range(self.world)])
        counts = torch.cat([rows[r, width:width + 2 * num_blocks(lo, hi)].view(torch.int32)
                            for r, (lo, hi) in enumerate(bounds)])
        del rows
        idx = decode(packed, counts, starts, flagged)  # every rank's entries, flat, sorted
        del packed
        values = flat.index_select(0, idx.to(flat.device)).to(dev)
        del idx
        return self.sum_parts(values, ks)

    def agree_flag(self, flag: torch.Tensor) -> torch.Tensor:
        """A tensor's non-finite flag (0, or NaN / inf) summed over ranks: the same on every rank."""
        dist.all_reduce(flag, group=self.group)
        return flag

    def gather_whole(self, t: torch.Tensor, parts: list[int]) -> torch.Tensor:
        """Every rank's `t` (of sizes `parts`) concatenated in rank order, on every rank."""
        width = max(parts)
        buf = t.new_zeros(width)
        buf[:t.numel()] = t
        rows = t.new_empty(self.world, width)
        dist.all_gather_into_tensor(_wire(rows), _wire(buf), group=self.group)
        return torch.cat([rows[r, :n] for r, n in enumerate(parts)])


class ShardedState(SparseState):
    """A SparseState of this rank's slice of a ZeRO-3 parameter partitioned over several ranks.

    Sparse, it keeps the selected entries inside [lo, hi) in a Bank of its own (`make_bank(slot)`,
    made when they are chosen: k_r is known then); dense, it trains the slice [lo, hi). Its gradient
    comes summed over ranks (fp32): `Shard.sparse_sum` / `Shard.dense_sum`.
    """

    def __init__(self, name: str, param: nn.Parameter, k: int | None, make_bank, holder=None,
                 selection: str = "grad"):
        shard = Shard(param)
        super().__init__(name, param, k, torch.float32, holder, selection, lo=shard.lo, hi=shard.hi)
        self.shard, self.make_bank = shard, make_bank

    @property
    def device(self) -> torch.device:
        return torch.device(str(self.param.device))  # its bank's, also before the bank is made

    def select(self, idx: torch.Tensor | None) -> None:
        """Keep the entries of the whole weight's selection `idx` that lie in [lo, hi) (one host read)."""
        if idx is not None:
            ends = torch.tensor([self.lo, self.hi], device=idx.device, dtype=idx.dtype)
            a, b = torch.searchsorted(idx, ends).tolist()
            idx = idx[a:b]
            if self.bank is None or self.k != b - a:
                self.k, self.kp, self.start = b - a, math.ceil((b - a) / BLOCK) * BLOCK, 0
                self.bank = self.make_bank(self)
        super().select(idx)

    def encoded(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(offsets in their bank row, block counts, whether the offsets carry the tie bit)."""
        return self._view(self.bank.aux), self.counts, self.bank.flagged

    def dense_grad(self, grad: torch.Tensor) -> torch.Tensor:
        return self.shard.dense_sum(grad.reshape(-1), self.device)

    def dense_weight(self) -> torch.Tensor:
        """The whole weight, gathered from every rank's slice (the magnitude rule reads it; transient)."""
        return self.shard.gather_whole(self.storage(), self.shard.sizes())

    def nbytes(self) -> dict[str, int]:
        if self.bank is None:  # entries not chosen yet: nothing held
            return {"indices": 0, "master": 0, "optimizer_states": 0}
        return super().nbytes()

    def state(self) -> dict:
        return {**super().state(), "slice": torch.tensor([self.lo, self.hi])}

    def load(self, st: dict) -> None:
        if self.sparse:
            self.select(st["indices"].long())  # its bank first, sized to the saved entries
        super().load(st)

    def problems(self, st: dict) -> list[str]:
        """A saved state of another slice, or another kind, is refused (the saved k_r is this slice's)."""
        if not self.sparse:
            return super().problems(st)
        saved = st.get("slice")
        if saved is None or saved.tolist() != [self.lo, self.hi]:
            where = "one rank's whole weight" if saved is None else f"the slice {saved.tolist()}"
            return [f"{self.name}: saved for {where}, this rank holds [{self.lo}, {self.hi}) of "
                    f"{list(shape(self.param))}: resume with the same ZeRO-3 launch (stage and ranks)"]
        n = st["indices"].numel() if "indices" in st else -1
        if n < 0 or st["state1"].numel() != math.ceil(n / BLOCK) * BLOCK:
            return [f"{self.name}: saved state is not a sparse slice state"]
        return []


class Whole(Tables):
    """The whole tensors of a sharded SIFT, gathered from every rank into one process: what
    sift.increment reads from an optimizer (`cfg`, `selected_indices`, `trained_values`,
    `base_values`, `shapes`), so the increment is the file a single rank writes."""

    def __init__(self, opt, keep: bool):
        """Collective: every rank calls it, in the same order; only where `keep` the tensors stay
        (on the host: the whole increment, one tensor gathered at a time)."""
        super().__init__(opt.cfg, {}, {}, {}, {})
        base = opt.base_values()
        for s, values in zip([s for s in opt.slots if s.ready()], opt.trained_values().values()):
            parts = self.parts(s)
            got = [values, base[s.name].to(values.device)] + ([s.flat_indices()] if s.sparse else [])
            if s.shard is not None:
                got = [s.shard.gather_whole(t, parts) for t in got]
            if keep:
                self.values[s.name], self.bases[s.name] = got[0].cpu(), got[1].cpu()
                if s.sparse:
                    self.indices[s.name] = got[2].cpu()
                self.dims[s.name] = shape(s.param)

    @staticmethod
    def parts(s: SparseState) -> list[int]:
        if s.shard is None:
            return [s.k]
        return s.shard.learn(s.k, s.device) if s.sparse else s.shard.sizes()
