"""Checkpoints that survive kill -9: written into a temp directory, renamed into place, pruned after.

A checkpoint is complete when its `trainer_state.json` exists (written last, inside the temp
directory, before the rename); only complete `checkpoint-<step>` directories are ever resumed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE = "trainer_state.json"


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


def find_checkpoint(output_dir: str, spec: str) -> str:
    """`spec` is a checkpoint directory or 'latest' (the newest complete one in output_dir)."""
    if spec == "latest":
        found = complete_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"no complete checkpoint-<step> directory in {output_dir}")
        return found[-1][1]
    if not os.path.isfile(os.path.join(spec, STATE)):
        raise FileNotFoundError(f"{spec} is not a complete checkpoint (no {STATE})")
    return spec


def save_checkpoint(output_dir: str, step: int, write_files, state: dict, keep: int) -> str:
    """`write_files(tmp_dir)` writes the payload; then the state marker; then rename; then prune."""
    os.makedirs(output_dir, exist_ok=True)
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = tempfile.mkdtemp(prefix=f".checkpoint-{step}-", dir=output_dir)
    try:
        write_files(tmp)
        with open(os.path.join(tmp, STATE), "w") as f:
            json.dump(state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
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


def load_state(path: str) -> dict:
    with open(os.path.join(path, STATE)) as f:
        return json.load(f)
