"""The real train_sft.py on a tiny Llama with the SmolLM2 tokenizer and real Alpaca rows (CPU)."""
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file

import train_sft
from conftest import train_args, tiny_llama
from sift import apply_increment
from trainer.checkpoint import find_checkpoint, save_checkpoint
from data_prep.dataset import collate
from trainer.args import UsageError
from trainer.data import batches_for_window
from trainer.loss import train_window


def train(tiny_dir, data, out, *extra):
    return train_sft.main(train_args(tiny_dir, data, out, *extra))


def log_losses(out):
    with open(os.path.join(out, "train_log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_end_to_end_outputs_and_merged_model(tiny_dir, alpaca_40, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    before, after = train(tiny_dir, alpaca_40, out)
    for name in ("sift_increment.safetensors", "args.json", "train_log.jsonl", "loss.png", "merged/config.json",
                 "merged/tokenizer.json", "merged/model.safetensors"):
        assert (out / name).exists(), name
    rows = [json.loads(line) for line in open(out / "train_log.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(k in rows[0] for k in ("loss", "lr", "grad_norm", "tokens_per_s", "label_tokens_per_s", "padding_share",
                                      "peak_rss_mb"))
    assert all(0 <= r["padding_share"] < 1 and r["label_tokens_per_s"] < r["tokens_per_s"] for r in rows)
    assert any(r["padding_share"] > 0 for r in rows)
    assert after["heldout_loss"] < before["heldout_loss"]
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert not all(torch.equal(a, b) for a, b in zip(base.parameters(), merged.parameters()))
    apply_increment(base, str(out / "sift_increment.safetensors"))
    for (name, a), b in zip(base.named_parameters(), merged.parameters()):
        assert torch.equal(a, b), name


def test_resume_continues_bit_exactly(tiny_dir, alpaca_40, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(tiny_dir, alpaca_40, straight, "--save_steps", "2")
    assert (straight / "checkpoint-2" / "trainer_state.json").exists()
    train(tiny_dir, alpaca_40, resumed, "--resume_from_checkpoint", str(straight / "checkpoint-2"))
    assert log_losses(resumed) == log_losses(straight)[2:]
    a = load_file(straight / "sift_increment.safetensors")
    b = load_file(resumed / "sift_increment.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_interrupted_checkpoint_leaves_the_previous_one(tmp_path):
    def payload(d):
        (tmp_path / "marker").write_text("x")
        open(os.path.join(d, "optimizer.pt"), "w").write("ok")

    save_checkpoint(str(tmp_path), 2, payload, {"step": 2}, keep=2)

    def killed(d):
        open(os.path.join(d, "optimizer.pt"), "w").write("half")
        raise KeyboardInterrupt  # what kill -9 leaves is the same: a temp dir, never checkpoint-4

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(str(tmp_path), 4, killed, {"step": 4}, keep=2)
    (tmp_path / "checkpoint-6").mkdir()  # a torn directory from a kill between mkdir and marker
    (tmp_path / ".checkpoint-8-abc").mkdir()
    assert find_checkpoint(str(tmp_path), "latest") == str(tmp_path / "checkpoint-2")
    for step in (10, 12, 14):
        save_checkpoint(str(tmp_path), step, payload, {"step": step}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*") if (p / "trainer_state.json").exists()) == \
        ["checkpoint-12", "checkpoint-14"]


def test_accumulation_matches_one_big_batch(tiny_dir, alpaca_40):
    from transformers import AutoTokenizer

    from data_prep.encode import encode_conversation
    from data_prep.formats import read_conversations
    from data_prep.report import Report

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    samples = [encode_conversation(c["messages"], tok, "auto", 96) for c in read_conversations(alpaca_40, Report())][:4]
    grads = []
    for micro in ([collate(samples, tok.pad_token_id)], [collate([s], tok.pad_token_id) for s in samples]):
        model = tiny_llama(vocab=len(tok))
        train_window(model, micro, "cpu")
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    assert grads[0].norm() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_data_order_is_a_function_of_the_step(tiny_dir, alpaca_40):
    samples = [{"input_ids": [i, i], "labels": [i, i]} for i in range(10)]
    a = batches_for_window(samples, 3, 2, 2, seed=1, pad_id=0)
    b = batches_for_window(samples, 3, 2, 2, seed=1, pad_id=0)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    two_ranks = [batches_for_window(samples, 3, 1, 2, seed=1, pad_id=0, rank=r, world=2) for r in (0, 1)]
    union = sorted(int(w[i]["input_ids"][0, 0]) for w in two_ranks for i in range(2))
    assert union == sorted(int(x["input_ids"][r, 0]) for x in a for r in range(2))


@pytest.mark.parametrize("method, optim", [("full", "adamw"), ("lora", "adamw")])
def test_baselines_run_through_the_same_loop(tiny_dir, alpaca_40, tmp_path, method, optim):
    from transformers import AutoModelForCausalLM

    out = tmp_path / method
    before, after = train(tiny_dir, alpaca_40, out, "--finetuning_type", method, "--optim", optim,
                          "--sift_targets", "q_proj,v_proj")
    assert after["heldout_loss"] < before["heldout_loss"]
    assert not (out / "sift_increment.safetensors").exists()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert type(merged).__name__ == "LlamaForCausalLM"


def usage_error(capsys, argv) -> str:
    """train_sft.py's refusal (as `python train_sft.py` runs main): exit status 2 and one message on
    stderr, no traceback."""
    from common import cli

    assert cli.run(train_sft.main, argv) == 2
    message = capsys.readouterr().err
    assert message.startswith("train_sft.py: ") and "Traceback" not in message
    return message


def test_bad_options_are_all_reported_before_loading(tmp_path, capsys):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "args.json").write_text("{}")
    message = usage_error(capsys, ["--model_name_or_path", str(tmp_path / "no-model"), "--data_path",
                                   str(tmp_path / "none.json"), "--output_dir", str(tmp_path / "old"),
                                   "--sift_rate", "1.5", "--step_in_backward", "--gradient_accumulation_steps", "4",
                                   "--max_grad_norm", "1.0", "--sift_selection", "best", "--eval_steps", "-1"])
    for needle in ("--sift_rate 1.5", "--sift_selection best", "--gradient_accumulation_steps 1",
                   "--max_grad_norm 0", "none.json: no such file", "no-model: no such directory",
                   "holds another run", "--eval_steps -1"):
        assert needle in message, needle


@pytest.mark.parametrize("method", ["sift", "full", "lora"])
def test_sift_config_rules_reach_the_cli_in_flag_names_before_any_weight_loads(tiny_dir, alpaca_40, tmp_path,
                                                                               capsys, monkeypatch, method):
    from transformers import AutoModelForCausalLM

    def no_loading(*a, **k):
        raise AssertionError("weights loaded before the options were checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
    message = usage_error(capsys, train_args(tiny_dir, alpaca_40, tmp_path / "x", "--finetuning_type", method,
                                             "--optim", "adamw", "--learning_rate", "-1", "--max_grad_norm", "-1",
                                             "--weight_decay", "nan"))
    for needle in ("--learning_rate -1.0: must be a finite number > 0", "--max_grad_norm -1.0: a finite positive "
                   "number, or 0 to disable clipping", "--weight_decay nan: must be a finite number >= 0"):
        assert needle in message, needle
    message = usage_error(capsys, train_args(tiny_dir, alpaca_40, tmp_path / "x", "--finetuning_type", method,
                                             "--learning_rate", "nan"))
    assert "--learning_rate nan: must be a finite number > 0" in message


def test_unknown_target_module_fails_before_weights_load(tiny_dir, alpaca_40, tmp_path, capsys):
    message = usage_error(capsys, train_args(tiny_dir, alpaca_40, tmp_path / "x", "--sift_targets", "q_proj,qkv_proj"))
    assert "target 'qkv_proj' matches no module" in message


def test_step_in_backward_run_equals_deferred_run(tiny_dir, alpaca_40, tmp_path):
    runs = {}
    for mode in ("deferred", "in_backward"):
        out = tmp_path / mode
        extra = ("--gradient_accumulation_steps", "1", "--max_grad_norm", "0", "--generate_tokens", "0")
        train(tiny_dir, alpaca_40, out, *extra, *(("--step_in_backward",) if mode == "in_backward" else ()))
        runs[mode] = (log_losses(out), load_file(out / "sift_increment.safetensors"))
    (la, a), (lb, b) = runs["deferred"], runs["in_backward"]
    assert la == lb
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_options_from_a_yaml_file_with_flag_overrides_and_launcher_rank(tmp_path):
    from trainer.args import parse, total_steps

    cfg = tmp_path / "run.yaml"
    cfg.write_text("learning_rate: 3.0e-4\nsift_targets: [q_proj, v_proj]\nbf16: true\nmax_steps: 7\n")
    args = parse(["--local_rank=1", str(cfg), "--learning_rate", "1e-4"])
    assert (args.train.learning_rate, args.method.sift_targets, args.model.bf16, args.train.max_steps,
            args.train.local_rank) == (1e-4, "q_proj,v_proj", True, 7, 1)
    (tmp_path / "bad.yaml").write_text("learning_rat: 1\n")
    with pytest.raises(UsageError, match="unknown option.*learning_rat"):
        parse([str(tmp_path / "bad.yaml")])


def test_help_and_the_options_page_list_every_option_under_its_group(capsys):
    """Each argument group is one titled --help section holding exactly its flags, and docs/options.md
    names every flag under the same group."""
    from dataclasses import fields

    from trainer.args import GROUPS, parse

    with pytest.raises(SystemExit) as done:
        parse(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    page = open(os.path.join(os.path.dirname(train_sft.__file__), "docs", "options.md")).read()
    titles = [g._argument_group_name for g in GROUPS]
    for i, group in enumerate(GROUPS):
        flags = {f"--{f.name}" for f in fields(group)}
        for where, start, entry in ((text, f"\n{titles[i]}:\n", r"^  (--[a-z0-9_]+)"),  # an option, not wrapped help
                                    (page, f"\n## {titles[i][0].upper()}{titles[i][1:]}\n", r"^- `(--[a-z0-9_]+)`")):
            section = where[where.index(start):]
            if i + 1 < len(GROUPS):
                section = section[:section.lower().index(titles[i + 1].lower())]
            listed = set(re.findall(entry, section, re.M)) - {f"--no_{f.name}" for f in fields(group)}
            assert listed == flags, (group.__name__, listed ^ flags)


@pytest.mark.parametrize("argv, steps", [
    ([], 20),                                               # the demo default: nothing said about length
    (["--num_train_epochs", "3"], 3 * 100 // 2),            # the embedded model trains the epochs asked for
    (["--max_steps", "7"], 7),
    (["--max_steps", "7", "--num_train_epochs", "3"], 7),   # max_steps wins, as in HF
    (["--model_name_or_path", "org/model"], 50),            # 1 epoch
    (["--model_name_or_path", "org/model", "--num_train_epochs", "2", "--gradient_accumulation_steps", "4"], 50),
])
def test_training_length(argv, steps):
    from trainer.args import parse, total_steps

    assert total_steps(parse(argv), 100) == steps


def test_bf16_is_tri_state(monkeypatch):
    import trainer.args as targs
    from trainer import validate

    for cuda in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        for argv, expected in (([], cuda), (["--bf16"], True), (["--bf16", "true"], True), (["--bf16", "false"], False)):
            assert validate.check(targs.parse(argv))[0].bf16 is expected, (cuda, argv)


def test_a_deepspeed_config_without_bf16_trains_fp32_on_a_gpu_when_the_flag_is_unset(tmp_path, monkeypatch):
    import trainer.args as targs
    from trainer import validate

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):  # as the deepspeed launcher sets
        monkeypatch.setenv(key, value)
    cfg = tmp_path / "fp32.json"
    cfg.write_text(json.dumps({"bf16": {"enabled": False}, "zero_optimization": {"stage": 2}}))
    out = ["--output_dir", str(tmp_path / "run")]
    resolved, problems = validate.check(targs.parse(["--deepspeed", str(cfg), *out]))
    assert problems == [] and resolved.bf16 is False and resolved.deepspeed["bf16"]["enabled"] is False
    problems = validate.check(targs.parse(["--deepspeed", str(cfg), "--bf16", *out]))[1]
    assert problems == [f"--deepspeed {cfg}: bf16.enabled=False contradicts --bf16 True"]
