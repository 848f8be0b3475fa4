"""The planner's attention with CUDA FlashAttention-2's backward buffers (`FLASH2` below).

`benchmarks.models.FUSED_SDPA` gives the meta device the allocations of PyTorch's CPU flash
kernel: the output and an O(S) log-sum-exp in forward, dq / dk / dv in backward. On a GPU, SDPA's
flash backend (FlashAttention-2, `mha_bwd`) also allocates, for the duration of its backward:

    dq_accum      fp32 [batch, S rounded up to 128, heads, head_dim rounded up to 32]   (16 KiB a token at Llama-3-8B)
    dk, dv        [batch, S, heads, head_dim] in the activations' dtype, before the sum over each
                  KV head's group, when grouped-query attention has fewer KV heads (2 x 8 KiB a token)
    softmax_d     fp32 [batch, heads, S rounded up to 128]

At long sequences, where attention's backward is the peak of a tiled layer, that is 32 KiB a token
at Llama-3-8B shapes: the plan of a long sequence on a GPU must count it. This module registers an
attention implementation that runs the same CPU flash kernel (so forward and the gradients are
those of FUSED_SDPA) and allocates those buffers around its backward.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

FLASH2 = "fused_sdpa_fa2_profile"  # no "flash" prefix: transformers routes those to flash-attn packages


def _round(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def backward_buffers(q: torch.Tensor, k: torch.Tensor) -> list[torch.Tensor]:
    """FlashAttention-2's backward workspace for q [B, H, S, D] and k [B, Hkv, S, D]."""
    batch, heads, seq, dim = q.shape
    rounded = _round(seq, 128)
    out = [q.new_empty((batch, rounded, heads, _round(dim, 32)), dtype=torch.float32),
           q.new_empty((batch, heads, rounded), dtype=torch.float32)]
    if k.shape[1] != heads:
        out += [k.new_empty((batch, k.shape[2], heads, dim)) for _ in range(2)]
    return out


class _Flash2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
        ctx.scale = scale
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        workspace = backward_buffers(q, k)  # alive while the kernel runs, as on the GPU
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, True, scale=ctx.scale)
        del workspace
        return dq, dk, dv, None


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **_):
    """Causal attention of query [B, H, S, D] and key / value [B, Hkv, S, D] (unpadded rows)."""
    if attention_mask is not None:
        raise ValueError(f"{FLASH2} models unpadded causal batches: pass no attention_mask")
    if dropout:
        raise ValueError(f"{FLASH2} models attention without dropout")
    return _Flash2.apply(query, key, value, scaling).transpose(1, 2), None


AttentionInterface.register(FLASH2, _attention)
AttentionMaskInterface.register(FLASH2, sdpa_mask)
