"""Checkpoints that survive kill -9: written into a temp directory, renamed into place, pruned after.

A checkpoint is complete when its `trainer_state.json` exists (written last, inside the temp
directory, before the rename); only complete `checkpoint-<step>` directories are ever resumed.
The state records the run id of the run that wrote it (trainer.rundir) and the size of every payload
file, so `latest` can pass over another run's checkpoints and truncated payloads before any weight
is loaded; the checkpoint's `args.json` holds the resolved arguments that resuming compares.
"""
from __future__ import annotations

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
    """Why the checkpoint at `path` cannot be resumed (unreadable state, a payload file missing or
    of another size than when it was written), or None. Reads only the state and file sizes."""
    try:
        state = load_state(path)
    except (OSError, ValueError) as e:
        return f"{STATE} unreadable ({e})"
    for name, size in state.get("files", {}).items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        if os.path.getsize(file) != size:
            return f"{name} has {os.path.getsize(file)} bytes, {size} were written (truncated?)"
    return None


def resume_candidates(output_dir: str, spec: str, run_id: str | None = None, warn: bool = True) -> list[str]:
    """Checkpoints to try, best first. `spec` is a checkpoint directory (just it) or 'latest': the
    complete checkpoints of `run_id` (any, when the directory records none), newest first, passing
    over (with a warning) those of another run and those whose payload is damaged."""
    if spec != "latest":
        if not os.path.isfile(os.path.join(spec, STATE)):
            raise FileNotFoundError(f"{spec} is not a complete checkpoint (no {STATE})")
        problem = payload_problem(spec)
        if problem:
            raise FileNotFoundError(f"{spec}: {problem}")
        return [spec]
    found = []
    for _, path in reversed(complete_checkpoints(output_dir)):
        problem = payload_problem(path)
        if problem is None and run_id is not None and load_state(path).get("run_id") != run_id:
            problem = f"it belongs to another run ({load_state(path).get('run_id')}, this directory's is {run_id})"
        if problem:
            if warn:
                print(f"warning: skipping {path}: {problem}", file=sys.stderr)
            continue
        found.append(path)
    if not found:
        raise FileNotFoundError(f"no complete checkpoint-<step> directory of this run in {output_dir}")
    return found


def find_checkpoint(output_dir: str, spec: str, run_id: str | None = None) -> str:
    """The best resume candidate (see resume_candidates)."""
    return resume_candidates(output_dir, spec, run_id, warn=False)[0]


def save_checkpoint(output_dir: str, step: int, write_files, state: dict, keep: int, args: dict | None = None) -> str:
    """`write_files(tmp_dir)` writes the payload; then the arguments and the state marker (with the
    payload's file sizes); then rename; then prune."""
    tmp = begin_checkpoint(output_dir, step)
    try:
        write_files(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return finish_checkpoint(output_dir, step, tmp, state, keep, args)


def begin_checkpoint(output_dir: str, step: int) -> str:
    """The temp directory a checkpoint's payload is written into (by every rank that holds a part
    of it: the ranks of a sharded run each write their own file there)."""
    os.makedirs(output_dir, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".checkpoint-{step}-", dir=output_dir)


def finish_checkpoint(output_dir: str, step: int, tmp: str, state: dict, keep: int, args: dict | None = None) -> str:
    """Complete the payload in `tmp`: the arguments, the state marker (with the payload's file sizes),
    the rename into checkpoint-<step>, then the pruning; `tmp` is removed if this fails."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    try:
        if args is not None:
            _write_synced(os.path.join(tmp, ARGS), json.dumps(args, indent=1, default=str))
        files = {os.path.relpath(os.path.join(here, n), tmp): os.path.getsize(os.path.join(here, n))
                 for here, _, names in os.walk(tmp) for n in names}
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
