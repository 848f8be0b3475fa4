"""ZeRO-3 on 2 CPU ranks (gloo): SIFT and QSIFT keep their state per rank, end where the one-rank run
with twice the batch ends, survive SIGTERM and resume bit for bit. Two launches serve every test here
(a launch costs ~20 s of start-up): the SIGTERM'd run, then tests/ds_runs.py with all other runs."""
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import train_sft
from conftest import train_args
from ds_runs import core
from test_deepspeed import LAUNCHER, REPO, assert_increments_close, free_port, log

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
STEPS = "6"
FP32 = ("--optim", "adamw", "--generate_tokens", "0")  # fp32 moments: the deltas compare within 1e-5
IN_BACKWARD = ("--step_in_backward", "--max_grad_norm", "0", "--gradient_accumulation_steps", "1")
CORE = {  # tests/ds_runs.core scenarios
    "memory": {"hidden": 512, "rate": 0.05, "optim": "adamw8bit", "monitor": True},
    "nan": {"rate": 0.05, "in_backward": True, "accum": 1, "steps": 3, "nan": "model.layers.1.mlp.down_proj.weight"},
    "crowd": {"rate": 0.05, "selection": "magnitude", "crowd": True},
    "qsift": {"hidden": 256, "rate": 0.05, "quant": True},
}


def deepspeed_cmd(*argv) -> list[str]:
    return [LAUNCHER, "--num_gpus", "2", "--master_port", str(free_port()), *argv]


def sigterm_mid_run(argv: list[str], out: str) -> tuple[int, str]:
    """Start a 2-rank run; once its log has a row, SIGTERM the launcher's process group (what Ctrl-C
    or a scheduler does: each rank gets it from the group and again from deepspeed.launcher.launch)."""
    proc = subprocess.Popen(deepspeed_cmd("train_sft.py", *argv), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    path, deadline = os.path.join(out, "train_log.jsonl"), time.time() + 300
    while not (os.path.exists(path) and os.path.getsize(path) > 0):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    text, _ = proc.communicate(timeout=300)
    return proc.returncode, text


@pytest.fixture(scope="module")
def runs(tiny_dir, alpaca_40, tmp_path_factory):
    root = tmp_path_factory.mktemp("zero3")
    d = SimpleNamespace(**{n: str(root / n) for n in ("sigterm", "straight", "inb", "qsift", "qinb", "zero2",
                                                       "layout", "qzero2", "qbf16", "qresume", "core", "full")})
    two = lambda out, *extra: train_args(tiny_dir, alpaca_40, out, "--per_device_train_batch_size", "1", *extra)  # noqa: E731
    sift = (*FP32, "--max_steps", STEPS, "--deepspeed", "ds_configs/zero3.json")
    d.rc, d.text = sigterm_mid_run(two(d.sigterm, *sift), d.sigterm)
    d.interrupted = json.loads(open(os.path.join(d.sigterm, "run.json")).read())
    d.checkpoints = sorted(p for p in os.listdir(d.sigterm) if p.startswith("checkpoint-"))
    zero2 = ("--generate_tokens", "0", "--sift_dense", "norm", "--save_steps", "2")
    qsift = (*FP32, "--quantization", "nf4", "--deepspeed", "ds_configs/zero3_offload.json")
    plan = [{"train": two(d.sigterm, *sift, "--resume_from_checkpoint", "latest")},
            {"train": two(d.straight, *sift)},
            {"train": two(d.inb, *FP32, *IN_BACKWARD, "--deepspeed", "ds_configs/zero3.json")},
            {"train": two(d.qsift, *qsift, "--save_steps", "2")},
            {"train": two(d.qinb, *FP32, *IN_BACKWARD, "--quantization", "nf4", "--deepspeed", "ds_configs/zero3.json")},
            {"train": two(d.zero2, *zero2, "--deepspeed", "ds_configs/zero2.json")},
            {"train": two(d.layout, *zero2, "--deepspeed", "ds_configs/zero3.json", "--resume_from_checkpoint",
                          os.path.join(d.zero2, "checkpoint-2"))},
            {"train": two(d.qzero2, "--generate_tokens", "0", "--quantization", "nf4", "--deepspeed",
                          "ds_configs/zero2.json")},
            {"train": two(d.qbf16, "--generate_tokens", "0", "--quantization", "nf4", "--bf16", "True", "--max_steps",
                          "2", "--gradient_accumulation_steps", "1", "--deepspeed", "ds_configs/zero3.json")},
            {"train": two(d.qresume, *qsift, "--resume_from_checkpoint", os.path.join(d.qsift, "checkpoint-2"))},
            {"train": two(d.full, *sift, "--save_steps", "2"), "full_disk": {"rank": 1, "at": ".checkpoint-4-"}}]
    for i, job in enumerate(plan):
        job["out"] = str(root / f"job{i}.json")
    plan += [{"core": spec, "out": f"{d.core}-{name}"} for name, spec in CORE.items()]
    (root / "plan.json").write_text(json.dumps(plan))
    started = time.time()
    done = subprocess.run(deepspeed_cmd("tests/ds_runs.py", str(root / "plan.json")), cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    d.seconds, d.output = time.time() - started, done.stdout + done.stderr
    d.jobs = [json.load(open(job["out"])) for job in plan if "train" in job]
    d.core = {name: [torch.load(f"{d.core}-{name}.rank{r}.pt", weights_only=False) for r in (0, 1)] for name in CORE}
    d.two = two
    return d


def plain(tiny_dir, alpaca_40, out, *extra) -> str:
    """The one-rank run with twice the per-rank batch (the 2-rank runs' global batch), in this process."""
    train_sft.main(train_args(tiny_dir, alpaca_40, out, "--per_device_train_batch_size", "2", *extra))
    return str(out)


def assert_same_run(one: str, two: str) -> None:
    """The 2-rank run ends where the one-rank run does: losses, the increment (indices equal, deltas
    within 1e-5), and merged/ in the one-rank format (same files and tensors, values within 1e-5)."""
    assert log(two) == pytest.approx(log(one), rel=1e-5)
    assert_increments_close(one, two)
    assert sorted(os.listdir(os.path.join(one, "merged"))) == sorted(os.listdir(os.path.join(two, "merged")))
    a, b = (load_file(os.path.join(d, "merged", "model.safetensors")) for d in (one, two))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_sigterm_checkpoints_and_the_2_rank_resume_is_bit_exact(runs):
    assert runs.rc in (-signal.SIGTERM, 128 + signal.SIGTERM), runs.text[-3000:]
    line = [ln for ln in runs.text.splitlines() if "resume with" in ln]
    assert len(line) == 1 and "SIGTERM at step" in line[0], runs.text[-3000:]
    assert len(runs.checkpoints) == 1 and 1 <= int(runs.checkpoints[0].split("-")[1]) < int(STEPS)
    assert runs.interrupted["status"] == "interrupted"
    ckpt = os.path.join(runs.sigterm, runs.checkpoints[0])
    assert {"optimizer.rank0-of-2.pt", "optimizer.rank1-of-2.pt"} <= set(os.listdir(ckpt))
    assert runs.jobs[0] == {"code": 0, "message": ""} and runs.jobs[1]["code"] == 0
    with open(os.path.join(runs.sigterm, "sift_increment.safetensors"), "rb") as f, \
            open(os.path.join(runs.straight, "sift_increment.safetensors"), "rb") as g:
        assert f.read() == g.read()


def test_qsift_zero3_resume_is_bit_exact(runs):
    """QSIFT's checkpoint under ZeRO-3 (the gathered increment, each rank's state) resumed on 2 ranks:
    its 4-bit base fingerprint checked with each layer gathered, the final increment byte for byte."""
    assert runs.jobs[9] == {"code": 0, "message": ""}
    with open(os.path.join(runs.qsift, "sift_increment.safetensors"), "rb") as f, \
            open(os.path.join(runs.qresume, "sift_increment.safetensors"), "rb") as g:
        assert f.read() == g.read()


def test_a_full_disk_on_one_rank_fails_every_rank_in_one_line_and_keeps_the_last_checkpoint(runs):
    """Rank 1's part of checkpoint-4 does not fit: no rank waits for it; the main process says which
    write failed and on which rank, exit status 1, run.json "failed", checkpoint-2 whole, no temp directory."""
    assert runs.jobs[10]["code"] == 1
    lines = [line for line in runs.output.splitlines() if "train_sft.py: writing checkpoint-4 failed" in line]
    assert len(lines) == 1 and "on rank 1: RuntimeError: [enforce fail" in lines[0] and "resume" in lines[0], lines
    assert "full/checkpoint-2 is complete: resume" in lines[0], lines
    names = os.listdir(runs.full)
    assert [n for n in names if "checkpoint" in n] == ["checkpoint-2"], names
    assert os.path.isfile(os.path.join(runs.full, "checkpoint-2", "trainer_state.json"))
    assert json.load(open(os.path.join(runs.full, "run.json")))["status"] == "failed"


def test_resume_under_another_layout_is_refused_in_one_line(runs, monkeypatch, capsys):
    from common import cli

    monkeypatch.setenv("WORLD_SIZE", "1")  # a one-rank run resuming the 2-rank run: refused before loading
    assert cli.run(train_sft.main, runs.two(runs.sigterm, *FP32, "--max_steps", STEPS, "--resume_from_checkpoint",
                                            "latest")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ranks (world size) 2 -> 1" in err
    layout = runs.jobs[6]  # ZeRO-2's replicated state resumed under ZeRO-3 on the same 2 ranks
    assert layout["code"] == 1 and "optimizer.pt, not optimizer.rank0-of-2.pt" in layout["message"]
    assert len(layout["message"].splitlines()) == 1


@pytest.mark.parametrize("name, flags", [("straight", ("--max_steps", STEPS)), ("inb", IN_BACKWARD)])
def test_sift_zero3_ends_where_one_rank_with_twice_the_batch_does(runs, tiny_dir, alpaca_40, tmp_path, name, flags):
    assert_same_run(plain(tiny_dir, alpaca_40, tmp_path / "one", *FP32, *flags), getattr(runs, name))


@pytest.mark.parametrize("name, flags", [("qsift", ()), ("qinb", IN_BACKWARD)])
def test_qsift_zero3_ends_where_one_rank_with_twice_the_batch_does(runs, tiny_dir, alpaca_40, tmp_path, name, flags):
    assert_same_run(plain(tiny_dir, alpaca_40, tmp_path / "one", *FP32, "--quantization", "nf4", *flags),
                    getattr(runs, name))


def test_zero2_two_ranks_equal_one_process_with_twice_the_batch(runs, tiny_dir, alpaca_40, tmp_path):
    single = plain(tiny_dir, alpaca_40, tmp_path / "one", "--generate_tokens", "0", "--sift_dense", "norm")
    assert log(runs.zero2) == pytest.approx(log(single), rel=1e-5)
    assert_increments_close(single, runs.zero2)
    inc = load_file(os.path.join(runs.zero2, "sift_increment.safetensors"))
    selected = sum(v.numel() for k, v in inc.items() if k.endswith(".delta") and k.replace("delta", "indices") in inc)
    dense = sum(v.numel() for k, v in inc.items() if k.endswith(".delta") and k.replace("delta", "indices") not in inc)
    assert dense == 5 * 32  # 2 layers x 2 norms + the final norm, hidden 32
    assert log(runs.zero2, "allreduce_bytes_per_step") == [4 * (selected + dense)] * 4


def test_qsift_zero2_two_ranks_equal_one_process_with_twice_the_batch(runs, tiny_dir, alpaca_40, tmp_path):
    single = plain(tiny_dir, alpaca_40, tmp_path / "one", "--generate_tokens", "0", "--quantization", "nf4")
    assert log(runs.qzero2) == pytest.approx(log(single), rel=1e-5)
    assert_increments_close(single, runs.qzero2)  # the same indices (from the all-reduced first gradient), deltas close


def test_qsift_deltas_stay_fp32_through_deepspeeds_bf16_cast(runs):
    """DeepSpeed casts every float parameter to bf16; trainer.ds gives the zero deltas their fp32 back
    (with the cast left in place, every delta of this run is a bf16 value)."""
    assert runs.jobs[8]["code"] == 0, runs.jobs[8]
    deltas = [v for k, v in load_file(os.path.join(runs.qbf16, "sift_increment.safetensors")).items()
              if k.endswith(".delta")]
    assert deltas and any(bool((d.bfloat16().float() != d).any()) for d in deltas)


def assert_whole_equal(ranks: list[dict], ref: dict, skipped: int = 0, atol: float = 1e-6) -> None:
    """Rank 0's gathered tensors equal the one-process run's: indices exactly, values within 1e-5
    (fp32 moments; `atol`: 8-bit moments, whose 256-entry blocks start anew at each rank's slice)."""
    got = ranks[0]
    assert got["indices"].keys() == ref["indices"].keys()
    for name in ref["indices"]:
        assert torch.equal(got["indices"][name], ref["indices"][name]), name
    for name in ref["values"]:
        torch.testing.assert_close(got["values"][name], ref["values"][name], rtol=1e-5, atol=atol, msg=name)
    assert [r["skipped"] for r in ranks] == [ref["skipped"]] * 2 == [skipped] * 2


def test_each_rank_keeps_half_the_state_and_only_selected_values_cross(runs):
    ranks, ref = runs.core["memory"], core(CORE["memory"], distributed=False)
    assert_whole_equal(ranks, ref, atol=1e-3)  # lr 1e-2, 2 steps: a quantization level of a moment
    for r in ranks:  # SIFT's persistent state (indices, remainders, 8-bit moments): half of one rank's
        assert r["memory"]["persistent"] == pytest.approx(ref["memory"]["persistent"] / 2, rel=0.05)
        assert r["memory"]["host_base"] == pytest.approx(ref["memory"]["host_base"] / 2, rel=0.05)
    assert sum(r["memory"]["entries"] for r in ranks) == ref["memory"]["entries"]
    targets = {n: k for n, k in ref["ks"].items()}  # k of each tensor
    for r in ranks:  # the last step: two micro-batches, after the selection
        sent = [n for op, n in r["calls"] if op == "all_to_all_single"]
        assert sorted(sent) == sorted(list(targets.values()) * 2)  # each tensor's k gathered values, no more
        reduced = [n for op, n in r["calls"] if op in ("all_reduce", "reduce_scatter_tensor", "reduce_scatter", "reduce")]
        assert max(reduced) <= 8, reduced  # scalars (token count, loss, norm): no dense gradient is reduced
        gathered = [n for op, n in r["calls"] if op == "all_gather_into_tensor"]
        assert len(gathered) >= 2 * len(targets)  # the compact indices of each tensor, each micro-batch


def test_in_backward_ranks_skip_the_same_non_finite_tensor(runs):
    ranks, ref = runs.core["nan"], core(CORE["nan"], distributed=False)
    assert_whole_equal(ranks, ref, skipped=1)  # only the last rank's gradient had NaN: every rank skipped


def test_a_rank_whose_slice_holds_no_selected_entry(runs):
    ranks, ref = runs.core["crowd"], core(CORE["crowd"], distributed=False)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert [r["ks"][name] for r in ranks] == [ref["ks"][name], 0]
    assert_whole_equal(ranks, ref)


def test_qsift_partitions_the_4bit_base_and_the_delta(runs):
    ranks, ref = runs.core["qsift"], core(CORE["qsift"], distributed=False)
    assert_whole_equal(ranks, ref)
    for r in ranks:
        parts = {n: v for n, v in r["parts"].items() if ".mlp." in n or ".self_attn." in n}
        assert {n.rsplit(".", 1)[1] for n in parts} == {"weight_4bit", "absmax", "delta", "offsets"}
        for name, (mine, whole) in parts.items():
            assert mine == -(-whole // 2), name  # half of each (the last rank's padded)
        assert r["memory"]["persistent"] == pytest.approx(ref["memory"]["persistent"] / 2, rel=0.05)
    # the memory planner's split (benchmarks.zero_plan) is what DeepSpeed partitioned: each rank half
    # of the partitioned bytes (the last rank's partitions padded), the persistent ones whole
    split = ref["split"]
    assert sum(r["partitioned"] for r in ranks) == pytest.approx(split["partitioned"], rel=0.01)
    assert [r["persistent"] for r in ranks] == [split["persistent"]] * 2
