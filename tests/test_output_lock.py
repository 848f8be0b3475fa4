"""One output directory, one running process (real train_sft.py / sift.export processes): of two runs
started together into one directory exactly one proceeds and leaves a consistent directory; a second run,
an --overwrite_output_dir and an export into a live run's directory are refused naming the holder's pid;
a lock file that a killed run left behind blocks nothing."""
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from conftest import train_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def stale_lock(directory) -> int:
    """A lock file whose holder was killed (kill -9): the kernel dropped its flock. Returns its pid."""
    code = ("import sys, time\nfrom common.lock import DirectoryLock\nDirectoryLock.acquire(sys.argv[1])\n"
            "print('locked', flush=True)\ntime.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(directory)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.pid


def consistent(out, status: str) -> dict:
    """One run's files: run.json's id is args.json's and every checkpoint's, its log rows are its steps
    once each, no temp files, no lock file left (the run has ended)."""
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == status, info
    assert json.loads((out / "args.json").read_text())["run_id"] == info["run_id"]
    ckpts = sorted(out.glob("checkpoint-*"))
    assert ckpts and all(json.loads((c / "trainer_state.json").read_text())["run_id"] == info["run_id"] for c in ckpts)
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, info["step"] + 1))
    assert not [n for n in os.listdir(out) if n.startswith(".")] and not (out / "run.lock").exists()
    return info


def test_two_runs_started_together_into_one_directory_one_proceeds(tiny_dir, alpaca_40, tmp_path):
    out = tmp_path / "run"
    stale_pid = stale_lock(out)
    assert (out / "run.lock").exists()
    argv = [sys.executable, "train_sft.py", *train_args(tiny_dir, alpaca_40, out, "--generate_tokens", "0",
                                                        "--save_steps", "2")]
    with ThreadPoolExecutor(2) as pool:  # both processes start at once; each is ~10 s of imports and checks
        procs = list(pool.map(lambda _: subprocess.Popen(argv, cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                                                         stderr=subprocess.PIPE, text=True), range(2)))
        done = [(p.pid, p.returncode, out_err[1]) for p in procs for out_err in [p.communicate(timeout=600)]]
    codes = sorted(rc for _, rc, _ in done)
    assert codes == [0, 2], [(rc, err[-2000:]) for _, rc, err in done]
    winner = next(pid for pid, rc, _ in done if rc == 0)
    loser_err = next(err for _, rc, err in done if rc == 2)
    lines = [line for line in loser_err.splitlines() if f"--output_dir {out}" in line]
    assert len(lines) == 1 and "Traceback" not in loser_err, loser_err[-2000:]
    assert f"in use by a running process (pid {winner} since" in lines[0] or "holds another run" in lines[0], lines
    assert str(stale_pid) not in loser_err  # the killed holder's lock file blocked no one
    assert consistent(out, "finished")["step"] == 4


def test_a_live_runs_directory_refuses_a_second_run_an_overwrite_and_an_export(tiny_dir, alpaca_40, tmp_path):
    from sift.increment import write_increment

    out = tmp_path / "live"
    argv = [sys.executable, "train_sft.py", *train_args(tiny_dir, alpaca_40, out, "--max_steps", "400",
                                                        "--generate_tokens", "0", "--save_steps", "0")]
    live = subprocess.Popen(argv, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    increment = tmp_path / "other" / "sift_increment.safetensors"
    write_increment(str(increment), {"model.norm.weight.delta": torch.zeros(32)},
                    {"base_model": tiny_dir, "dtype": "float32"})
    try:
        log, deadline = out / "train_log.jsonl", time.time() + 300
        while not (log.exists() and log.stat().st_size > 0):  # training is under way
            assert live.poll() is None and time.time() < deadline, live.communicate()
            time.sleep(0.1)
        files = sorted(os.listdir(out))
        second = argv[:-2] + ["--save_steps", "2"]  # the same run again, into the same directory
        attempts = {"second run": second, "overwrite": second + ["--overwrite_output_dir"],
                    "export": [sys.executable, "-m", "sift.export", "merged", "--increment", str(increment),
                               "--output_dir", str(out / "merged-bf16")],
                    "gguf": [sys.executable, "-m", "sift.export", "gguf", "--increment", str(increment),
                             "--output", str(out / "model.gguf")]}
        with ThreadPoolExecutor(4) as pool:
            refused = dict(zip(attempts, pool.map(lambda a: subprocess.run(a, cwd=REPO, env=ENV, capture_output=True,
                                                                             text=True, timeout=600), attempts.values())))
        assert live.poll() is None, "the live run ended before the attempts were checked"
        for what, done in refused.items():
            context = f"{what}: rc={done.returncode}\n{done.stderr[-2000:]}"
            assert done.returncode == 2 and "Traceback" not in done.stderr, context
            lines = [line for line in done.stderr.splitlines() if f"in use by a running process (pid {live.pid} " in line]
            assert len(lines) == 1 and ("--output_dir" in lines[0] or "--output" in lines[0]), context
        assert sorted(os.listdir(out)) == files  # nothing deleted, nothing added (run.lock is the live run's)
    finally:
        live.send_signal(signal.SIGTERM)  # a checkpoint at the next step boundary, exit 143
        _, err = live.communicate(timeout=300)
    assert live.returncode == 143, err[-2000:]
    info = consistent(out, "interrupted")
    assert info["step"] >= 1 and (out / f"checkpoint-{info['step']}").is_dir()
