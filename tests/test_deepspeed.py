"""`deepspeed train_sft.py` on one CPU rank (gloo): ZeRO-3 offload equals the plain run; the configs'
checks. Several ranks: tests/test_zero3.py."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train_sft
from conftest import train_args
from trainer.args import Arguments, MethodArguments, ModelArguments, TrainArguments
from trainer import methods
from trainer.ds import resolve_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(os.path.dirname(sys.executable), "deepspeed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_script(ranks: int, *argv: str) -> None:
    cmd = [LAUNCHER, "--num_gpus", str(ranks), "--master_port", str(free_port()), *argv]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def log(out, key="loss"):
    with open(os.path.join(out, "train_log.jsonl")) as f:
        return [json.loads(line)[key] for line in f]


def assert_increments_close(a_dir, b_dir, exact=False):
    a = load_file(os.path.join(a_dir, "sift_increment.safetensors"))
    b = load_file(os.path.join(b_dir, "sift_increment.safetensors"))
    if not exact:  # which few entries need exact values (sign changes, fp32) may differ by rounding
        a, b = ({k: v for k, v in t.items() if ".exact_" not in k} for t in (a, b))
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith(".indices") or exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_zero3_offload_matches_plain_run_resumes_and_saves_merged(tiny_dir, alpaca_40, tmp_path):
    """One rank (the single-GPU offload route): the run and its resume from checkpoint-2 in one launch."""
    from transformers import AutoModelForCausalLM

    from sift import apply_increment

    plain, zero3, resumed = (str(tmp_path / n) for n in ("plain", "zero3", "resumed"))
    train_sft.main(train_args(tiny_dir, alpaca_40, plain, "--generate_tokens", "0"))
    offload = ("--generate_tokens", "0", "--deepspeed", os.path.join("ds_configs", "zero3_offload.json"))
    plan = [{"train": train_args(tiny_dir, alpaca_40, zero3, "--save_steps", "2", *offload)},
            {"train": train_args(tiny_dir, alpaca_40, resumed, *offload, "--resume_from_checkpoint",
                                 os.path.join(zero3, "checkpoint-2"))}]
    for i, job in enumerate(plan):
        job["out"] = str(tmp_path / f"job{i}.json")
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    launch_script(1, "tests/ds_runs.py", str(tmp_path / "plan.json"))
    assert [json.load(open(job["out"]))["code"] for job in plan] == [0, 0]
    assert log(zero3) == pytest.approx(log(plain), rel=1e-5)
    assert_increments_close(plain, zero3)
    assert log(resumed) == log(zero3)[2:]
    assert_increments_close(zero3, resumed, exact=True)

    merged = AutoModelForCausalLM.from_pretrained(os.path.join(zero3, "merged"))
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    apply_increment(base, os.path.join(zero3, "sift_increment.safetensors"))
    for (name, a), b in zip(base.named_parameters(), merged.parameters()):
        assert torch.equal(a, b), name


def test_unsupported_deepspeed_configs_are_refused(tmp_path):
    cfg = {"train_micro_batch_size_per_gpu": 8, "optimizer": {"type": "AdamW"}, "scheduler": {"type": "WarmupLR"},
           "fp16": {"enabled": True}, "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(cfg))
    fp32 = ModelArguments(bf16=False)
    _, problems = resolve_config(str(path), Arguments(model=fp32, train=TrainArguments(per_device_train_batch_size=2)))
    text = "\n".join(problems)
    for needle in ("train_micro_batch_size_per_gpu is 8 but the arguments say 2", "remove the 'optimizer' section",
                   "remove the 'scheduler' section", "fp16 needs dynamic loss scaling", "offload_optimizer"):
        assert needle in text, needle
    for baseline in ("lora", "full"):  # under the ZeRO-3 config
        args = Arguments(model=fp32, method=MethodArguments(finetuning_type=baseline))
        cfg, _ = resolve_config(str(path), args)
        assert any("runs SIFT only" in p for p in methods.method_class(args).problems(args, cfg)), baseline


def test_shipped_configs_resolve_from_the_arguments():
    for name in ("zero2.json", "zero3.json", "zero3_offload.json"):
        args = Arguments(model=ModelArguments(bf16=True),
                         train=TrainArguments(per_device_train_batch_size=3, gradient_accumulation_steps=5))
        cfg, problems = resolve_config(os.path.join(REPO, "ds_configs", name), args)
        assert problems == []
        assert cfg["train_micro_batch_size_per_gpu"] == 3 and cfg["train_batch_size"] == 15
        assert cfg["bf16"]["enabled"] is True and "auto" not in json.dumps(cfg)


def test_regrow_is_refused_under_zero3_on_several_ranks_only(monkeypatch):
    """A ZeRO-3 rank's slice has a bank sized at selection: regrow there is one line; on one rank, or
    under ZeRO-2, it runs."""
    def problems(config, world):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        args = Arguments(model=ModelArguments(bf16=True), method=MethodArguments(sift_regrow_steps=10),
                         train=TrainArguments(deepspeed=os.path.join(REPO, "ds_configs", config)))
        cfg, _ = resolve_config(args.train.deepspeed, args)
        return methods.method_class(args).deepspeed_problems(args, cfg)

    (line,) = problems("zero3.json", 2)
    assert line.startswith("--sift_regrow_steps 10: drop and regrow is not built for ZeRO-3 on several ranks")
    assert problems("zero3.json", 1) == [] and problems("zero2.json", 2) == []
