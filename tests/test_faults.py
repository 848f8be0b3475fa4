"""Runs that end early say so: a full disk at a checkpoint and at the final save, a signal during the final
save and during start-up. Each ends as one line naming what failed and where to resume from, the exit
status (1 failure, 130 / 143 signals), run.json "failed" / "interrupted", and nothing lost: the previous
checkpoint resumes into the increment of an uninterrupted run, bit for bit (real train_sft.py processes).

The full disk is a real one where the machine allows it: a small tmpfs mounted in a private mount
namespace (`unshare -rm`, no privileges needed where user namespaces are on). Where it does not, the same
scenario runs with the writes made to fail as a full disk makes them fail (torch.save's RuntimeError from
its zip writer at the checkpoint, OSError ENOSPC at the final save), and the test's name says so."""
import json
import os
import shlex
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train_sft
from conftest import train_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
FLAGS = ("--max_steps", "6", "--save_steps", "2", "--logging_steps", "100", "--generate_tokens", "0")


def _tmpfs_works() -> bool:
    try:
        done = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m none /tmp"],
                              capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


REAL_DISK = _tmpfs_works()
# Where no tmpfs can be mounted: the writes fail as on a full disk once the marker file exists.
INJECT = """
import errno, os, sys, torch
import train_sft
from common import cli
from trainer import recipe
marker, save, plot = sys.argv[1], torch.save, recipe.plot_loss
def full_save(obj, f, *a, **k):
    if os.path.exists(marker + ".checkpoint"):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    return save(obj, f, *a, **k)
def full_plot(out):
    if os.path.exists(marker + ".final"):
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(out, "loss.png"))
    return plot(out)
torch.save, recipe.plot_loss = full_save, full_plot
sys.exit(cli.run(train_sft.main, sys.argv[2:]))
"""


def _script(tmp_path, argv: list[str]) -> str:
    """The three phases as one shell script: a run whose disk fills after checkpoint-2 (6 steps), a resume
    whose final save does not fit, a resume with room. Each phase's directory is copied out to tmp_path."""
    fs, run = tmp_path / "fs", tmp_path / "fs" / "run"
    train = " ".join(shlex.quote(str(a)) for a in argv)
    if REAL_DISK:
        fill, unfill = f"dd if=/dev/zero of={fs}/filler bs=64k 2>/dev/null", f"rm {fs}/filler"
        small, room = f"mount -t tmpfs -o size=8m none {fs}", f"mount -o remount,size=96m {fs}"
    else:
        fill, unfill = f"touch {tmp_path}/full.checkpoint", f"rm {tmp_path}/full.checkpoint"
        small, room = f"touch {tmp_path}/full.final", f"rm {tmp_path}/full.final"
    return f"""set -u
mkdir -p {fs}; {small}
{train} > {tmp_path}/out1 2> {tmp_path}/err1 &
pid=$!
while [ ! -d {run}/checkpoint-2 ]; do kill -0 $pid 2>/dev/null || break; sleep 0.02; done
{fill}
wait $pid; echo $? > {tmp_path}/rc1; cp -a {run} {tmp_path}/after1; {unfill}
{train} --resume_from_checkpoint latest > {tmp_path}/out2 2> {tmp_path}/err2; echo $? > {tmp_path}/rc2
cp -a {run} {tmp_path}/after2; {room}
{train} --resume_from_checkpoint latest > {tmp_path}/out3 2> {tmp_path}/err3; echo $? > {tmp_path}/rc3
cp -a {run} {tmp_path}/after3
"""


def _phase(tmp_path, n: int) -> tuple[int, str, dict]:
    err = (tmp_path / f"err{n}").read_text()
    info = json.loads((tmp_path / f"after{n}" / "run.json").read_text())
    return int((tmp_path / f"rc{n}").read_text()), err, info


def _one_line(err: str, *needles: str) -> str:
    lines = [line for line in err.splitlines() if all(n in line for n in needles)]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


@pytest.mark.parametrize("disk", ["real tmpfs" if REAL_DISK else "writes failing as on a full disk"])
def test_a_full_disk_at_a_checkpoint_and_at_the_final_save_loses_nothing(tiny_dir, alpaca_40, tmp_path, disk):
    straight = tmp_path / "straight"
    train_sft.main(train_args(tiny_dir, alpaca_40, straight, *FLAGS))
    run = tmp_path / "fs" / "run"
    python = [sys.executable, "train_sft.py"] if REAL_DISK else [sys.executable, "-c", INJECT,
                                                                  str(tmp_path / "full")]
    script = _script(tmp_path, python + train_args(tiny_dir, alpaca_40, run, *FLAGS))
    wrapper = ["unshare", "-rm", "sh", "-c", script] if REAL_DISK else ["sh", "-c", script]
    subprocess.run(wrapper, cwd=REPO, env=ENV, timeout=900, check=True)

    rc, err, info = _phase(tmp_path, 1)  # the disk filled after checkpoint-2: checkpoint-4 cannot be written
    # a real full disk is named as such; an injected RuntimeError on a disk with room is not
    line = _one_line(err, "train_sft.py: writing checkpoint-4 failed" + (": no space left on device" if REAL_DISK else
                                                                          " ("), "inline_container.cc")
    assert rc == 1 and f"{run}/checkpoint-2 is complete: resume with the same command and --resume_from_checkpoint " \
                       "latest" in line, err[-3000:]
    assert (info["status"], info["step"], info["message"]) == ("failed", 4, line)
    after = tmp_path / "after1"
    assert sorted(p.name for p in after.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not [n for n in os.listdir(after) if n.startswith(".")]  # no half-written checkpoint left
    assert not (after / "merged").exists() and not (after / "sift_increment.safetensors").exists()

    rc, err, info = _phase(tmp_path, 2)  # resumed; merged/ does not fit
    line = _one_line(err, "train_sft.py: writing the final files failed: no space left on device")
    assert rc == 1 and f"{run}/checkpoint-6 is complete" in line and (info["status"], info["step"]) == ("failed", 6)

    rc, err, info = _phase(tmp_path, 3)  # resumed with room: the run an uninterrupted one would have been
    assert rc == 0 and info["status"] == "finished", err[-3000:]
    a, b = load_file(straight / "sift_increment.safetensors"), load_file(tmp_path / "after3" / "sift_increment.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "after3" / "merged" / "model.safetensors").exists()


# A process that signals itself at a chosen point (a method of trainer.recipe.Recipe, or a name in its module).
SELF_SIGNAL = """
import os, signal, sys
import train_sft
from common import cli
from trainer import recipe
where, sig = sys.argv[1], getattr(signal, sys.argv[2])
owner = recipe.Recipe if hasattr(recipe.Recipe, where) else recipe
original = getattr(owner, where)
def signalled(*a, **k):
    os.kill(os.getpid(), sig)
    return original(*a, **k)
setattr(owner, where, signalled)
sys.exit(cli.run(train_sft.main, sys.argv[3:]))
"""


def _signalled(where: str, sig: str, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SELF_SIGNAL, where, sig, *argv], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=600)


def test_sigint_during_the_final_save_says_where_to_resume(tiny_dir, alpaca_40, tmp_path):
    out, flags = tmp_path / "run", ("--generate_tokens", "0")
    done = _signalled("plot_loss", "SIGINT", train_args(tiny_dir, alpaca_40, out, *flags))  # after merged/, results.json
    line = _one_line(done.stderr, "train_sft.py: SIGINT during the final save")
    assert done.returncode == 130 and f"{out}/checkpoint-4 is complete: resume with the same command and " \
                                      "--resume_from_checkpoint latest" in line, done.stderr[-3000:]
    info = json.loads((out / "run.json").read_text())
    assert (info["status"], info["step"]) == ("interrupted", 4)
    resumed = subprocess.run([sys.executable, "train_sft.py", *train_args(tiny_dir, alpaca_40, out, *flags,
                                                                            "--resume_from_checkpoint", "latest")],
                             cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0 and json.loads((out / "run.json").read_text())["status"] == "finished"


@pytest.mark.parametrize("sig, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_during_start_up(tiny_dir, alpaca_40, tmp_path, sig, code):
    """A fresh run stopped while its weights load leaves nothing; a resumed run stopped after it took
    over the directory says "interrupted" and where to resume from."""
    out = tmp_path / "run"
    done = _signalled("setup_model", sig, train_args(tiny_dir, alpaca_40, out, "--generate_tokens", "0"))
    _one_line(done.stderr, f"train_sft.py: {sig} during start-up: nothing was written")
    assert done.returncode == code and not out.exists(), done.stderr[-3000:]

    train_sft.main(train_args(tiny_dir, alpaca_40, out, "--generate_tokens", "0", "--max_steps", "2"))
    done = _signalled("measure_before", sig, train_args(tiny_dir, alpaca_40, out, "--generate_tokens", "0",
                                                        "--resume_from_checkpoint", "latest"))
    line = _one_line(done.stderr, f"train_sft.py: {sig} during start-up: {out}/checkpoint-2 is complete: resume")
    assert done.returncode == code and json.loads((out / "run.json").read_text())["status"] == "interrupted", line
