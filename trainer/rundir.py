"""One output directory, one run: its id, its status, what starting and resuming may do to it.

`run.json` records the run id (every checkpoint carries it, so `latest` resumes only this run's) and
a status: "running" from the start, then "finished" (written last, after every final file),
"interrupted" (a signal: resumable) or "failed" (diverged: no merged model). The final files
(increment, merged/, results.json, loss.png) are each written atomically but not together, so
`status: finished` is the completion marker: a directory whose run.json says otherwise may hold a
mix of files of one run at different steps, and the eval CLIs warn about it. A completion marker
rather than one final rename of a complete directory, because the layout (`<output_dir>/merged/`,
`<output_dir>/sift_increment.safetensors`) is a contract users and scripts rely on, and renaming the
whole run directory would also move its checkpoints.

Starting afresh with --overwrite_output_dir removes the previous run's files first, so no old
file survives next to a new one; every start removes the temp files and directories that killed
saves leave behind (at 7B a killed merged/ save leaves about 13 GB).

A run holds the directory's lock (`run.lock`, common.lock: an flock the kernel drops when the
process dies) from before its weights load to its end (`claim`): a second run into the directory,
an --overwrite_output_dir of it and an export into it are refused, naming the holder's pid; its
checks are made again once the lock is held, so of two runs started together exactly one proceeds.
run.json is padded to STATUS_BYTES, so a status can still be written in place on a full disk.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
import time
import uuid
from contextlib import contextmanager

from common.atomic import atomic_write
from common.cli import UsageError, problems_error
from common.jsonl import read_jsonl
from common.lock import LOCK_FILE, DirectoryLock, LockHeld, in_use_line, in_use_problem
from common.modeling import EMBEDDED

from .args import data_files
from .checkpoint import ARGS, complete_checkpoints, load_args, load_state, resume_candidates

RUN_FILE, LOG = "run.json", "train_log.jsonl"
# The argument groups an args.json may hold: trainer.args.Arguments' (a record may lack "method" / "output").
RECORD_GROUPS = ("model", "method", "data", "train", "output")
BUNDLED_TAIL = "/data_prep/samples/alpaca_en_demo.json"  # data_prep.dataset.BUNDLED_ALPACA, in any checkout
# What a run writes at the top of its directory; --overwrite_output_dir removes exactly these (and the
# checkpoints), never a file the user keeps there. A new output must be added here.
# The lock file is one, but never removed while held (it is this run's own when overwriting) and never
# taken for a run's trace (a crashed run's lock file alone blocks nothing).
RUN_OUTPUTS = (RUN_FILE, ARGS, LOG, "results.json", "loss.png", "sift_increment.safetensors", "merged", "adapter",
               "runs", "wandb", LOCK_FILE)
STATUS_BYTES = 1024  # run.json's size: a later status fits into its blocks when the disk is full
# Temp names of trainer.checkpoint (`.checkpoint-<step>-XXXXXXXX`), common.atomic.atomic_dir
# (`.<name>-XXXXXXXX`, merged/'s `.merged-XXXXXXXX`) and atomic_path (`.<name>.XXXXXXXX.tmp`);
# the X are tempfile's 8 random characters.
_TEMP_DIR = re.compile(r"^\..+-[a-z0-9_]{8}$")
_TEMP_FILE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
# Options that may change on resume: where and how often to write, log and measure, and the length
# of the run. Every other option decides what is trained, so a change is refused.
RESUMABLE_CHANGES = {"output_dir", "overwrite_output_dir", "resume_from_checkpoint", "max_steps", "num_train_epochs",
                     "logging_steps", "save_steps", "save_total_limit", "report_to", "run_name", "local_rank",
                     "deepspeed", "generate_tokens", "per_device_eval_batch_size", "eval_steps", "eval_data_path",
                     "gradient_checkpointing", "offload_activations", "tile_tokens", "embeddings_on_host", "max_skipped_steps", "strict",
                     "verbose"}


def run_info(output_dir: str) -> dict:
    path = os.path.join(output_dir, RUN_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def set_status(output_dir: str, run_id: str, status: str, step: int | None = None, message: str | None = None) -> None:
    """run.json: the run id, `status` at `step` (and why, for a run that did not finish). Written
    atomically, padded to STATUS_BYTES; when the disk is full, rewritten in place instead (its blocks
    exist already), so a failed run still says so."""
    info = {"run_id": run_id, "status": status, "step": step, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if message:
        info["message"] = message[:STATUS_BYTES // 2]
    text = (json.dumps(info, indent=1, ensure_ascii=False) + "\n").ljust(STATUS_BYTES)
    path = os.path.join(output_dir, RUN_FILE)
    try:
        atomic_write(path, [text])
    except OSError as e:
        if e.errno != errno.ENOSPC or not os.path.isfile(path) or os.path.getsize(path) < len(text.encode()):
            raise
        with open(path, "r+b") as f:
            f.write(text.encode().ljust(os.path.getsize(path)))
            f.flush()
            os.fsync(f.fileno())


def remove_stale_temps(output_dir: str) -> list[str]:
    removed = []
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if _TEMP_DIR.match(name) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif _TEMP_FILE.match(name) and os.path.isfile(path):
            os.remove(path)
        else:
            continue
        removed.append(name)
    if removed:
        print(f"removed {len(removed)} temp file(s) of interrupted saves in {output_dir}: {', '.join(sorted(removed))}")
    return removed


def remove_run_files(output_dir: str) -> None:
    """The previous run's outputs and checkpoints (--overwrite_output_dir), before anything new is written."""
    gone = [os.path.join(output_dir, n) for n in RUN_OUTPUTS if n != LOCK_FILE]
    gone += [p for _, p in complete_checkpoints(output_dir)]
    gone += [os.path.join(output_dir, n) for n in os.listdir(output_dir) if re.match(r"^checkpoint-\d+$", n)]
    for path in gone:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


def start(output_dir: str, resume_from: str | None) -> str:
    """Prepare `output_dir` for this run (main process, before the run writes anything); its run id.

    A fresh run gets a new id and an empty directory of run files (problems() has made sure that
    only --overwrite_output_dir gets here with an old run in it); a resumed run continues the id of
    the checkpoint it resumes."""
    os.makedirs(output_dir, exist_ok=True)
    remove_stale_temps(output_dir)
    if resume_from is None:
        remove_run_files(output_dir)
        run_id = uuid.uuid4().hex[:12]
    else:
        run_id = load_state(resume_from).get("run_id") or run_info(output_dir).get("run_id") or uuid.uuid4().hex[:12]
    set_status(output_dir, run_id, "running")
    return run_id


def read_log(output_dir: str, up_to_step: int | None = None) -> list[dict]:
    """train_log.jsonl's rows (those of steps <= up_to_step); a torn last line (a kill or a full disk
    mid-append) is dropped with a warning naming the file, a bad line elsewhere is an error."""
    path = os.path.join(output_dir, LOG)
    if not os.path.exists(path):
        return []
    rows = [r for _, r in read_jsonl(path, tolerate_torn_tail=True)]
    return [r for r in rows if up_to_step is None or r.get("step", 0) <= up_to_step]


def flat_args(args: dict) -> dict:
    """{option: value} over the argument groups of an args.json, plus the resolved world size and bf16.
    Keyed by flag name, so a record whose groups differ (the method flags under "model", no "method" /
    "output" group) compares with the current one flag by flag. The bundled
    Alpaca sample compares as itself whichever checkout's absolute path the record holds, in a list of
    data files too (each file compares: a list is refused when one of them differs)."""
    flat = {k: v for group in RECORD_GROUPS for k, v in (args.get(group) or {}).items()}
    flat.update({k: args[k] for k in ("world_size", "bf16") if k in args})
    for key in ("data_path", "eval_data_path"):
        if isinstance(flat.get(key), str):
            flat[key] = ",".join("(bundled) " + BUNDLED_TAIL if path.replace(os.sep, "/").endswith(BUNDLED_TAIL) else path
                                 for path in data_files(flat[key]))
    return flat


def resume_differences(saved: dict, current: dict) -> list[str]:
    """`--option saved -> current` for every option that decides what is trained and changed; options
    one side does not know (a record with fewer options) are not compared."""
    old, new = flat_args(saved), flat_args(current)
    out = []
    for key in sorted(set(old) & set(new) - RESUMABLE_CHANGES):
        if old[key] != new[key]:
            label = {"world_size": "ranks (world size)", "bf16": "bf16 (resolved)"}.get(key, f"--{key}")
            out.append(f"{label} {old[key]} -> {new[key]}")
    return out


def input_differences(saved: dict, current: dict) -> list[str]:
    """`--flag value: its weights / content changed ...` for every input (the model's weights
    fingerprint, the data files' sha256: trainer.validate.run_inputs) recorded on both sides that
    differs while the option itself is the same (a changed option is resume_differences')."""
    old, new = saved.get("inputs") or {}, current.get("inputs") or {}
    old_args, new_args = flat_args(saved), flat_args(current)
    out = []
    for flag in sorted(set(old) & set(new)):
        if old[flag] and new[flag] and old[flag] != new[flag] and old_args.get(flag) == new_args.get(flag):
            what = "weights" if flag == "model_name_or_path" else "content"
            out.append(f"--{flag} {new_args.get(flag) or EMBEDDED}: its {what} changed since the checkpoint was "
                       f"written ({old[flag][:24]} -> {new[flag][:24]})")
    return out


def launch_rank() -> int:
    """This process's rank in a deepspeed launch (its launcher sets RANK), before the process group exists."""
    return int(os.environ.get("RANK", "0"))


def _place_problem(output_dir: str) -> str | None:
    """`output_dir` names a directory that exists or can be created and written."""
    if not output_dir.strip():
        return "--output_dir is empty: name the directory to write the run into"
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        return f"--output_dir {output_dir}: is a file, not a directory: pick another --output_dir"
    there = os.path.abspath(output_dir)
    while not os.path.lexists(there):
        there = os.path.dirname(there)
    if not os.path.exists(there):  # a symlink whose target is gone (or a loop)
        which = "" if there == os.path.abspath(output_dir) else f"{there} "
        return (f"--output_dir {output_dir}: {which}is a symlink to {os.readlink(there)}, which does not exist: "
                "create it or pass another --output_dir")
    if not os.path.isdir(there):
        return f"--output_dir {output_dir}: {there} is a file, so the directory cannot be created"
    if not os.access(there, os.W_OK):
        return f"--output_dir {output_dir}: not writable"
    return None


def output_dir_problems(current_args: dict, output_dir: str, resume: str | None, overwrite: bool,
                        warn: bool = False) -> list[str]:
    """What keeps this run from using `output_dir` (before any weight is loaded); `current_args`
    has the shape of args.json (trainer.args.record: the argument groups, "world_size", "bf16",
    "inputs"). `warn`: say which checkpoints 'latest' passes over, and why."""
    # only the main process of a launch asks about the lock: the others would find their main process's
    problem = _place_problem(output_dir) or (in_use_problem("--output_dir", output_dir) if launch_rank() == 0 else None)
    if problem:
        return [problem]
    if resume:
        return resume_problems(current_args, output_dir, resume, overwrite, warn)
    if os.path.isdir(output_dir) and not overwrite:
        marks = [n for n in os.listdir(output_dir) if n in RUN_OUTPUTS and n != LOCK_FILE or n.startswith("checkpoint-")]
        if marks:
            return [f"--output_dir {output_dir} holds another run ({', '.join(sorted(marks)[:3])}): pass "
                    "--overwrite_output_dir, --resume_from_checkpoint latest, or another directory"]
    return []


def resume_problems(current_args: dict, output_dir: str, resume: str, overwrite: bool, warn: bool = False) -> list[str]:
    """What keeps this run from resuming `resume` in `output_dir`: its checkpoint, its run, and what
    it was trained with (options, and the model's weights and data files)."""
    if overwrite:
        return ["--overwrite_output_dir starts afresh and --resume_from_checkpoint continues: pass one of them"]
    own = run_info(output_dir).get("run_id")
    try:
        ckpt = resume_candidates(output_dir, resume, own if resume == "latest" else None, warn=warn)[0]
    except FileNotFoundError as e:
        return [f"--resume_from_checkpoint {resume}: {e}"]
    theirs = load_state(ckpt).get("run_id")
    if resume != "latest" and own and theirs and own != theirs:
        return [f"--resume_from_checkpoint {resume}: belongs to run {theirs}, but --output_dir {output_dir} holds "
                f"run {own}: resume into its own directory or into a new --output_dir"]
    saved = load_args(ckpt)
    diffs = resume_differences(saved, current_args) if saved else []
    out = [f"--resume_from_checkpoint {ckpt} was written with other options: " + "; ".join(diffs)
           + ": pass the checkpoint's values (a larger --max_steps is fine) or start a new --output_dir"] if diffs else []
    return out + [f"--resume_from_checkpoint {ckpt}: {line}: resume with the inputs it was trained on, or start a "
                  "new --output_dir" for line in (input_differences(saved, current_args) if saved else [])]


@contextmanager
def claim(output_dir: str, recheck):
    """Hold `output_dir`'s lock for the block (the main process of a launch; the other ranks write
    nothing there). `recheck()` lists the directory's problems again now that no other run can
    change it (UsageError, exit 2). A directory made here for the lock and left empty is removed."""
    if launch_rank() != 0:
        yield
        return
    existed = os.path.lexists(output_dir)
    try:
        lock = DirectoryLock.acquire(output_dir)
    except LockHeld as e:
        raise UsageError("train_sft.py: " + in_use_line("--output_dir", output_dir, e.record)) from None
    try:
        problems = recheck()
        if problems:
            raise problems_error("train_sft.py", problems)
        yield
    finally:
        lock.release()
        if not existed:
            try:
                os.rmdir(output_dir)
            except OSError:  # the run wrote into it: it stays
                pass


def resume_hint(output_dir: str, run_id: str | None) -> str:
    """What a user can do after the run stopped early: resume from its newest complete checkpoint,
    or, with none, start again."""
    try:
        ckpt = resume_candidates(output_dir, "latest", run_id, warn=False)[0] if run_id else None
    except FileNotFoundError:
        ckpt = None
    if ckpt is None:
        return "no checkpoint of this run to resume from: start again (--overwrite_output_dir)"
    return f"{ckpt} is complete: resume with the same command and --resume_from_checkpoint latest"


def warn_if_unfinished(path: str) -> None:
    """For readers of a run's outputs (the eval CLIs): warn when `path` (a run directory, its
    merged/ or its increment) belongs to a run whose run.json does not say finished."""
    run_dir = os.path.dirname(os.path.abspath(path.rstrip("/")))
    info = run_info(run_dir)
    if info and info.get("status") != "finished":
        print(f"warning: {path} belongs to a run that is not finished ({os.path.join(run_dir, RUN_FILE)} says "
              f"{info.get('status')!r}): its files may be from different steps; finish or resume the run first",
              file=sys.stderr)
