"""Checks of the paths, models and devices a user names on a command line, made before anything
loads: each returns None or one line that names the option and says what to do. Shared by the
export, eval and data_prep commands."""
from __future__ import annotations

import os
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # fast, SentencePiece, or vocab.json + merges.txt
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _kind_problem(option: str, path: str | os.PathLike, want: str) -> str | None:
    """`path` exists and is a `want` ("file" or "directory")."""
    if not os.path.exists(path):
        return f"{option} {path}: no such {want}"
    found = "file" if os.path.isfile(path) else "directory"
    return None if found == want else f"{option} {path}: is a {found}, expected a {want}"


def file_problem(option: str, path: str | os.PathLike) -> str | None:
    return _kind_problem(option, path, "file")


def dir_problem(option: str, path: str | os.PathLike) -> str | None:
    return _kind_problem(option, path, "directory")


def _existing_parent(path: str | os.PathLike) -> Path:
    parent = Path(os.path.abspath(path)).parent
    while not parent.exists():
        parent = parent.parent
    return parent


def output_problem(option: str, path: str | os.PathLike, want: str = "dir") -> str | None:
    """`path` can be written as a `want` ("dir" or "file"): it is not the other kind, and no
    ancestor of it is a file (then nothing could be created there)."""
    if want == "dir" and os.path.exists(path) and not os.path.isdir(path):
        return f"{option} {path}: is a file, expected a directory"
    if want == "file" and os.path.isdir(path):
        return f"{option} {path}: is a directory: name the file to write"
    parent = _existing_parent(path)
    if not parent.is_dir():
        return f"{option} {path}: {parent} is a file, so nothing can be created below it"
    return None


def model_dir_problem(option: str, path: str | os.PathLike, tokenizer_only: bool = False) -> str | None:
    """A local model directory has a config.json, weights and tokenizer files (all that loading and
    evaluating it reads; tokenizer files alone with `tokenizer_only`); the line names what is missing."""
    path = Path(path)
    missing = []
    if not tokenizer_only and not (path / "config.json").is_file():
        missing.append("config.json")
    if not tokenizer_only and not any((path / name).is_file() for name in WEIGHT_FILES) \
            and not any(path.glob("*.safetensors")):
        missing.append("weights (model.safetensors or pytorch_model.bin)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        missing.append("tokenizer files (tokenizer.json, tokenizer.model, or vocab.json + merges.txt)")
    if missing:
        return (f"{option} {path}: no {', no '.join(missing)} in it: pass a Hugging Face model directory "
                "(copy the tokenizer files from the base model if only they are missing)")
    return None


def model_problem(option: str, name: str | None, tokenizer_only: bool = False) -> str | None:
    """A model named by a local directory, a hub id (in the cache or on a reachable hub) or the
    embedded default (None or EMBEDDED); with `tokenizer_only`, only its tokenizer is needed."""
    from common.hub import hub_problem, looks_like_hub_id
    from common.modeling import EMBEDDED

    if not name or name == EMBEDDED:
        return None
    if os.path.isdir(name):
        return model_dir_problem(option, name, tokenizer_only)
    if os.path.exists(name):
        return f"{option} {name}: is a file, expected a model directory or a hub id"
    if not looks_like_hub_id(name):
        return f"{option} {name}: no such directory (a hub id is written owner/name)"
    problem = hub_problem(name, "model")
    return f"{option} {name}: no such directory, and as a hub id: {problem}" if problem else None


def data_problem(flag: str, path: str | None) -> str | None:
    """Why the data source `path` (a JSON / JSONL file or a hub dataset id) cannot be read, as one line
    naming `flag`, or None (also for an unset `path`)."""
    if not path:
        return None
    if os.path.isdir(path):
        return f"{flag} {path}: is a directory: pass a JSON / JSONL file in it (or a hub id owner/name)"
    if os.path.exists(path):
        return None
    from common.hub import hub_problem, looks_like_hub_id

    if not looks_like_hub_id(path):
        parent = os.path.dirname(os.path.abspath(path))
        missing = "" if os.path.isdir(parent) else f" (nor its directory {parent})"
        return f"{flag} {path}: no such file{missing}; a hub dataset is written owner/name"
    problem = hub_problem(path, "dataset")
    return f"{flag} {path}: no such file, and as a hub dataset: {problem}" if problem else None


def model_location(name: str | None) -> Path | None:
    """The directory a model is read from, symlinks resolved: a local directory, a hub id's
    snapshot in the local cache, the embedded model's cache directory; None if not on this machine."""
    from common.hub import looks_like_hub_id
    from common.modeling import EMBEDDED, embedded_model_path

    if not name or name == EMBEDDED:
        return embedded_model_path().resolve()
    if os.path.isdir(name):
        return Path(name).resolve()
    if looks_like_hub_id(name):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
        if isinstance(cached, str):
            return Path(cached).parent.resolve()  # the snapshot directory (its files link into blobs/)
    return None


def held_paths(location: Path) -> list[Path]:
    """`location` and the real files its entries link to (a hub snapshot's blobs, a directory of
    links into a shared store): writing over any of them loses the model."""
    paths = [location.resolve()]
    if location.is_dir():
        paths += [p.resolve() for p in location.iterdir() if p.is_symlink()]
    return paths


def overwrite_problem(option: str, output: str | os.PathLike, protected: list[tuple[str, Path]]) -> str | None:
    """An output directory that is, or holds, one of the `protected` (what, path) would destroy it
    when replaced; symlinks are resolved on both sides."""
    out = Path(output).resolve()
    for what, path in protected:
        for held in held_paths(path):
            if held == out or out in held.parents:
                verb = "is" if held == out else "holds"
                where = "" if str(held) in what else f" ({held})"
                return (f"{option} {output}: {verb} {what}{where}; writing there would replace it: choose "
                        "another directory")
    return None


def device_problem(option: str, device: str) -> str | None:
    """auto, cpu, cuda or cuda:N, and a CUDA device only where there is one."""
    import torch

    if device in ("auto", "cpu"):
        return None
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        return f"{option} {device}: expected auto, cpu, cuda or cuda:N"
    if not torch.cuda.is_available():
        return f"{option} {device}: this machine has no CUDA device (or this torch has no CUDA): use {option} cpu"
    if index and int(index) >= torch.cuda.device_count():
        return f"{option} {device}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0"
    return None
