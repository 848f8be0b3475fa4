"""Checkpoints that survive kill -9: written into a temp directory, renamed into place, pruned after.

A checkpoint is complete when its `trainer_state.json` exists (written last, inside the temp
directory, before the rename); only complete `checkpoint-<step>` directories are ever resumed.
The state records the run id of the run that wrote it (trainer.rundir), the size of every payload
file and the sha256 of args.json, so `latest` can pass over (saying why) another run's checkpoints,
truncated or missing payload files and an edited args.json before any weight is loaded; the
checkpoint's `args.json` holds the resolved arguments (and input fingerprints) resuming compares.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile

from common.atomic import fsync_tree

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE, ARGS = "trainer_state.json", "args.json"


def complete_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of complete checkpoints, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _NAME.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isfile(os.path.join(path, STATE)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def payload_problem(path: str) -> str | None:
    """Why the checkpoint at `path` cannot be resumed (unreadable state, a payload file missing, of
    another size than written, or its args.json edited), or None. Reads the state, file sizes and
    args.json's bytes (small), never the payload."""
    try:
        state = load_state(path)
    except (OSError, ValueError) as e:
        return f"{STATE} unreadable ({e})"
    for name, size in state.get("files", {}).items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{name} is missing (deleted since the checkpoint was written)"
        found = os.path.getsize(file)
        if found != size:
            how = "truncated since: a copy or move that did not finish?" if found < size else "changed since"
            return f"{name} has {found} bytes, {size} were written ({how})"
    recorded = state.get("args_sha256")
    if recorded and _sha256(os.path.join(path, ARGS)) != recorded:
        return f"{ARGS} was edited after the checkpoint was written (its options are what resuming compares)"
    return None


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def resume_candidates(output_dir: str, spec: str, run_id: str | None = None, warn: bool = True) -> list[str]:
    """Checkpoints to try, best first. `spec` is a checkpoint directory (just it) or 'latest': the
    complete checkpoints of `run_id` (any, when the directory records none), newest first, passing
    over (with a warning naming why) those of another run, those whose payload is damaged and
    `checkpoint-<step>` directories without their state file; with none left, FileNotFoundError says
    why each was passed over."""
    if spec != "latest":
        if not os.path.isfile(os.path.join(spec, STATE)):
            raise FileNotFoundError(f"{spec} is not a complete checkpoint (no {STATE})")
        problem = payload_problem(spec)
        if problem:
            raise FileNotFoundError(f"{spec}: {problem}")
        return [spec]
    found, passed = [], [(path, f"no {STATE} (not a complete checkpoint)") for path in incomplete_checkpoints(output_dir)]
    for _, path in reversed(complete_checkpoints(output_dir)):
        problem = payload_problem(path)
        if problem is None and run_id is not None and load_state(path).get("run_id") != run_id:
            problem = f"it belongs to another run ({load_state(path).get('run_id')}, this directory's is {run_id})"
        if problem:
            passed.append((path, problem))
            continue
        found.append(path)
    if warn:
        for path, problem in passed:
            print(f"warning: skipping {path}: {problem}", file=sys.stderr)
    if not found:
        why = "".join(f"; {os.path.basename(p)}: {problem}" for p, problem in passed)
        raise FileNotFoundError(f"no complete checkpoint-<step> directory of this run in {output_dir}{why}")
    return found


def incomplete_checkpoints(output_dir: str) -> list[str]:
    """`checkpoint-<step>` directories without a state file (never written so: saves rename complete
    directories into place; someone removed it)."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(os.path.join(output_dir, n) for n in os.listdir(output_dir)
                  if _NAME.match(n) and not os.path.isfile(os.path.join(output_dir, n, STATE)))


def find_checkpoint(output_dir: str, spec: str, run_id: str | None = None) -> str:
    """The best resume candidate (see resume_candidates)."""
    return resume_candidates(output_dir, spec, run_id, warn=False)[0]


def save_checkpoint(output_dir: str, step: int, write_files, state: dict, keep: int, args: dict | None = None) -> str:
    """`write_files(tmp_dir)` writes the payload; then the arguments and the state marker (with the
    payload's file sizes); then rename; then prune."""
    os.makedirs(output_dir, exist_ok=True)
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = tempfile.mkdtemp(prefix=f".checkpoint-{step}-", dir=output_dir)
    try:
        write_files(tmp)
        if args is not None:
            _write_synced(os.path.join(tmp, ARGS), json.dumps(args, indent=1, default=str))
        files = {os.path.relpath(os.path.join(here, n), tmp): os.path.getsize(os.path.join(here, n))
                 for here, _, names in os.walk(tmp) for n in names}
        if args is not None:
            state = {**state, "args_sha256": _sha256(os.path.join(tmp, ARGS))}
        _write_synced(os.path.join(tmp, STATE), json.dumps({**state, "files": files}, indent=1))
        fsync_tree(tmp)  # on disk before the rename makes it complete; 0644 / 0755, not mkdtemp's 0700
        if os.path.exists(final):  # a re-run of the same step replaces it
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep > 0:
        for _, path in complete_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def _write_synced(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def load_state(path: str) -> dict:
    with open(os.path.join(path, STATE)) as f:
        return json.load(f)


def load_args(path: str) -> dict | None:
    """The resolved arguments a checkpoint was written with (None for a checkpoint without args.json)."""
    file = os.path.join(path, ARGS)
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        return json.load(f)
