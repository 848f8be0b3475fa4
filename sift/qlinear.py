"""QSIFTLinear: a frozen bitsandbytes 4-bit weight plus a trained sparse fp32 delta.

Effective weight W = deq(Q) + scatter(indices, delta), in the weight's dtype. The delta is a
k-sized fp32 `nn.Parameter` that SIFT trains densely (sift/targets.py routes it there); the
indices (sorted, flat; kept compact in buffers, see below) are chosen before training ("random" / "magnitude") or, for
"grad", inside the first backward from that micro-batch's |dL/dW| (which also trains on it).

Memory: the dequantized weight and the dense weight gradient exist only inside this layer's
forward / backward (one layer at a time, freed before the next layer runs); what persists is
Q (0.5 B/entry + absmax) and, per trained entry, delta (4 B) and its index in 2 B: a 16-bit offset
inside its block of 2^16 entries plus one table entry per block (the first trained entry of each
block), decoded into flat indices transiently per layer (k x 8 B, no host sync).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from bitsandbytes import functional as bnbf

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZE = 64
_OFFSET_BITS = 16  # index blocks of 2^16 entries: int16 offsets (stored minus 2^15)

# Test instrumentation: each callable gets every transient dense tensor (dequantized weight,
# dense weight gradient) as it is born, so a test can count how many are alive at once.
TRANSIENT_OBSERVERS: list = []


def _born(t: torch.Tensor) -> torch.Tensor:
    for observe in TRANSIENT_OBSERVERS:
        observe(t)
    return t


def index_dtype(numel: int) -> torch.dtype:
    return torch.int64 if numel >= 2**31 else torch.int32


class QSIFTLinear(nn.Module):
    """y = x W^T + b with W = deq(Q) + scatter(indices, delta); only delta is trained."""

    sift_dense_params = ("delta",)  # sift.targets: train these densely, never sparsely

    def __init__(self, packed: torch.Tensor, quant_state, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = quant_state.shape
        self.quant_state = quant_state
        self.register_buffer("weight_4bit", packed, persistent=False)
        # A buffer, not a parameter: the bias stays frozen and never becomes a SIFT target.
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)
        self.delta = None
        self.register_buffer("offsets", None)       # int16: (index mod 2^16) - 2^15, sorted within a block
        self.register_buffer("block_starts", None)  # int64 [blocks + 1]: position of each block's first entry
        self.k = 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", double_quant: bool = True,
                    device=None) -> "QSIFTLinear":
        """Quantize `linear.weight` (on `device`, e.g. moved to the GPU one layer at a time)."""
        w = linear.weight.detach().to(device if device is not None else linear.weight.device)
        packed, state = bnbf.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=double_quant,
                                           quant_type=quant_type)
        bias = None if linear.bias is None else linear.bias.detach().to(w.device)
        return cls(packed, state, bias)

    @classmethod
    def from_linear4bit(cls, layer) -> "QSIFTLinear":
        """Take over a bitsandbytes `Linear4bit` (transformers' BitsAndBytesConfig loader) as is."""
        return cls(layer.weight.data, layer.weight.quant_state, layer.bias)

    # ------------------------------------------------------------ sparse delta
    @property
    def quant_type(self) -> str:
        return self.quant_state.quant_type

    @property
    def double_quant(self) -> bool:
        return bool(self.quant_state.nested)

    @property
    def sift_grad_dtypes(self) -> dict[str, torch.dtype]:
        """sift.targets: delta's gradient is the weight-dtype dW gathered at the indices, so it is
        exact in that dtype (one call of this layer per micro-batch, as in every decoder)."""
        return {"delta": self.quant_state.dtype}

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    @property
    def selected(self) -> bool:
        return self.offsets is not None and self.offsets.numel() == self.k > 0

    @property
    def indices(self) -> torch.Tensor | None:
        """Sorted flat indices (int32 unless numel >= 2^31), decoded from the compact form: a new
        k-sized tensor each call (what the increment stores)."""
        return None if self.offsets is None else self._flat_indices()

    def _flat_indices(self) -> torch.Tensor:
        """Decoded in place into one k-sized tensor of `index_dtype` (4 B per entry at LLaMA shapes)."""
        counts = self.block_starts[1:] - self.block_starts[:-1]
        blocks = torch.arange(counts.numel(), device=counts.device,
                              dtype=index_dtype(self.out_features * self.in_features))
        # output_size: no host sync to learn the length
        idx = torch.repeat_interleave(blocks, counts, output_size=self.offsets.numel())
        return idx.bitwise_left_shift_(_OFFSET_BITS).add_(self.offsets).add_(2 ** (_OFFSET_BITS - 1))

    def index_tensors(self) -> list[torch.Tensor]:
        """The persistent index state (for memory counts)."""
        return [t for t in (self.offsets, self.block_starts) if t is not None]

    def attach(self, rate: float, selection: str = "grad", generator: torch.Generator | None = None):
        """Create delta (k = ceil(rate x numel) zeros, fp32) and, unless "grad", the indices."""
        n = self.out_features * self.in_features
        dev = self.weight_4bit.device
        self.k = math.ceil(rate * n)
        self.delta = nn.Parameter(torch.zeros(self.k, dtype=torch.float32, device=dev))
        self.offsets = torch.empty(0, dtype=torch.int16, device=dev)
        if selection == "random":
            self.set_indices(torch.randperm(n, generator=generator)[:self.k])
        elif selection == "magnitude":
            self.set_indices(self._topk(self.dequantized()))

    def set_indices(self, indices: torch.Tensor):
        n = self.out_features * self.in_features
        idx = indices.to(self.weight_4bit.device).long().sort().values
        blocks = -(-n // 2 ** _OFFSET_BITS)
        bounds = torch.arange(blocks + 1, device=idx.device) << _OFFSET_BITS  # static sizes: runs on meta
        self.block_starts = torch.searchsorted(idx, bounds)
        self.offsets = ((idx & (2 ** _OFFSET_BITS - 1)) - 2 ** (_OFFSET_BITS - 1)).to(torch.int16)

    def _topk(self, score: torch.Tensor) -> torch.Tensor:
        # topk over a dense |.| temporary of one layer, once per layer
        return torch.topk(score.reshape(-1).abs(), self.k, sorted=False).indices

    @torch.no_grad()
    def select_by_grad(self, grad: torch.Tensor):
        """First micro-batch: top-k |dL/dW|; with several ranks, of the summed gradient so every
        rank picks the same entries (a dense all-reduce, once per layer)."""
        score = grad
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            score = grad.clone()
            dist.all_reduce(score)
        self.set_indices(self._topk(score))

    # ------------------------------------------------------------ weights
    def dequantized(self) -> torch.Tensor:
        """deq(Q): a fresh dense tensor in the weight's dtype (transient: callers drop it)."""
        return _born(bnbf.dequantize_4bit(self.weight_4bit, self.quant_state))

    def effective_weight(self, delta: torch.Tensor | None = None, idx: torch.Tensor | None = None) -> torch.Tensor:
        """deq(Q) with delta added at the selected entries (`idx`: their decoded indices, if at
        hand), rounded once to the weight's dtype."""
        w = self.dequantized()
        delta = self.delta if delta is None else delta
        if delta is not None and self.selected:
            flat = w.view(-1)
            idx = self._flat_indices() if idx is None else idx
            vals = flat.index_select(0, idx).float().add_(delta.detach())  # in place: one fp32 k-vector
            flat.index_put_((idx,), vals.to(w.dtype))
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.delta is None or not self.delta.requires_grad or not torch.is_grad_enabled():
            with torch.no_grad():
                y = F.linear(x, self.effective_weight())
        else:
            y = _QSIFTMatmul.apply(x, self.delta, self)
        return y if self.bias is None else y + self.bias

    def _apply(self, fn, recurse=True):  # .to()/.cuda() also move the quantization state
        super()._apply(fn, recurse)
        self.quant_state.to(self.weight_4bit.device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"quant_type={self.quant_type}, double_quant={self.double_quant}, k={self.k}")


class _QSIFTMatmul(torch.autograd.Function):
    """y = x deq(Q)^T with delta at indices; backward yields dx and d(delta) = dW.flatten()[indices].

    Nothing dense is saved for backward: the weight is dequantized again there (one extra
    dequantize per layer per backward, cheap next to the matmuls), and the dense dW is formed,
    reduced to the k selected entries and dropped before this function returns.
    """

    @staticmethod
    def forward(ctx, x, delta, layer: QSIFTLinear):
        ctx.layer = layer
        ctx.save_for_backward(x, delta)
        w = layer.effective_weight(delta)
        return F.linear(x, w)

    @staticmethod
    def backward(ctx, gy):
        x, delta = ctx.saved_tensors
        layer = ctx.layer
        dx = g = None
        idx = layer._flat_indices() if layer.selected else None  # once, before any dense tensor exists
        if ctx.needs_input_grad[0]:
            w = layer.effective_weight(delta, idx)
            dx = gy @ w
            del w  # freed before dW exists: one dense weight-sized tensor at a time
        if ctx.needs_input_grad[1]:
            dw = _born(gy.reshape(-1, gy.shape[-1]).t() @ x.reshape(-1, x.shape[-1]))
            if idx is None:
                layer.select_by_grad(dw)
                idx = layer._flat_indices()
            # in dW's dtype: autograd casts it to delta's fp32 after this returns, once dW is gone
            g = dw.view(-1).index_select(0, idx)
            del dw  # the dense weight gradient dies here, inside this layer's backward
        return dx, g, None
