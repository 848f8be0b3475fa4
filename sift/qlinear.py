"""QSIFTLinear: a frozen bitsandbytes 4-bit weight plus a trained sparse fp32 delta.

Effective weight W = deq(Q) + scatter(indices, delta), in the weight's dtype. The delta is a
k-sized fp32 `nn.Parameter` that SIFT trains densely (sift/targets.py routes it there); the layer is
the `sift.entries.Entries` holder of those k entries: the indices (sorted, flat; kept compact with
sift.codec in buffers) are chosen by a sift.selection rule, before training (random, magnitude) or
inside the first backward from that micro-batch's dL/dW (grad: which also trains on it).

Memory: the dequantized weight and the dense weight gradient exist only inside this layer's
forward / backward (one layer at a time, freed before the next layer runs); what persists is
Q (0.5 B/entry + absmax) and, per trained entry, delta (4 B) and its index in 2 B: a 15-bit offset
inside its block of 2^15 entries plus the block's entry count (int32 per block), decoded into flat
indices transiently per layer (k x 4 B in index_dtype, no host sync).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from bitsandbytes import functional as bnbf

from .codec import block_starts, decode, encode, index_dtype
from .entries import select_before_training, sparse_grad

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZE = 64

# Test instrumentation: each callable gets every transient dense tensor (dequantized weight,
# dense weight gradient) as it is born, so a test can count how many are alive at once.
TRANSIENT_OBSERVERS: list = []


def _born(t: torch.Tensor) -> torch.Tensor:
    for observe in TRANSIENT_OBSERVERS:
        observe(t)
    return t


class QSIFTLinear(nn.Module):
    """y = x W^T + b with W = deq(Q) + scatter(indices, delta); only delta is trained."""

    sift_dense_params = ("delta",)  # sift.targets: train these densely, never sparsely
    lo = 0  # sift.entries: the slice of the flat weight this layer holds is all of it

    def __init__(self, packed: torch.Tensor, quant_state, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = quant_state.shape
        self.quant_state = quant_state
        self.register_buffer("weight_4bit", packed, persistent=False)
        # A buffer, not a parameter: the bias stays frozen and never becomes a SIFT target.
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)
        self.delta = None
        self.register_buffer("offsets", None)  # int16 per entry: its offset in its 2^15-entry block (sift.codec)
        self.register_buffer("counts", None)   # int32 per block: how many entries it holds
        self.k = 0
        self.selection = "grad"  # the sift.selection rule that picks the entries

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
    def numel(self) -> int:
        return self.out_features * self.in_features

    @property
    def hi(self) -> int:
        return self.numel

    # ------------------------------------------------------------ sift.entries.Entries
    def ready(self) -> bool:
        return self.offsets is not None and self.offsets.numel() == self.k > 0

    def indices(self) -> torch.Tensor | None:
        """Sorted flat indices (int32 unless numel >= 2^31), decoded into one new k-sized tensor (4 B
        per entry at LLaMA shapes; 3 launches, no host sync); None before the entries are chosen."""
        if not self.ready():
            return None
        return decode(self.offsets, self.counts, block_starts(0, self.numel, self.offsets.device, index_dtype(self.numel)))

    def flat_indices(self) -> torch.Tensor:
        """What the increment stores: the same as indices()."""
        return self.indices()

    def select(self, idx: torch.Tensor) -> None:
        """Fix the entries: sorted flat indices, on any device."""
        idx = idx.to(self.weight_4bit.device)
        self.offsets, self.counts = encode(idx, 0, self.numel)

    def dense_weight(self) -> torch.Tensor:
        return self.dequantized()

    def index_tensors(self) -> list[torch.Tensor]:
        """The persistent index state (for memory counts)."""
        return [t for t in (self.offsets, self.counts) if t is not None]

    def attach(self, rate: float, selection: str = "grad", generator: torch.Generator | None = None):
        """Create delta (k = ceil(rate x numel) zeros, fp32) and, if `selection` needs no gradient,
        choose the entries now (else in the first backward)."""
        dev = self.weight_4bit.device
        self.k = math.ceil(rate * self.numel)
        self.delta = nn.Parameter(torch.zeros(self.k, dtype=torch.float32, device=dev))
        self.offsets, self.counts, self.selection = torch.empty(0, dtype=torch.int16, device=dev), None, selection
        select_before_training(self, generator)

    # ------------------------------------------------------------ weights
    def dequantized(self) -> torch.Tensor:
        """deq(Q): a fresh dense tensor in the weight's dtype (transient: callers drop it)."""
        return _born(bnbf.dequantize_4bit(self.weight_4bit, self.quant_state))

    def effective_weight(self, delta: torch.Tensor | None = None, idx: torch.Tensor | None = None) -> torch.Tensor:
        """deq(Q) with delta added at the selected entries (`idx`: their decoded indices, if at
        hand), rounded once to the weight's dtype."""
        w = self.dequantized()
        delta = self.delta if delta is None else delta
        if delta is not None and self.ready():
            flat = w.view(-1)
            idx = self.indices() if idx is None else idx
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
        idx = layer.indices()  # once, before any dense tensor exists (None before the first selection)
        if ctx.needs_input_grad[0]:
            w = layer.effective_weight(delta, idx)
            dx = gy @ w
            del w  # freed before dW exists: one dense weight-sized tensor at a time
        if ctx.needs_input_grad[1]:
            dw = _born(gy.reshape(-1, gy.shape[-1]).t() @ x.reshape(-1, x.shape[-1]))
            # the first call selects; in dW's dtype: autograd casts it to delta's fp32 after this
            # returns, once dW is gone
            _, g = sparse_grad(layer, dw, idx)
            del dw  # the dense weight gradient dies here, inside this layer's backward
        return dx, g, None
