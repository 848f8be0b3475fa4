"""Is a model or dataset at hand? Asked before anything loads, by every CLI that takes one:
`model_problem` / `data_problem` check a local path, or a hub id in the local cache first
(`local_files_only`), then, only when the hub may be used, with one short request, so an offline
machine is told so in a second instead of a traceback after transformers' 30 s of retries."""
from __future__ import annotations

import os


def looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not name.endswith((".json", ".jsonl"))


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("TRANSFORMERS_OFFLINE", "") in ("1", "true", "TRUE")


def hub_problem(repo_id: str, repo_type: str = "model") -> str | None:
    """None when `repo_id` is in the local cache or reachable on the hub; else what is wrong and what to do."""
    import huggingface_hub
    from huggingface_hub import errors

    try:
        if repo_type == "model":
            huggingface_hub.hf_hub_download(repo_id, "config.json", local_files_only=True)
        else:
            huggingface_hub.snapshot_download(repo_id, repo_type=repo_type, local_files_only=True)
        return None
    except (errors.LocalEntryNotFoundError, OSError, ValueError):
        pass
    fetch = f"`hf download {repo_id}{' --repo-type dataset' if repo_type == 'dataset' else ''}`"
    if _offline():
        return (f"{repo_id} is not in the local hub cache and the hub is switched off (HF_HUB_OFFLINE): "
                f"fetch it with {fetch} where there is internet, or pass a local path")
    try:
        (huggingface_hub.model_info if repo_type == "model" else huggingface_hub.dataset_info)(repo_id, timeout=10)
        return None  # reachable: loading downloads it
    except errors.GatedRepoError:
        return f"{repo_id} is gated on the hub: accept its licence there and log in (`hf auth login`)"
    except errors.RepositoryNotFoundError:
        return f"no {repo_type} {repo_id} on the hub (a typo, or private: log in with `hf auth login`)"
    except errors.HfHubHTTPError as e:
        return f"the hub refused {repo_id} ({e.__class__.__name__}: {str(e).splitlines()[0]})"
    except Exception as e:  # noqa: BLE001  connection refused, DNS, timeout: httpx / requests / OSError alike
        return (f"{repo_id} is not in the local hub cache and the hub cannot be reached (this machine seems "
                f"offline: {type(e).__name__}): fetch it with {fetch} where there is internet, or pass a local path")


def model_problem(flag: str, name: str | None) -> str | None:
    """Why the model `name` cannot be loaded, as one line naming `flag`, or None. `name` is a local
    Hugging Face directory, a hub id, or empty / EMBEDDED (the embedded default: always at hand)."""
    from .modeling import EMBEDDED

    if not name or name == EMBEDDED:
        return None
    if os.path.isdir(name):
        if os.path.isfile(os.path.join(name, "config.json")):
            return None
        return f"{flag} {name}: no config.json in it: pass a Hugging Face model directory"
    if not looks_like_hub_id(name):
        return f"{flag} {name}: no such directory (a hub id is written owner/name)"
    problem = hub_problem(name, "model")
    return f"{flag} {name}: no such directory, and as a hub id: {problem}" if problem else None


def data_problem(flag: str, path: str | None) -> str | None:
    """Why the data source `path` (a JSON / JSONL file or a hub dataset id) cannot be read, as one line
    naming `flag`, or None (also for an unset `path`)."""
    if not path:
        return None
    if os.path.isdir(path):
        return f"{flag} {path}: is a directory: pass a JSON / JSONL file in it (or a hub id owner/name)"
    if os.path.exists(path):
        return None
    if not looks_like_hub_id(path):
        parent = os.path.dirname(os.path.abspath(path))
        missing = "" if os.path.isdir(parent) else f" (nor its directory {parent})"
        return f"{flag} {path}: no such file{missing}; a hub dataset is written owner/name"
    problem = hub_problem(path, "dataset")
    return f"{flag} {path}: no such file, and as a hub dataset: {problem}" if problem else None
