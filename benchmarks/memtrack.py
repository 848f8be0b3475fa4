"""Bytes held by live tensors, counted exactly: a `TorchDispatchMode` that sees every aten output.

Why not process RSS: the allocator keeps freed pages, other threads allocate, and Python objects add
noise; on 2 shared cores RSS moves by tens of MB between identical steps. What training needs from a
GPU is the bytes of live tensor storages (what `torch.cuda.max_memory_allocated` reports, minus the
allocator's 512-byte rounding), and those can be counted on any device, the meta device included.

How it counts. Every aten op that runs inside the mode hands its outputs to `_see`: a storage not
seen before is registered with its size and a weak reference whose callback subtracts it when the
storage dies (PyTorch keeps one Python object per live storage, so the callback fires exactly when
the last view of it goes). Views and in-place results share a registered storage and add nothing.
Tensors that existed before the mode (the model's weights) are added with `add`. Invisible by
construction: scratch memory inside a kernel (e.g. bitsandbytes' CPU optimizer, oneDNN workspaces),
which on a GPU would be fused-kernel registers or a small workspace.

Categories. An allocation is first labelled by the phase it happened in (`with tracker.phase(...)`):
forward -> "activations", backward -> "backward" (activation gradients, recomputed checkpointed
activations, dense weight gradients that die inside hooks), step -> "step" (optimizer scratch).
The caller then names what it can identify (`tag(params, "params")`, gradients before the step,
optimizer state after it); a tag rewrites the storage's category everywhere, including in the
snapshot taken at the peak, so the peak's breakdown is exact for everything still reachable and
phase-labelled for temporaries that died before anyone could name them.
"""
from __future__ import annotations

import contextlib
import itertools
import weakref
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

PHASE_CATEGORY = {"forward": "activations", "backward": "backward", "step": "step", None: "other"}
# "host": state a GPU run would keep in host RAM (the original SIFT's coordinates); counted here
CATEGORIES = ("params", "grads", "optimizer", "host", "activations", "backward", "step", "other")


def storages_of(t: torch.Tensor) -> list[torch.UntypedStorage]:
    """The storages behind `t` (a sparse COO tensor has two, its indices' and its values')."""
    if t.layout == torch.sparse_coo:
        return [t._indices().untyped_storage(), t._values().untyped_storage()]
    if t.layout != torch.strided:
        raise NotImplementedError(f"memtrack: layout {t.layout} is not counted")
    return [t.untyped_storage()]


class MemoryTracker(TorchDispatchMode):
    """Live tensor bytes, their peak, and what the peak was made of.

    >>> with MemoryTracker() as mt:
    ...     mt.add(model.parameters(), "params")
    ...     with mt.phase("forward"): loss = model(**batch).loss
    ...     with mt.phase("backward"): loss.backward()
    >>> mt.peak, mt.peak_breakdown()
    """

    def __init__(self):
        super().__init__()
        self._serials = itertools.count()
        self._by_id: dict[int, int] = {}          # id(storage object) -> serial, for live storages
        self._refs: dict[int, weakref.ref] = {}   # serial -> weak reference (keeps the callback armed)
        self._live: dict[int, list] = {}          # serial -> [nbytes, category]; lists shared with the snapshot
        self._peak_live: dict[int, list] = {}
        self._phase: str | None = None
        self.current = 0
        self.peak = 0
        self.ops = 0

    # ------------------------------------------------------------------ registration
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._see(t, PHASE_CATEGORY[self._phase])
        return out

    def _see(self, t: torch.Tensor, category: str) -> list[int]:
        serials = []
        for st in storages_of(t):
            serial = self._by_id.get(id(st))
            nbytes = st.nbytes()
            if serial is None:
                serial = next(self._serials)
                key = id(st)
                self._by_id[key] = serial
                self._refs[serial] = weakref.ref(st, lambda _, s=serial, k=key: self._free(s, k))
                self._live[serial] = [nbytes, category]
                self._grow(nbytes)
            elif self._live[serial][0] != nbytes:  # resized in place (resize_, out= arguments)
                old = self._live[serial]
                self._live[serial] = [nbytes, old[1]]  # a new list: the peak snapshot keeps the old size
                self._grow(nbytes - old[0])
            serials.append(serial)
        return serials

    def _grow(self, nbytes: int):
        self.current += nbytes
        if self.current > self.peak:
            self.peak = self.current
            # C-speed dict copy of a few thousand entries; it happens at most once per allocation
            self._peak_live = dict(self._live)

    def _free(self, serial: int, key: int):
        entry = self._live.pop(serial, None)
        self._refs.pop(serial, None)
        if self._by_id.get(key) == serial:
            del self._by_id[key]
        if entry is not None:
            self.current -= entry[0]

    # ------------------------------------------------------------------ naming
    def add(self, tensors, category: str):
        """Count tensors that exist already (weights built before the mode) and label them."""
        self.tag(tensors, category)

    def tag(self, tensors, category: str):
        """Label the storages of `tensors` (any nesting of lists / dicts / None) as `category`,
        registering those not seen yet. The label also applies to the peak snapshot."""
        if category not in CATEGORIES:
            raise ValueError(f"category {category!r}: choose one of {CATEGORIES}")
        for t in _leaves(tensors):
            for serial in self._see(t, category):
                self._live[serial][1] = category

    @contextlib.contextmanager
    def phase(self, name: str | None):
        """Label allocations made inside the block with the category of phase `name`."""
        if name not in PHASE_CATEGORY:
            raise ValueError(f"phase {name!r}: choose one of {[p for p in PHASE_CATEGORY if p]}")
        old, self._phase = self._phase, name
        try:
            yield
        finally:
            self._phase = old

    # ------------------------------------------------------------------ reading
    def reset_peak(self):
        """Start a new peak window at the current level (e.g. at the start of each step)."""
        self.peak = self.current
        self._peak_live = dict(self._live)

    @staticmethod
    def _by_category(entries: dict) -> dict[str, int]:
        c = Counter()
        for nbytes, category in entries.values():
            c[category] += nbytes
        return {k: c.get(k, 0) for k in CATEGORIES}

    def breakdown(self) -> dict[str, int]:
        """Bytes alive now, by category (sums to `current`)."""
        return self._by_category(self._live)

    def peak_breakdown(self) -> dict[str, int]:
        """Bytes alive at the peak, by category (sums to `peak`)."""
        return self._by_category(self._peak_live)


def nbytes_of(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a reference count for tests and reports)."""
    seen, total = set(), 0
    for t in _leaves(tensors):
        for st in storages_of(t):
            if id(st) not in seen:
                seen.add(id(st))
                total += st.nbytes()
    return total


def _leaves(tensors) -> list[torch.Tensor]:
    """Tensors in any nesting of lists / tuples / dicts, or in an iterator such as
    `model.parameters()`; None and non-tensors are skipped."""
    if not isinstance(tensors, (torch.Tensor, list, tuple, dict)):
        tensors = list(tensors)
    return [t for t in tree_leaves(tensors) if isinstance(t, torch.Tensor)]
