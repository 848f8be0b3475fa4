"""What every result file says about how it was made: the command that regenerates it, the commit
and whether the code differed from it, the device, the date and the wall time."""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# Written by the benchmarks themselves: a change there says nothing about the code that measured.
OUTPUTS = ("benchmarks/results", "benchmarks/plots", "benchmarks/README.md")


def command_for(experiment: str) -> str:
    return f"python -m benchmarks.run {experiment}"


def start(experiment: str, code: tuple[str | None, list[str]]) -> dict:
    """The stamp as a run begins, `code` being `git_state()` when the driver imported the code it
    runs (`finish` adds the wall time)."""
    commit, dirty = code
    return {"command": command_for(experiment), "invoked": shlex.join(["python", "-m", "benchmarks.run",
                                                                        *sys.argv[1:]]),
            "commit": commit, "dirty": bool(dirty), "dirty_paths": dirty[:20],
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device()}


def finish(stamp: dict, seconds: float) -> dict:
    return {**stamp, "seconds": round(seconds, 1), "loadavg_end": _loadavg()}


def git_state() -> tuple[str | None, list[str]]:
    """(HEAD's commit, the paths whose content differs from it outside OUTPUTS); (None, []) outside a
    git checkout."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                     *(f":(exclude){p}" for p in OUTPUTS))
    except (OSError, subprocess.TimeoutExpired):
        return None, []
    if head.returncode != 0:
        return None, []
    return head.stdout.strip(), [line[3:] for line in status.stdout.splitlines()]


def device() -> dict:
    """The machine a measurement ran on; loadavg says how busy it was (other jobs share CPU cores)."""
    out = {"cpu": _cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "ram_bytes": _ram_bytes(), "torch": torch.__version__, "python": platform.python_version(),
           "platform": platform.platform(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
           "loadavg": _loadavg()}
    if torch.cuda.is_available():
        out.update(gpu=torch.cuda.get_device_name(), gpus=torch.cuda.device_count(), cuda=torch.version.cuda)
    return out


def _cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor())


def _ram_bytes() -> int | None:
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    return next((int(line.split()[1]) * 1024 for line in lines if line.startswith("MemTotal")), None)


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
