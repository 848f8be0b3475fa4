"""SIGTERM / SIGINT mid-run: a checkpoint at the next step boundary, exit 143 / 130, and a resume that
ends with the increment of an uninterrupted run, bit for bit (real train_sft.py in subprocesses)."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import train_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = "6"  # ~0.7 s a step here: the signal lands after step 1, the run has 5 more to go
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}  # the same threads in every run: same sums


def run(args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train_sft.py", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=300, **kw)


def args_for(tiny_dir, data, out, *extra):
    return train_args(tiny_dir, data, out, "--max_steps", STEPS, "--generate_tokens", "0", *extra)


def signalled_run(args, out, signum) -> tuple[int, str]:
    """Start the run, send `signum` once the log has a row (training is under way), wait for the end."""
    proc = subprocess.Popen([sys.executable, "train_sft.py", *args], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    log, deadline = os.path.join(out, "train_log.jsonl"), time.time() + 240
    while not (os.path.exists(log) and os.path.getsize(log) > 0):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=240)
    return proc.returncode, err


@pytest.fixture(scope="module")
def straight(tiny_dir, alpaca_40, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    done = run(args_for(tiny_dir, alpaca_40, out))
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(out / "sift_increment.safetensors")


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_checkpoints_exits_and_resume_is_bit_exact(tiny_dir, alpaca_40, tmp_path, straight, signum, code):
    out = tmp_path / "run"
    rc, err = signalled_run(args_for(tiny_dir, alpaca_40, out), out, signum)
    assert rc == code, err[-3000:]
    assert "Traceback" not in err
    line = [ln for ln in err.splitlines() if "resume with" in ln]
    assert len(line) == 1 and f"{signal.Signals(signum).name} at step" in line[0], err[-2000:]
    ckpts = [p.name for p in out.glob("checkpoint-*")]
    assert len(ckpts) == 1 and str(out / ckpts[0]) in line[0]
    assert 1 <= int(ckpts[0].split("-")[1]) < int(STEPS)  # the next step boundary, not the end
    assert not (out / "merged").exists() and not (out / "sift_increment.safetensors").exists()
    assert '"interrupted"' in (out / "run.json").read_text()

    resumed = run(args_for(tiny_dir, alpaca_40, out, "--resume_from_checkpoint", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = load_file(out / "sift_increment.safetensors")
    assert final.keys() == straight.keys()
    for key in final:
        assert torch.equal(final[key], straight[key]), key
    assert '"finished"' in (out / "run.json").read_text()


def test_a_second_signal_exits_at_once():
    code = ("import os, signal, time\nfrom trainer.interrupts import Interrupts\n"
            "i = Interrupts().install()\nos.kill(os.getpid(), signal.SIGTERM)\nassert i.requested()\n"
            "os.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(30)\n")
    start = time.time()
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 143 and time.time() - start < 20, done.stderr
    assert "send it again to exit at once" in done.stderr


def test_outside_the_step_loop_the_launchers_forward_of_a_signal_is_the_same_request(monkeypatch):
    """Under the DeepSpeed launcher each rank gets a group's SIGTERM twice within milliseconds: the
    second must not raise again while the first is being handled (the run.json update, the line)."""
    from trainer.interrupts import Signalled, raising

    monkeypatch.setenv("LOCAL_RANK", "0")
    with raising():
        with pytest.raises(Signalled) as first:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        os.kill(os.getpid(), signal.SIGTERM)  # the launcher's forward: ignored
        time.sleep(0.1)
    assert first.value.signum == signal.SIGTERM
    monkeypatch.delenv("LOCAL_RANK")
    with raising(), pytest.raises(Signalled):  # without the launcher each signal stops the process
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
