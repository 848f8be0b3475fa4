"""The one index codec of the sparse core: sorted flat indices kept in 2 B per entry + a block table.

The trained entries of a flat weight are sorted flat indices. A rank holds the contiguous slice
[lo, hi) of that flat weight (one rank: the whole weight, lo = 0; ZeRO-3: its `ds_tensor` partition),
and the codec speaks of that slice: it cuts [lo, hi) into blocks of INDEX_BLOCK = 2^15 entries
(block b covers [lo + b 2^15, lo + (b + 1) 2^15)) and keeps

    offsets  int16 per entry: the entry's offset inside its block (15 bits, 0 .. 2^15 - 1). The top
             bit is left free for the owner: SIFT's bf16 bank keeps its master's tie flag there
             (`flagged` tells decode to mask it off);
    counts   int32 per block: how many entries fall in it (4 B per 2^15 weight entries: 0.002 B per
             entry at 5 %).

Decode is `repeat_interleave(starts, counts, output_size=k) + offsets` (2 kernels, 3 with the flag
mask) where `starts` is each block's first index: from lo for flat indices of the whole weight,
from 0 for indices into the slice itself. `output_size` makes the length known without a host sync.
The decoded dtype is the starts' dtype: int64, or `index_dtype(numel)` (int32 unless the weight has
2^31 entries or more) where 4 B per entry of transient index matter. Tables of several tensors (or
of several ranks' slices) concatenated end to end decode in one pass: the step does that for a run
of tensors.
"""
from __future__ import annotations

import torch

INDEX_BLOCK = 2**15  # weight entries per index block: 15-bit offsets, the 16th bit is the owner's flag
OFFSET_MASK = 0x7FFF  # the offset bits of an int16 entry
FLAG = -0x8000        # the top bit of an int16 entry (0x8000), as an int16 value


def index_dtype(numel: int) -> torch.dtype:
    """The narrowest integer dtype that holds every flat index of `numel` entries (increment files,
    QSIFT's decoded indices)."""
    return torch.int64 if numel >= 2**31 else torch.int32


def num_blocks(lo: int, hi: int) -> int:
    """Index blocks of the slice [lo, hi)."""
    return -(-(hi - lo) // INDEX_BLOCK)


def block_starts(lo: int, hi: int, device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """The first index of every block of [lo, hi): what decode repeats. Static sizes only (runs on meta)."""
    return torch.arange(lo, lo + num_blocks(lo, hi) * INDEX_BLOCK, INDEX_BLOCK, device=device, dtype=dtype)


def encode(idx: torch.Tensor, lo: int, hi: int, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(offsets, counts) of sorted flat indices `idx`, all inside [lo, hi). `out`: an int16 tensor of
    idx's length to write the offsets into (its flag bits are cleared); else a new one is made.
    Cost: one searchsorted over the block ends, no host sync."""
    ends = torch.searchsorted(idx, block_starts(lo, hi, idx.device) + INDEX_BLOCK)  # where each block ends in idx
    counts = torch.diff(ends, prepend=ends.new_zeros(1)).int()
    rel = idx - lo if lo else idx
    if out is None:
        return (rel & OFFSET_MASK).to(torch.int16), counts
    return out.copy_(rel & OFFSET_MASK), counts


def decode(offsets: torch.Tensor, counts: torch.Tensor, starts: torch.Tensor, flagged: bool = False) -> torch.Tensor:
    """Sorted flat indices (starts' dtype) from the offsets, their blocks' entry counts and the blocks'
    first indices (`block_starts`, from lo for indices of the whole weight, from 0 for indices into
    the slice). `flagged`: the offsets may carry the owner's top-bit flag (masked off here, one more
    k-sized int16 temporary)."""
    out = torch.repeat_interleave(starts, counts, output_size=offsets.numel())
    return out.add_(offsets & OFFSET_MASK if flagged else offsets)
