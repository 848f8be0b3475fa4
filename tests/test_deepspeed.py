"""`deepspeed train_sft.py` on CPU ranks (gloo): ZeRO-3 offload and ZeRO-2 data parallel equal plain runs."""
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


def launch(ranks: int, config: str, argv: list[str]) -> None:
    cmd = [LAUNCHER, "--num_gpus", str(ranks), "--master_port", str(free_port()), "train_sft.py", *argv,
           "--deepspeed", os.path.join("ds_configs", config)]
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
    from transformers import AutoModelForCausalLM

    from sift import apply_increment

    plain, zero3, resumed = (str(tmp_path / n) for n in ("plain", "zero3", "resumed"))
    train_sft.main(train_args(tiny_dir, alpaca_40, plain, "--generate_tokens", "0"))
    launch(1, "zero3_offload.json", train_args(tiny_dir, alpaca_40, zero3, "--save_steps", "2", "--generate_tokens", "0"))
    assert log(zero3) == pytest.approx(log(plain), rel=1e-5)
    assert_increments_close(plain, zero3)

    launch(1, "zero3_offload.json", train_args(tiny_dir, alpaca_40, resumed, "--generate_tokens", "0",
                                               "--resume_from_checkpoint", os.path.join(zero3, "checkpoint-2")))
    assert log(resumed) == log(zero3)[2:]
    assert_increments_close(zero3, resumed, exact=True)

    merged = AutoModelForCausalLM.from_pretrained(os.path.join(zero3, "merged"))
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    apply_increment(base, os.path.join(zero3, "sift_increment.safetensors"))
    for (name, a), b in zip(base.named_parameters(), merged.parameters()):
        assert torch.equal(a, b), name


def test_zero2_two_ranks_equal_one_process_with_twice_the_batch(tiny_dir, alpaca_40, tmp_path):
    single, ranks = str(tmp_path / "single"), str(tmp_path / "ranks")
    common = ("--generate_tokens", "0", "--sift_dense", "norm")
    train_sft.main(train_args(tiny_dir, alpaca_40, single, *common, "--per_device_train_batch_size", "2"))
    launch(2, "zero2.json", train_args(tiny_dir, alpaca_40, ranks, *common, "--per_device_train_batch_size", "1"))
    assert log(ranks) == pytest.approx(log(single), rel=1e-5)
    assert_increments_close(single, ranks)

    inc = load_file(os.path.join(ranks, "sift_increment.safetensors"))
    selected = sum(v.numel() for k, v in inc.items() if k.endswith(".delta") and k.replace("delta", "indices") in inc)
    dense = sum(v.numel() for k, v in inc.items() if k.endswith(".delta") and k.replace("delta", "indices") not in inc)
    assert dense == 5 * 32  # 2 layers x 2 norms + the final norm, hidden 32
    assert log(ranks, "allreduce_bytes_per_step") == [4 * (selected + dense)] * 4


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
    lora = Arguments(model=fp32, method=MethodArguments(finetuning_type="lora"))
    cfg, _ = resolve_config(str(path), lora)
    assert any("runs SIFT only" in p for p in methods.method_class(lora).problems(lora, cfg))


def test_shipped_configs_resolve_from_the_arguments():
    for name in ("zero2.json", "zero3_offload.json"):
        args = Arguments(model=ModelArguments(bf16=True),
                         train=TrainArguments(per_device_train_batch_size=3, gradient_accumulation_steps=5))
        cfg, problems = resolve_config(os.path.join(REPO, "ds_configs", name), args)
        assert problems == []
        assert cfg["train_micro_batch_size_per_gpu"] == 3 and cfg["train_batch_size"] == 15
        assert cfg["bf16"]["enabled"] is True and "auto" not in json.dumps(cfg)
