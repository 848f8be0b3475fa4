"""trainer.recipe's parts called one by one on a tiny model (the same parts train_sft.main runs), and
trainer.validate collecting the problems of every owner at once."""
import json
import math

import pytest
import torch

from conftest import train_args
from trainer import args as targs
from trainer import methods, validate
from trainer.data import batches_for_window
from trainer.loss import heldout_loss, label_tokens
from trainer.recipe import Recipe


def recipe(tiny_dir, data, out, *extra) -> Recipe:
    args = targs.parse(train_args(tiny_dir, data, out, "--generate_tokens", "0", *extra))
    return Recipe(args, validate.resolve(args))


def test_a_step_a_checkpoint_and_a_resumed_setup_continue_the_straight_run(tiny_dir, alpaca_40, tmp_path):
    straight = recipe(tiny_dir, alpaca_40, tmp_path / "straight", "--max_steps", "2")
    straight.setup()
    losses = [straight.step(0), straight.step(1)]

    first = recipe(tiny_dir, alpaca_40, tmp_path / "split", "--max_steps", "2")
    first.setup()
    assert first.step(0) == losses[0]
    saved = first.checkpoint(1)
    assert (tmp_path / "split" / "checkpoint-1" / "trainer_state.json").exists() and saved.endswith("checkpoint-1")

    resumed = recipe(tiny_dir, alpaca_40, tmp_path / "split", "--max_steps", "2", "--resume_from_checkpoint", "latest")
    resumed.setup()
    assert resumed.start_step == 1 and resumed.before == first.before == straight.before
    assert resumed.scheduler.get_last_lr() == first.scheduler.get_last_lr()
    assert resumed.step(1) == losses[1]
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
    assert resumed.method.skipped_steps() == 0 and resumed.method.communicated_bytes() == 0


def test_log_rows_and_the_evaluation_schedule(tiny_dir, alpaca_40, tmp_path):
    out = tmp_path / "run"
    run = recipe(tiny_dir, alpaca_40, out, "--max_steps", "5", "--eval_steps", "2", "--save_steps", "3")
    run.setup()
    assert [d for d in range(1, 6) if run.eval_due(d)] == [2, 4]  # the end's held-out loss is "after"
    assert [d for d in range(1, 6) if run.checkpoint_due(d)] == [3, 5]
    run.open_log()  # a fresh run's first row: the base model's held-out loss
    losses = [run.step(0), run.step(1)]
    row = run.log_row(2)
    windows = [batches_for_window(run.train_set, s, 2, 2, 42, run.pad_id) for s in (0, 1)]
    labels = sum(label_tokens(b["labels"]) for w in windows for b in w)
    tokens = sum(int(b["attention_mask"].sum()) for w in windows for b in w)
    grid = sum(b["input_ids"].numel() for w in windows for b in w)
    assert row["step"] == 2 and row["loss"] == (losses[0] + losses[1]) / 2
    # the rate step 2 used (cosine over 5 steps, no warm-up: lambda(1)), not the one set for step 3
    assert row["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 1 / 5)), rel=1e-12)
    assert row["lr"] != run.scheduler.get_last_lr()[0] and row["grad_norm"] == run.grad_norm
    assert row["label_tokens"] == labels and row["padding_share"] == pytest.approx(1 - tokens / grid)
    assert row["skipped_steps"] == 0 and "allreduce_bytes_per_step" not in row  # one process: nothing sent
    expected = heldout_loss(run.model, run.eval_set, run.pad_id, 8, "cpu")
    assert run.evaluate(2) == expected
    third = run.step(2)
    assert run.log_row(3)["loss"] == third  # a row averages only the steps since the previous one
    rows = [json.loads(line) for line in open(out / "train_log.jsonl")]
    assert rows == [{"step": 0, "eval_loss": run.before["heldout_loss"]}, {"step": 2, "eval_loss": expected}]


def test_the_validator_lists_the_problems_of_every_owner_at_once(tiny_dir, alpaca_40, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    def no_loading(*a, **k):
        raise AssertionError("weights loaded before the options were checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):  # a 2-rank deepspeed launch
        monkeypatch.setenv(key, value)
    cfg = tmp_path / "zero3.json"
    cfg.write_text(json.dumps({"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 3}}))
    (tmp_path / "file").write_text("not a directory")
    args = targs.parse(train_args(tiny_dir, alpaca_40, tmp_path / "file", "--deepspeed", str(cfg),
                                  "--warmup_ratio", "1.5", "--eval_data_path", str(tmp_path / "none.json"),
                                  "--optim", "sgd", "--sift_targets", "q_proj,qkv_proj", "--sift_dense", "embed_tokens",
                                  "--embeddings_on_host"))
    wanted = {"trainer.args": ["--warmup_ratio 1.5: must be in [0, 1)", "none.json: no such file"],
              "trainer.ds": ["remove the 'optimizer' section"],
              "trainer.methods": ["--optim sgd: choose one of adamw8bit, adamw for --finetuning_type sift",
                                  "ZeRO-3 with SIFT runs on one rank", "this launch has 2"],
              "trainer.rundir": ["--output_dir", "is a file"],
              "the model's modules": ["--sift_targets/--sift_dense", "target 'qkv_proj' matches no module"],
              "trainer.offload": ["--embeddings_on_host: not with --deepspeed"]}
    with pytest.raises(SystemExit) as err:
        validate.resolve(args)
    assert err.value.code == 2
    for owner, needles in wanted.items():
        assert all(n in str(err.value) for n in needles), owner


@pytest.mark.parametrize("flags, cls, problem", [
    ([], methods.Sift, None),
    (["--quantization", "nf4"], methods.QSift, None),
    (["--quantization", "nf4", "--finetuning_type", "lora"], methods.QLora, None),
    (["--quantization", "nf4", "--finetuning_type", "full"], None,
     "--quantization needs --finetuning_type sift (QSIFT) or lora (QLoRA): a 4-bit base is frozen"),
    (["--finetuning_type", "dora"], None, "--finetuning_type dora: choose one of sift, full, lora"),
    (["--quantization", "nf4", "--sift_dense", "norm"], methods.QSift, "--sift_dense is not supported with --quantization"),
    (["--sift_dense", "norm"], methods.Sift, None),
    (["--finetuning_type", "lora", "--step_in_backward", "--gradient_accumulation_steps", "1"], methods.Lora,
     "--step_in_backward needs --finetuning_type sift"),
    (["--finetuning_type", "full", "--optim", "adamw32bit"], methods.Full, None),
    (["--optim", "adamw32bit"], methods.Sift, "--optim adamw32bit: choose one of adamw8bit, adamw"),
])
def test_each_method_declares_what_it_supports(flags, cls, problem):
    args = targs.parse(flags)
    found, problems = methods.lookup(args)
    assert found is cls
    problems += found.problems(args) if found else []
    assert len(problems) == (problem is not None) and all(p.startswith(problem) for p in problems), problems


def test_deepspeed_stages_and_ranks_are_the_methods_rules(monkeypatch):
    zero = {"zero_optimization": {"stage": 3}}
    args = {name: targs.parse(flags) for name, flags in (("sift", []), ("qsift", ["--quantization", "nf4"]),
                                                         ("lora", ["--finetuning_type", "lora"]))}
    assert methods.Sift.problems(args["sift"], zero) == []  # one rank
    assert methods.QSift.problems(args["qsift"], {"zero_optimization": {"stage": 2}}) == []
    assert methods.QSift.problems(args["qsift"], zero) == [
        "--quantization with ZeRO-3: 4-bit weights are not partitioned; use ZeRO-2 or one device"]
    assert methods.Lora.problems(args["lora"], {"zero_optimization": {"stage": 2}}) == [
        "--deepspeed runs SIFT only; run the lora baseline without --deepspeed"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert methods.Sift.problems(args["sift"], {"zero_optimization": {"stage": 2}}) == []
    (problem,) = methods.Sift.problems(args["sift"], zero)
    assert "ZeRO-3 with SIFT runs on one rank" in problem and "this launch has 2" in problem


def test_inputs_not_on_this_machine_before_loading_are_recorded_after_it_and_compared(tiny_dir, alpaca_40, tmp_path,
                                                                                      monkeypatch):
    """A hub model (or dataset) not yet in the cache has no fingerprint at validation: args.json gets it
    once setup has loaded it, and a resume compares it there."""
    from common.cli import UsageError
    from common.fingerprint import file_sha256, weights_fingerprint
    from trainer import recipe as recipe_module

    run = recipe(tiny_dir, alpaca_40, tmp_path / "run", "--max_steps", "2")
    assert run.plan.inputs == {"model_name_or_path": weights_fingerprint(tiny_dir),
                               "data_path": "sha256:" + file_sha256(alpaca_40)}
    run.plan.inputs["model_name_or_path"] = None  # as for a hub id the load downloads
    run.setup()
    recorded = json.loads((tmp_path / "run" / "args.json").read_text())["inputs"]
    assert recorded["model_name_or_path"] == weights_fingerprint(tiny_dir)
    run.step(0)
    run.checkpoint(1)

    resumed = recipe(tiny_dir, alpaca_40, tmp_path / "run", "--max_steps", "2", "--resume_from_checkpoint", "latest")
    resumed.plan.inputs["model_name_or_path"] = None
    monkeypatch.setattr(recipe_module, "run_inputs", lambda args, path: ({"model_name_or_path": "0" * 32}, []))
    with pytest.raises(UsageError, match=r"checkpoint-1: --model_name_or_path .*: its weights changed since the "
                                         r"checkpoint was written \([0-9a-f]{24} -> 0{24}\)"):
        resumed.setup()
