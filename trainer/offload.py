"""--offload_activations: the tensors the forward saves for backward wait in host memory.

With gradient checkpointing these are, above all, every decoder layer's input (torch's
non-reentrant checkpoint saves them through the saved-tensor hooks; what a checkpointed layer
saves inside itself is recomputed in backward and never offloaded): 2 B x tokens x hidden per
layer, 0.5 GiB at LLaMA-7B / seq 2048, 0.78 GiB at 13B. The same idea as torchtune's activation
offloading, on PyTorch's own mechanism (torch.autograd.graph.saved_tensors_hooks, like
torch.autograd.graph.save_on_cpu). Each saved tensor crosses the host link twice per step (a
copy to pinned memory in forward, back in backward), so it trades step time for GPU memory.
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import _disable_current_modes

MIN_BYTES = 2**20  # smaller saved tensors stay: moving them costs more than they free
ATTR = "_sift_offload"


class Offload(torch.autograd.graph.saved_tensors_hooks):
    """Saved activations (never parameters) of >= `min_bytes` on one of `devices` move to host memory
    until backward unpacks them. On CUDA: a pinned copy, asynchronous both ways. On "meta" (the memory
    planner) a stand-in made outside any dispatch mode, so a byte counter sees what a GPU would still
    hold; `offloaded_bytes` counts what went to the host in the last forward. On "cpu" (tests) a copy."""

    def __init__(self, min_bytes: int = MIN_BYTES, devices=("cuda", "meta")):
        self.min_bytes, self.devices = min_bytes, tuple(devices)
        self.offloaded_bytes = self.offloaded_tensors = 0
        super().__init__(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor):
        if t.device.type not in self.devices or isinstance(t, torch.nn.Parameter) or t.nbytes < self.min_bytes:
            return t
        with _disable_current_modes():  # host memory: not the device bytes a counter measures
            if t.device.type == "meta":
                host = torch.empty_like(t)
            elif t.device.type == "cuda":
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
            else:
                host = t.detach().clone()
        self.offloaded_bytes += t.nbytes
        self.offloaded_tensors += 1
        return t.device, host

    @staticmethod
    def _unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=True, copy=True)


def host_table_problem(model, trained: set[str]) -> str | None:
    """Why `model`'s input embedding table cannot live in host memory, or None: the output head
    shares it, or it trains (its name is in `trained`)."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is not None and head.weight is emb.weight:
        return ("this model ties its input embeddings to the output head (tie_word_embeddings), and a table "
                "tied to the output head must stay on the device")
    name = next(n for n, p in model.named_parameters() if p is emb.weight)
    if name in trained:
        return f"only for a frozen table, and the input embeddings ({name}) are trained here"
    return None


def embeddings_on_host_problems(skeleton, trained: set[str], deepspeed: bool) -> list[str]:
    """Every rule of --embeddings_on_host, checked on `skeleton` (the model on the meta device, or
    None when it cannot be built) with the names of the parameters the method trains."""
    out = ["--embeddings_on_host: not with --deepspeed (DeepSpeed places every weight itself)"] if deepspeed else []
    problem = host_table_problem(skeleton, trained) if skeleton is not None else None
    return out + ([f"--embeddings_on_host: {problem}"] if problem else [])


def embeddings_on_host(model) -> None:
    """--embeddings_on_host: the input embedding table (frozen) lives in host memory; each forward
    looks its rows up there and moves the [batch, seq, hidden] result to the model's device (exact:
    the same rows). Refused (ValueError, `host_table_problem`) for a table that trains or that the
    output head shares."""
    problem = host_table_problem(model, {n for n, p in model.named_parameters() if p.requires_grad})
    if problem:
        raise ValueError(problem)
    emb = model.get_input_embeddings()
    device = emb.weight.device
    if device.type == "meta":  # the planner: an uninitialised table in host memory (what it costs there)
        emb.to_empty(device="cpu")
    else:
        emb.to("cpu")

    def to_host(_module, args):
        ids = args[0]
        ids = torch.zeros(ids.shape, dtype=ids.dtype) if ids.device.type == "meta" else ids.to("cpu")
        return (ids, *args[1:])

    def to_device(_module, _args, out):  # the table is frozen: no gradient goes back to the host
        return out.detach().to(device, non_blocking=True).requires_grad_(out.requires_grad)

    emb.register_forward_pre_hook(to_host)
    emb.register_forward_hook(to_device)


def enable(model, min_bytes: int = MIN_BYTES, devices=("cuda", "meta")) -> Offload:
    """Offload what `model`'s training forward saves (trainer.loss.causal_lm_loss reads the switch)."""
    hooks = Offload(min_bytes, devices)
    setattr(model, ATTR, hooks)
    return hooks


def around_forward(*models):
    """The context the trainer's loss runs its decoder in: the first of `models` (a wrapper, the
    model it wraps) that has offload hooks, or nothing."""
    hooks = next((getattr(m, ATTR) for m in models if getattr(m, ATTR, None) is not None), None)
    if hooks is None or not torch.is_grad_enabled():  # evaluation saves nothing for backward
        return contextlib.nullcontext()
    hooks.offloaded_bytes = hooks.offloaded_tensors = 0
    return hooks
