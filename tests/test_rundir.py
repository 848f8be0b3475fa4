"""One output directory, one run: run ids, `latest` that resumes only its own run's sound checkpoints,
--overwrite_output_dir, stale temp files, a torn log tail, the resume-options check, a finished run
extended bit-exactly, and runs whose numbers cannot be right stopped without a merged model."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import train_sft
from conftest import train_args
from trainer import rundir
from trainer.checkpoint import resume_candidates, save_checkpoint

CONSTANT = ("--lr_scheduler_type", "constant", "--warmup_ratio", "0", "--generate_tokens", "0")


def train(tiny_dir, data, out, *extra):
    return train_sft.main(train_args(tiny_dir, data, out, *CONSTANT, *extra))


def payload(d):
    with open(os.path.join(d, "optimizer.pt"), "wb") as f:
        f.write(b"x" * 100)


def increments_equal(a, b):
    a, b = load_file(a / "sift_increment.safetensors"), load_file(b / "sift_increment.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_latest_resumes_only_its_own_runs_sound_checkpoints(tmp_path, capsys):
    rundir.set_status(str(tmp_path), "mine", "running")
    for step in (2, 4):
        save_checkpoint(str(tmp_path), step, payload, {"step": step, "run_id": "mine"}, keep=0)
    save_checkpoint(str(tmp_path), 5, payload, {"step": 5, "run_id": "other"}, keep=0)  # an older run's, newer step
    save_checkpoint(str(tmp_path), 6, payload, {"step": 6, "run_id": "mine"}, keep=0)
    with open(tmp_path / "checkpoint-6" / "optimizer.pt", "r+b") as f:  # a kill or full disk mid-write
        f.truncate(40)
    found = resume_candidates(str(tmp_path), "latest", "mine")
    assert found == [str(tmp_path / "checkpoint-4"), str(tmp_path / "checkpoint-2")]
    err = capsys.readouterr().err
    assert "skipping" in err and "checkpoint-6: optimizer.pt has 40 bytes, 100 were written" in err
    assert "checkpoint-5: it belongs to another run (other" in err
    with pytest.raises(FileNotFoundError, match="truncated"):
        resume_candidates(str(tmp_path), str(tmp_path / "checkpoint-6"))


def test_start_removes_stale_temps_and_overwrite_removes_only_the_old_runs_files(tmp_path):
    out = tmp_path / "run"
    save_checkpoint(str(out), 3, payload, {"step": 3, "run_id": "old"}, keep=0)
    for name in ("args.json", "results.json", "loss.png", "train_log.jsonl", "sift_increment.safetensors"):
        (out / name).write_text("old")
    (out / "merged").mkdir()
    (out / "checkpoint-7").mkdir()  # torn: no state file
    for temp in (".checkpoint-8-abcd1234", ".merged-x1y2z3_a", ".adapter-k9k9k9k9"):
        (out / temp).mkdir()
    (out / ".sift_increment.safetensors.qwerty12.tmp").write_text("half")
    (out / "notes.txt").write_text("the user's")
    run_id = rundir.start(str(out), resume_from=None)
    assert sorted(os.listdir(out)) == ["notes.txt", "run.json"]
    assert rundir.run_info(str(out)) | {"updated": 0} == {"run_id": run_id, "status": "running", "step": None,
                                                          "updated": 0}


def test_torn_log_tail_is_dropped_with_a_warning_naming_the_file(tmp_path, capsys):
    rows = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "lo')
    assert rundir.read_log(str(tmp_path), up_to_step=2) == rows
    assert f"{tmp_path / 'train_log.jsonl'}:3: dropping a truncated last line" in capsys.readouterr().out
    (tmp_path / "train_log.jsonl").write_text('{"step": 1\n' + json.dumps(rows[1]) + "\n")
    with pytest.raises(ValueError, match="train_log.jsonl:1: not valid JSON"):
        rundir.read_log(str(tmp_path))


def test_unfinished_run_is_flagged_to_readers(tmp_path, capsys):
    rundir.set_status(str(tmp_path), "r", "running", 3)
    rundir.warn_if_unfinished(str(tmp_path / "merged"))
    assert "not finished" in capsys.readouterr().err
    rundir.set_status(str(tmp_path), "r", "finished", 3)
    rundir.warn_if_unfinished(str(tmp_path / "merged"))
    assert capsys.readouterr().err == ""


def test_the_bundled_data_compares_as_itself_across_checkouts():
    from data_prep.dataset import BUNDLED_ALPACA

    assert str(BUNDLED_ALPACA).replace(os.sep, "/").endswith(rundir.BUNDLED_TAIL)
    here = {"data": {"data_path": str(BUNDLED_ALPACA)}, "train": {"seed": 1}}
    there = {"data": {"data_path": "/tmp/other-clone" + rundir.BUNDLED_TAIL}, "train": {"seed": 1}}
    mine = {"data": {"data_path": "/home/me/my_alpaca.json"}, "train": {"seed": 1}}
    assert rundir.resume_differences(there, here) == []
    assert rundir.resume_differences(mine, here) == [
        f"--data_path /home/me/my_alpaca.json -> (bundled) {rundir.BUNDLED_TAIL}"]


def test_extending_a_finished_cosine_run_follows_the_longer_schedule(tiny_dir, alpaca_40, tmp_path):
    """A finished 2-step cosine run saved lr 0 for its next step; extended to 3 steps, step 3 must
    use the 3-step schedule's rate at step 2 (a quarter of the peak), so the weights move again."""
    run, cosine = tmp_path / "run", ("--lr_scheduler_type", "cosine")
    train(tiny_dir, alpaca_40, run, "--max_steps", "2", "--save_steps", "2", *cosine)
    after_2 = load_file(run / "sift_increment.safetensors")
    train(tiny_dir, alpaca_40, run, "--max_steps", "3", "--resume_from_checkpoint", "latest", *cosine)
    after_3 = load_file(run / "sift_increment.safetensors")
    assert any(not torch.equal(after_2[k], after_3[k]) for k in after_2 if k.endswith(".delta"))
    from transformers import get_scheduler

    opt = torch.optim.SGD([torch.zeros(1)], lr=1e-3)
    sched = get_scheduler("cosine", opt, num_warmup_steps=0, num_training_steps=3)
    for _ in range(2):  # two steps done: the rate step 3 trains with
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25e-3)


def test_finished_run_extends_and_falls_back_past_a_damaged_checkpoint(tiny_dir, alpaca_40, tmp_path, capsys):
    straight, run = tmp_path / "straight", tmp_path / "run"
    train(tiny_dir, alpaca_40, straight, "--max_steps", "6")
    train(tiny_dir, alpaca_40, run, "--max_steps", "4", "--save_steps", "2")
    state = json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["run_id"] == rundir.run_info(str(run))["run_id"] and (run / "checkpoint-4" / "args.json").exists()

    # options that decide what is trained are compared with the checkpoint's, before any weight loads
    with pytest.raises(SystemExit) as err:
        train(tiny_dir, alpaca_40, run, "--max_steps", "6", "--resume_from_checkpoint", "latest",
              "--learning_rate", "2e-3", "--seed", "1", "--per_device_train_batch_size", "1", "--sift_rate", "0.1",
              "--optim", "adamw", "--sift_targets", "q_proj", "--finetuning_type", "lora")
    for needle in ("--learning_rate 0.001 -> 0.002", "--seed 42 -> 1", "--per_device_train_batch_size 2 -> 1",
                   "--sift_rate 0.05 -> 0.1", "--optim adamw8bit -> adamw", "--sift_targets q_proj,k_proj",
                   "-> q_proj", "--finetuning_type sift -> lora"):
        assert needle in str(err.value), needle

    # the final checkpoint's optimizer state rots in place (same size): its load fails, 2 takes over
    path = run / "checkpoint-4" / "optimizer.pt"
    path.write_bytes(b"\0" * path.stat().st_size)
    capsys.readouterr()
    train(tiny_dir, alpaca_40, run, "--max_steps", "6", "--resume_from_checkpoint", "latest")
    captured = capsys.readouterr()
    assert "skipping" in captured.err and "checkpoint-4: its payload fails to load" in captured.err
    assert "resumed from" in captured.out and "checkpoint-2 at step 2" in captured.out
    assert "skipped steps (non-finite gradients): 0 of 6" in captured.out
    assert increments_equal(straight, run)
    assert [r["step"] for r in rundir.read_log(str(run))] == [1, 2, 3, 4, 5, 6]
    assert rundir.run_info(str(run))["status"] == "finished"


def test_diverging_run_stops_without_a_merged_model(tiny_dir, alpaca_40, tmp_path, capsys):
    out = tmp_path / "nan"
    with pytest.raises(SystemExit) as err:
        train(tiny_dir, alpaca_40, out, "--learning_rate", "1e30", "--max_steps", "4")
    assert err.value.code == 1
    assert "skipped for non-finite gradients, more than --max_skipped_steps 0.05" in capsys.readouterr().err
    assert not (out / "merged").exists() and not (out / "sift_increment.safetensors").exists()
    assert rundir.run_info(str(out))["status"] == "failed"


@pytest.mark.parametrize("method", ["full", "lora", "sift"])
@pytest.mark.parametrize("lr", ["nan", "-1e-3", "0", "inf"])
def test_learning_rates_that_cannot_be_right_are_refused_for_every_method(tmp_path, method, lr):
    with pytest.raises(SystemExit) as err:
        train_sft.main(["--output_dir", str(tmp_path / "x"), "--finetuning_type", method, f"--learning_rate={lr}"])
    assert err.value.code == 2 and f"--learning_rate {float(lr)}: must be a finite number > 0" in str(err.value)


def test_a_record_with_other_argument_groups_compares_flag_by_flag(tmp_path):
    """An args.json that keeps the method flags under "model" and the output flags (and --bf16) under
    "train", with no "method" / "output" group: resuming such a checkpoint compares the same flags."""
    import trainer.args as targs

    current = targs.record(targs.parse(["--output_dir", str(tmp_path), "--sift_rate", "0.1"]), bf16=False)
    groups = {name: current[name] for name in ("model", "method", "data", "train", "output")}
    model = {k: v for k, v in groups["model"].items() if k != "bf16"}
    old = {"model": {**model, **groups["method"]}, "data": groups["data"],
           "train": {**groups["train"], **groups["output"], "bf16": groups["model"]["bf16"]},
           "world_size": 1, "bf16": False}
    assert len(rundir.flat_args(old)) == len(rundir.flat_args(current)) > 40
    assert rundir.resume_differences(old, current) == []
    old["model"]["sift_rate"], old["train"]["seed"], old["train"]["save_steps"] = 0.05, 1, 7  # save_steps may change
    assert rundir.resume_differences(old, current) == ["--seed 1 -> 42", "--sift_rate 0.05 -> 0.1"]


# ----------------------------------------------------------------------------- the lock, run.json, checkpoints
def test_the_lock_names_its_holder_and_a_dead_holders_lock_blocks_nothing(tmp_path):
    import signal
    import subprocess
    import sys

    from common.lock import LOCK_FILE, DirectoryLock, LockHeld, holder

    out = tmp_path / "run"
    code = ("import sys, time\nfrom common.lock import DirectoryLock\nDirectoryLock.acquire(sys.argv[1])\n"
            "print('locked', flush=True)\ntime.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=os.path.dirname(os.path.dirname(__file__)),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert holder(out)["pid"] == proc.pid
        with pytest.raises(LockHeld, match=f"in use by pid {proc.pid} since .*: -c"):
            DirectoryLock.acquire(out)
        assert "in use by a running process (pid" in rundir.output_dir_problems({}, str(out / "sub"), None, False)[0]
    finally:
        proc.send_signal(signal.SIGKILL)  # the kernel drops its flock; its lock file stays behind
        proc.wait()
    assert (out / LOCK_FILE).exists() and holder(out) is None
    assert rundir.output_dir_problems({}, str(out), None, False) == []  # a lock file alone is no run
    lock = DirectoryLock.acquire(out)
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    (out / "run.json").write_text("{}")
    rundir.remove_run_files(str(out))  # --overwrite_output_dir: never this run's own lock
    assert os.listdir(out) == [LOCK_FILE]
    lock.release()
    assert not (out / LOCK_FILE).exists() and holder(out) is None


def test_a_full_disk_still_gets_the_status_written_in_place(tmp_path, monkeypatch):
    import errno

    rundir.set_status(str(tmp_path), "r1", "running", 3)
    assert (tmp_path / "run.json").stat().st_size == rundir.STATUS_BYTES

    def full(path, chunks):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir, "atomic_write", full)
    message = "train_sft.py: writing checkpoint-4 failed: no space left on device " + "x" * 2000
    rundir.set_status(str(tmp_path), "r1", "failed", 4, message)
    info = rundir.run_info(str(tmp_path))
    assert (info["status"], info["step"]) == ("failed", 4) and info["message"] == message[:rundir.STATUS_BYTES // 2]
    assert (tmp_path / "run.json").stat().st_size == rundir.STATUS_BYTES


def test_checkpoints_passed_over_say_why(tmp_path, capsys):
    def with_args(step):
        save_checkpoint(str(tmp_path), step, payload, {"step": step, "run_id": "r"}, keep=0, args={"train": {"seed": 1}})

    for step in (2, 4, 6):
        with_args(step)
    (tmp_path / "checkpoint-8").mkdir()  # no trainer_state.json: never a save's doing
    (tmp_path / "checkpoint-6" / "optimizer.pt").unlink()
    args = tmp_path / "checkpoint-4" / "args.json"
    args.write_text(args.read_text().replace('"seed": 1', '"seed": 2'))  # the same size, another option
    assert resume_candidates(str(tmp_path), "latest", "r") == [str(tmp_path / "checkpoint-2")]
    err = capsys.readouterr().err
    for line in ("checkpoint-8: no trainer_state.json (not a complete checkpoint)",
                 "checkpoint-6: optimizer.pt is missing (deleted since the checkpoint was written)",
                 "checkpoint-4: args.json was edited after the checkpoint was written"):
        assert len([x for x in err.splitlines() if x.startswith("warning: skipping") and line in x]) == 1, (line, err)
    assert "truncated" not in err
    (tmp_path / "checkpoint-2" / "optimizer.pt").write_bytes(b"x" * 120)  # grew: changed, not truncated
    with pytest.raises(FileNotFoundError) as e:
        resume_candidates(str(tmp_path), "latest", "r", warn=False)
    assert "checkpoint-2: optimizer.pt has 120 bytes, 100 were written (changed since)" in str(e.value)
    assert "checkpoint-4: args.json was edited" in str(e.value) and "checkpoint-8: no trainer_state.json" in str(e.value)


def test_inputs_that_changed_under_the_same_option_are_named():
    saved = {"model": {"model_name_or_path": None}, "data": {"data_path": "a.json", "eval_data_path": None},
             "inputs": {"model_name_or_path": "f" * 32, "data_path": "sha256:" + "1" * 64}}
    same = json.loads(json.dumps(saved))
    assert rundir.input_differences(saved, same) == []
    changed = json.loads(json.dumps(saved))
    changed["inputs"] = {"model_name_or_path": "e" * 32, "data_path": "sha256:" + "2" * 64}
    assert rundir.input_differences(saved, changed) == [
        "--data_path a.json: its content changed since the checkpoint was written (sha256:11111111111111111 -> "
        "sha256:22222222222222222)",
        f"--model_name_or_path embedded:smollm2-135m-instruct: its weights changed since the checkpoint was written "
        f"({'f' * 24} -> {'e' * 24})"]
    moved = json.loads(json.dumps(changed))
    moved["data"]["data_path"] = "b.json"  # another option: resume_differences names it, not this
    assert [line[:13] for line in rundir.input_differences(saved, moved)] == ["--model_name_"]
    assert rundir.input_differences({"data": {"data_path": "a.json"}}, changed) == []  # an older record: nothing to compare
