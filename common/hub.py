"""Is a model or dataset named by a hub id at hand? Asked before anything loads (common.inputs'
model and data checks call it): the local cache first (`local_files_only`), then, only when the hub
may be used, one short request, so an offline machine is told so in a second instead of a traceback
after transformers' 30 s of retries."""
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
