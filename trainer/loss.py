"""The training loss, from the last hidden states: no [tokens, vocab] fp32 logits at once.

    loss = causal_lm_loss(model, batch, num_items_in_batch)
    loss, counts = train_window(model, micro_batches, device, engine)   # forward + backward of one step
    heldout_loss(model, samples, pad_id, batch_size, device)             # mean over the label tokens

HF's `model(**batch).loss` materialises the logits of every token, upcasts them to fp32 and keeps
what cross-entropy's backward needs: at Llama-3-8B shapes (vocab 128,256, 2048 tokens) one fp32
copy is 1 GiB and the loss path holds several. Here the decoder runs without its head, and the
head + cross-entropy run over chunks of tokens, each chunk under `torch.utils.checkpoint`: its
logits exist during its own forward and again (recomputed) during its own backward, never all at
once and never past the chunk. The cost is one more head matmul per step in backward (~0.6 % of a
LLaMA-7B step's FLOPs, ~2 % at Llama-3-8B's vocabulary). The head is called as a module, so what
wraps it still applies: a trained head (full fine-tuning, or a SIFT / LoRA target) gets its
gradient, a ZeRO-3 head is gathered by its module hooks, a PEFT layer adds its adapter.

On CUDA, when `liger-kernel` is installed and the head is a plain `nn.Linear`, its fused linear
cross-entropy does the same without the recomputation (it computes the gradients in forward).

Normalisation (as HF's `num_items_in_batch`): the sum of the token losses divided by
`num_items_in_batch`, the label-token count of the whole accumulation window on every rank, so
micro-batches and ranks add up to the window's token mean. Without it: this batch's token mean.
"""
from __future__ import annotations

import functools
import importlib.util

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from data_prep.dataset import collate
from data_prep.encode import IGNORE_INDEX

from . import offload

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
# fp32 logits of one chunk (its backward holds ~4 such buffers: logits, log-softmax, their grads).
# Planned at seq 2048 with checkpointing (benchmarks/README.md), 32-128 MiB leave the LLaMA-7B and
# Llama-3-8B peaks where they are with no logits at all (the per-layer recompute is higher), 256 MiB
# raises them by 0.3 GiB; fewer, larger chunks read the head's weight fewer times (128 K vocab:
# 16 chunks of 128 tokens per 2048).
CHUNK_BYTES = 64 * 2**20


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM inside a PEFT wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def label_tokens(labels: torch.Tensor) -> int:
    """Tokens that carry a loss: label positions after the shift (a host sync)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def causal_lm_loss(model, batch: dict, num_items_in_batch=None, chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """Next-token cross-entropy of `batch` (input_ids, labels, optional attention_mask / position_ids)."""
    lm = unwrap(model)
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    with offload.around_forward(model, lm):  # --offload_activations: saved layer inputs wait on the host
        hidden = lm.base_model(**inputs, use_cache=False).last_hidden_state
    # as HF's ForCausalLMLoss: position t predicts labels[t + 1], the last position predicts nothing
    labels = F.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:].to(hidden.device)
    total = head_loss_sum(lm.get_output_embeddings(), hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1),
                          chunk_bytes)
    if num_items_in_batch is None:
        num_items_in_batch = (labels != IGNORE_INDEX).sum()
    return total / num_items_in_batch


def head_loss_sum(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                  chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """Sum over tokens of cross_entropy(head(hidden), labels), ignoring IGNORE_INDEX."""
    if _liger_applies(head, hidden):
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")(
            head.weight, hidden, labels, head.bias)
    vocab = head.out_features if hasattr(head, "out_features") else head.weight.shape[0]
    chunk = max(1, chunk_bytes // (4 * vocab))
    piece = functools.partial(_chunk_loss_sum, head)
    # split (not slicing): its backward concatenates the chunks' input grads once, instead of one
    # zero-filled full-size tensor per chunk
    sums = [checkpoint(piece, h, y, use_reentrant=False) if torch.is_grad_enabled() else piece(h, y)
            for h, y in zip(hidden.split(chunk), labels.split(chunk))]
    return torch.stack(sums).sum()


def _chunk_loss_sum(head, hidden, labels):
    return F.cross_entropy(head(hidden).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def _liger_applies(head, hidden) -> bool:
    return (hidden.is_cuda and type(head) is torch.nn.Linear and not hasattr(head.weight, "ds_tensor")
            and importlib.util.find_spec("liger_kernel") is not None)


def train_window(model, micro_batches, device, engine=None) -> tuple[float, dict]:
    """Forward/backward over one accumulation window; returns (mean token loss, counts): this rank's
    real `tokens` and padded `grid` (tokens + padding), the window's `label_tokens` on all ranks.

    Normalisation: the loss is the sum of token losses over the WHOLE window (of every rank) divided
    by the window's label-token count, so accumulation 4 x batch 1, batch 4, and 2 ranks x batch 2
    all give the same gradient (up to float error), and samples weigh by their tokens.
    """
    n_labels = torch.tensor(sum(label_tokens(b["labels"]) for b in micro_batches))
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    if distributed:
        dist.all_reduce(n_labels)
    n_labels = int(n_labels)
    loss_sum, tokens, grid = torch.zeros(()), 0, 0
    for b in micro_batches:
        b = {k: v.to(device) for k, v in b.items()}
        loss = engine(b, n_labels) if engine is not None else causal_lm_loss(model, b, n_labels)
        if engine is None:
            loss.backward()
        else:
            engine.backward(loss, scale_wrt_gas=False)  # our normalisation already covers the window
            engine.step()  # DeepSpeed's micro-step bookkeeping; its anchor optimizer moves nothing
        loss_sum += loss.detach().float().cpu()  # host sync once per micro-batch, for the log
        tokens += int(b["num_tokens"] if "num_tokens" in b else b["attention_mask"].sum())  # packed rows: no mask
        grid += b["input_ids"].numel()
    if distributed:  # each rank holds its share of the window's loss
        dist.all_reduce(loss_sum)
    return float(loss_sum), {"tokens": tokens, "grid": grid, "label_tokens": n_labels}


@torch.no_grad()
def heldout_loss(model, samples, pad_id, batch_size, device) -> float:
    """Mean loss over all label tokens of the held-out samples."""
    model.eval()
    total, tokens = 0.0, 0
    for i in range(0, len(samples), batch_size):
        b = {k: v.to(device) for k, v in collate(samples[i:i + batch_size], pad_id).items()}
        n = label_tokens(b["labels"])
        total += float(causal_lm_loss(model, b, n)) * n
        tokens += n
    model.train()
    return total / max(tokens, 1)
