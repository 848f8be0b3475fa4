"""What a run's inputs are, told cheaply: a model by a few values per tensor, a data file by its bytes.

    fingerprint({name: (shape, values)})   # sha256 of names, shapes and values rounded to bf16
    WeightFiles(directory).read(name, flat_positions)   # values straight from the weights files
    weights_fingerprint(directory)         # every tensor of the files, 16 values each: seconds at 70B
    data_fingerprint(path)                 # sha256 of a data file (streamed), a hub dataset's snapshot

The increment's base fingerprint (sift.increment) and the resume check of train_sft.py
(trainer.rundir) hash with `fingerprint`. Weights are read lazily (safetensors slices, or torch's
mmap for a .bin checkpoint), so only the sampled entries' pages are touched, before any model loads.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

SAMPLES = 16  # values per tensor: a few thousand reads for a 7B model
_CHUNK = 1 << 20


def sample_positions(k: int) -> torch.Tensor:
    """Deterministic, evenly spread positions among k entries (at most SAMPLES)."""
    return torch.linspace(0, k - 1, min(k, SAMPLES)).round().long().unique()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def fingerprint(samples: dict[str, tuple[list[int], torch.Tensor]]) -> str:
    """sha256 (first 32 hex digits) of each tensor's name, shape and sampled values.

    Values are hashed after rounding to bf16, so the same weights loaded in fp32 or bf16 agree (a
    bf16 checkpoint upcasts exactly; an fp32 one rounds the same way training in bf16 did), while
    another model with the same shapes differs.
    """
    h = hashlib.sha256()
    for name in sorted(samples):
        shape, values = samples[name]
        h.update(f"{name}:{list(shape)};".encode())
        h.update(_bits(values.detach().to("cpu", torch.bfloat16).contiguous()).numpy().tobytes())
    return h.hexdigest()[:32]


class WeightFiles:
    """The tensors of a Hugging Face model directory's weights files, read lazily: safetensors
    (single or sharded through its index) or a pytorch_model.bin (mapped, not loaded)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.where = _weight_map(self.directory)  # {tensor name: file name}
        self._open = {}

    def __bool__(self) -> bool:
        return bool(self.where)

    def names(self) -> list[str]:
        return sorted(self.where)

    def _file(self, name: str):
        if name not in self.where:
            raise KeyError(f"{self.directory}: no tensor {name} in its weights files")
        file = self.where[name]
        if file not in self._open:
            path = self.directory / file
            if file.endswith(".safetensors"):
                from safetensors import safe_open

                self._open[file] = safe_open(str(path), "pt")
            else:
                self._open[file] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        return self._open[file]

    def shape(self, name: str) -> list[int]:
        f = self._file(name)
        return list(f[name].shape) if isinstance(f, dict) else list(f.get_slice(name).get_shape())

    def read(self, name: str, positions: torch.Tensor) -> torch.Tensor:
        """The values of tensor `name` at flat `positions` (int), in the file's dtype."""
        f = self._file(name)
        if isinstance(f, dict):
            return f[name].reshape(-1).index_select(0, positions.long())
        part = f.get_slice(name)
        shape = part.get_shape()
        if not shape:
            return part[...].reshape(1).index_select(0, positions.long())
        at = torch.unravel_index(positions.long(), tuple(shape))
        return torch.cat([part[tuple(slice(int(i), int(i) + 1) for i in idx)].reshape(1)
                          for idx in zip(*at)])


def _weight_map(directory: Path) -> dict[str, str]:
    """{tensor name: file} of the weights transformers would load from `directory` (none: {})."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (directory / index).is_file():
            with open(directory / index) as f:
                return dict(json.load(f)["weight_map"])
    if (directory / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(str(directory / "model.safetensors"), "pt") as f:
            return {name: "model.safetensors" for name in f.keys()}
    if (directory / "pytorch_model.bin").is_file():
        state = torch.load(directory / "pytorch_model.bin", map_location="cpu", mmap=True, weights_only=True)
        return {name: "pytorch_model.bin" for name in state}
    return {}


def weights_fingerprint(directory: str | os.PathLike) -> str | None:
    """The fingerprint of every tensor in `directory`'s weights files (SAMPLES values each, read
    lazily), or None when it holds none. Cost: SAMPLES small reads per tensor."""
    files = WeightFiles(directory)
    if not files:
        return None
    samples = {}
    for name in files.names():
        shape = files.shape(name)
        numel = int(torch.Size(shape).numel())
        samples[name] = (shape, files.read(name, sample_positions(numel)) if numel else torch.zeros(0))
    return fingerprint(samples)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def data_fingerprint(source: str) -> str | None:
    """`sha256:<hex>` of a data file, `hub:<commit>` of a hub dataset's cached snapshot, None when
    neither is at hand (a hub dataset not yet downloaded)."""
    if os.path.isfile(source):
        return "sha256:" + file_sha256(source)
    from huggingface_hub import snapshot_download

    try:
        return "hub:" + Path(snapshot_download(source, repo_type="dataset", local_files_only=True)).name
    except Exception:  # noqa: BLE001  not in the cache (or not a hub id): nothing to compare with
        return None
