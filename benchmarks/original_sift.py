"""BASELINE, not ours: the memory behaviour of the SIFT paper's public implementation, re-created.

Reimplemented from the paper's description and its published hook (Song et al., ICML 2024,
github.com/song-wx/SIFT, `sift.py`), for measurement only. What it keeps, and what it costs:

- per target tensor, a sparse increment `delta` (k values, in the weight's dtype, as `p.new_zeros`
  makes it) that the optimizer trains, and its gradient (k values), allocated in the hook and freed
  by `zero_grad`;
- torch AdamW over the deltas: two moments per entry in the delta's dtype (fp32 for fp32 weights,
  as in our CPU runs: 8 bytes per entry; bf16 for bf16 weights);
- the selected coordinates as int64 (row, col) pairs, 16 bytes per entry, kept on the host (a
  numpy array in the original) and uploaded again at every merge. They are tagged "host" so the
  planner can leave them out of GPU memory; on CPU they are simply resident memory;
- selection on the first micro-batch from a dense |grad| copy, and that micro-batch is used for
  nothing else (the original returns right after choosing);
- a tensor hook that fires *before* accumulation, so each dense gradient lives in `.grad` until the
  next target's hook (one dense gradient more than necessary, and the earliest layer's survives
  backward, the optimizer step and the next forward). We reproduce that with a one-slot queue; the
  original scans every trainable parameter in every hook, an O(n) cost per hook we do not copy;
- the merge `p.data = p.data + torch.sparse_coo_tensor(idx, delta, shape)`, done in the hook of the
  next backward: a dense temporary of the whole weight, plus the (2, k) int64 index copy, alive
  while the activations are, and an update that lands one step late.

Our SIFT (sift/optimizer.py) avoids each of these; this module exists to measure by how much.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class OriginalSIFTProfile:
    """Sparse fine-tuning with the original implementation's memory profile (see module doc).

    Exposes the subset of the optimizer interface the benchmarks use: step, zero_grad,
    grads(), state_tensors(), host_tensors(), entries.
    """

    def __init__(self, targets: list[tuple[str, nn.Parameter]], rate: float, lr: float = 1e-5):
        self.params = [p for _, p in targets]
        # the original's count: min(int(rate * numel) + 1, numel)
        self.k = [min(int(rate * p.numel()) + 1, p.numel()) for p in self.params]
        self.deltas = [nn.Parameter(p.new_zeros(k)) for p, k in zip(self.params, self.k)]
        self.coords: list[torch.Tensor | None] = [None] * len(self.params)  # int64 (2, k): (row, col)
        self.opt = torch.optim.AdamW(self.deltas, lr=lr, weight_decay=0.0)  # moments in delta dtype
        self._pending: int | None = None  # index of the target whose dense .grad is still waiting
        self._hooks = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(self.params)]

    @property
    def entries(self) -> int:
        return sum(self.k)

    def _hook(self, i: int):
        @torch.no_grad()
        def hook(p):
            # the original's hook runs before accumulation and handles the *previous* target
            if self._pending is not None and self._pending != i:
                self._reduce(self._pending)
            self._pending = i
        return hook

    @torch.no_grad()
    def _reduce(self, i: int):
        p, delta = self.params[i], self.deltas[i]
        grad, p.grad = p.grad, None
        if self.coords[i] is None:
            flat = torch.topk(grad.abs().flatten(), self.k[i]).indices  # dense |grad| temporary
            # int64 (2, k) on the host (the original: .cpu().numpy() and np.unravel_index); on the
            # meta device it stays on meta, tagged "host" by host_tensors()
            coords = torch.stack([flat // p.shape[1], flat % p.shape[1]])
            self.coords[i] = coords if p.is_meta else coords.cpu()
            return  # first micro-batch: selection only
        g = grad[self.coords[i][0], self.coords[i][1]]
        del grad
        delta.grad = g if delta.grad is None else delta.grad.add_(g)
        # merge last step's update: a dense copy of the weight, while the activations are alive
        coords = self.coords[i].to(p.device, copy=True)  # upload, as sparse_coo_tensor(numpy).to(p)
        if p.is_meta:  # no sparse kernels on meta (aten::_coalesce): the same dense result, for the planner
            p.data = p.data.index_put((coords[0], coords[1]), delta.detach(), accumulate=True)
        else:
            update = torch.sparse_coo_tensor(coords, delta.detach(), p.shape, check_invariants=False)
            p.data = p.data + update
        delta.zero_()

    def step(self):
        self.opt.step()

    def zero_grad(self):
        self.opt.zero_grad(set_to_none=True)

    def grads(self) -> list[torch.Tensor]:
        return [d.grad for d in self.deltas if d.grad is not None]

    def state_tensors(self) -> list[torch.Tensor]:
        return [t for st in self.opt.state.values() for t in st.values() if torch.is_tensor(t)] + self.deltas

    def host_tensors(self) -> list[torch.Tensor]:
        return [c for c in self.coords if c is not None]

    def remove_hooks(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []

