"""train_sft.py's options as a user meets them: exact names only (a misspelling or an abbreviation is one
line with the closest name), --help with every choice list from the module that owns it and no path of
this checkout, what --step_in_backward implies, a warning per option the chosen method does not read,
LoRA's own ranges and --model_max_length against the model's positions before any weight loads, and
--warmup_steps with the learning rate each step used."""
import json
import math
import os
import re

import pytest

from conftest import train_args
from trainer import args as targs
from trainer import methods, validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def usage_error(argv) -> str:
    with pytest.raises(SystemExit) as err:
        targs.parse(argv, choices=methods.flag_choices())
    assert err.value.code == 2
    return str(err.value)


@pytest.mark.parametrize("argv, message", [
    (["--learnin_rate", "1e-3"], "train_sft.py: unknown option --learnin_rate: did you mean --learning_rate?"),
    (["--learnin-rate=1e-3"], "train_sft.py: unknown option --learnin-rate: did you mean --learning_rate?"),
    (["--max_step", "3"], "train_sft.py: unknown option --max_step: did you mean --max_steps?"),  # no abbreviations
    (["--lora_r", "4"], "train_sft.py: unknown option --lora_r: did you mean --lora_rank?"),
    (["--frobnicate"], "train_sft.py: unknown option --frobnicate: see --help"),
    (["3e-4"], "train_sft.py: unexpected argument(s) 3e-4: options are written --name value"),
    (["--sift_rate", "lots"], "train_sft.py: argument --sift_rate/--sift-rate: invalid float value: 'lots'"),
])
def test_an_unknown_option_is_one_line_with_the_closest_name(argv, message):
    assert usage_error(argv) == message


def test_every_misspelled_key_of_an_options_file_is_named(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("learning_rat: 1e-3\nsift_rate: 0.01\nmax_step: 3\n")
    assert usage_error([str(cfg)]) == (f"{cfg}: invalid options:\n"
                                       "  - unknown option learning_rat: did you mean learning_rate?\n"
                                       "  - unknown option max_step: did you mean max_steps?")


def test_the_flags_given_count_as_set_even_at_their_default_value(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lora_rank: 8\n")
    args = targs.parse([str(cfg), "--max_grad_norm", "1.0", "--no_double_quant", "--seed=42", "--local_rank=0"])
    assert args.given == {"lora_rank", "max_grad_norm", "double_quant", "seed", "local_rank"}
    assert args.is_set("lora_rank") and args.is_set("seed") and not args.is_set("sift_rate")
    assert targs.parse(["--sift_rate", "0.01"]).is_set("sift_rate")
    assert not targs.Arguments().is_set("sift_rate") and targs.Arguments().given == frozenset()


def test_help_shows_every_choice_list_from_its_owner_and_no_path_of_this_checkout(capsys):
    from data_prep.templates import TEMPLATES
    from sift.quantize import QUANT_TYPES
    from sift.selection import RULES

    usage = None
    with pytest.raises(SystemExit) as done:
        targs.parse(["--help"], choices=methods.flag_choices())
    assert done.value.code == 0
    text = capsys.readouterr().out
    owners = {"quantization": ("none", *QUANT_TYPES), "template": TEMPLATES, "sift_selection": tuple(RULES),
              "report_to": targs.REPORT_BACKENDS, "lr_scheduler_type": targs.schedulers_available(),
              "finetuning_type": tuple(methods.METHODS),
              "optim": tuple(dict.fromkeys(o for m in methods.METHODS.values() for o in m.rules.optimizers))}
    for flag, choices in owners.items():
        usage = re.search(rf"^  --{flag} \{{([^}}]*)\}}", text, re.M)
        assert usage and tuple(usage.group(1).split(",")) == tuple(choices), flag
    assert REPO not in text and "(default: the bundled Alpaca sample" in text
    assert re.search(r"^  --packing \[\{true,false\}\]", text, re.M)


# ----------------------------------------------------------------------------- what the method reads and implies
def check(*flags):
    plan, problems = validate.check(targs.parse(list(flags)))
    return plan, problems


def test_step_in_backward_alone_sets_what_it_needs_and_says_so():
    args = targs.parse(["--step_in_backward"])
    plan, problems = validate.check(args)
    assert problems == [] and (args.train.gradient_accumulation_steps, args.train.max_grad_norm) == (1, 0.0)
    assert plan.notes == ["--step_in_backward: using --gradient_accumulation_steps 1 and --max_grad_norm 0 "
                          "(no clipping), which it needs"]
    plan, problems = check("--step_in_backward", "--gradient_accumulation_steps", "1", "--max_grad_norm", "0")
    assert problems == [] and plan.notes == []
    # a value the user gave stays, and is refused: even the default, when given
    _, problems = check("--step_in_backward", "--gradient_accumulation_steps", "2")
    assert problems == ["--step_in_backward cannot accumulate gradients: set --gradient_accumulation_steps 1 (got 2)"]
    _, problems = check("--step_in_backward", "--max_grad_norm", "1.0")
    assert len(problems) == 1 and problems[0].startswith("--step_in_backward: cannot clip by the global norm")
    # a method that cannot step in backward is refused, not settled
    args = targs.parse(["--step_in_backward", "--finetuning_type", "lora"])
    _, problems = validate.check(args)
    assert args.train.gradient_accumulation_steps == 2 and any("needs --finetuning_type sift" in p for p in problems)


@pytest.mark.parametrize("flags, ignored", [
    (["--lora_rank", "16"], [("lora_rank", "SIFT", "sift", "LoRA, QLoRA")]),
    (["--lora_rank", "8"], [("lora_rank", "SIFT", "sift", "LoRA, QLoRA")]),  # given at its default: still set
    (["--lora_dropout", "0.1", "--no_double_quant"], [("lora_dropout", "SIFT", "sift", "LoRA, QLoRA"),
                                                      ("double_quant", "SIFT", "sift", "QSIFT, QLoRA")]),
    (["--finetuning_type", "lora", "--sift_rate", "0.01", "--sift_selection", "random"],
     [("sift_rate", "LoRA", "lora", "SIFT, QSIFT"), ("sift_selection", "LoRA", "lora", "SIFT, QSIFT")]),
    (["--finetuning_type", "full", "--sift_targets", "q_proj", "--lora_alpha", "32"],
     [("sift_targets", "full fine-tuning", "full", "SIFT, LoRA, QSIFT, QLoRA"),
      ("lora_alpha", "full fine-tuning", "full", "LoRA, QLoRA")]),
    (["--quantization", "nf4", "--no_double_quant", "--sift_rate", "0.01"], []),  # QSIFT reads them
    (["--quantization", "nf4", "--sift_dense", "norm"], []),  # refused, not warned
    (["--finetuning_type", "lora", "--step_in_backward", "--gradient_accumulation_steps", "1"], []),  # refused
    (["--finetuning_type", "lora", "--sift_targets", "q_proj", "--optim", "adamw"], []),
])
def test_an_option_the_method_does_not_read_is_one_warning_naming_the_method(flags, ignored):
    args = targs.parse(flags)
    cls, _ = methods.lookup(args)
    assert cls.ignored(args) == [f"warning: --{flag} {args.value(flag)} is ignored: {title} (--finetuning_type {kind}) "
                                 f"does not read it; {readers} do" for flag, title, kind, readers in ignored]


def test_the_registry_declares_a_reader_for_every_method_flag():
    """Rules.reads is the one place that says which method reads what: every flag of the method group
    (but the method's own name) is read by some method, and each method reads only real flags."""
    from dataclasses import fields

    every = (*methods.METHODS.values(), *methods.FOUR_BIT.values())
    read = {f for m in every for f in m.rules.reads}
    flags = {f.name for group in targs.GROUPS for f in fields(group)}
    assert {f.name for f in fields(targs.MethodArguments)} - {"finetuning_type"} <= read <= flags


def test_lora_ranges_and_the_model_length_are_checked_before_any_weight_loads(tiny_dir, alpaca_40, tmp_path,
                                                                              monkeypatch):
    from transformers import AutoModelForCausalLM

    def no_loading(*a, **k):
        raise AssertionError("weights loaded before the options were checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
    argv = train_args(tiny_dir, alpaca_40, tmp_path / "run")
    _, problems = validate.check(targs.parse(argv + ["--finetuning_type", "lora", "--lora_rank", "0",
                                                     "--lora_alpha", "-16", "--lora_dropout", "1.5"]))
    assert problems == ["--lora_rank 0: must be >= 1",
                        "--lora_alpha -16: must be > 0 (the adapters' scale is alpha / rank)",
                        "--lora_dropout 1.5: must be in [0, 1)"]
    plan, problems = validate.check(targs.parse(argv + ["--model_max_length", "129"]))  # the tiny model has 128
    assert problems == [] and plan.notes == [
        "warning: --model_max_length 129 is beyond the model's 128 positions (max_position_embeddings in its "
        "config.json): the tokens past them sit at positions it was not trained on"]
    assert validate.check(targs.parse(argv + ["--model_max_length", "128"]))[0].notes == []


def test_an_eval_file_that_is_a_training_file_is_refused_through_a_symlink_too(alpaca_40, tmp_path):
    link = tmp_path / "held.json"
    link.symlink_to(alpaca_40)
    args = targs.parse(["--data_path", f"{tmp_path / 'other.json'},{alpaca_40}", "--eval_data_path", str(link)])
    assert [p for p in args.problems() if "held.json" in p] == [
        f"--eval_data_path {link}: is also a --data_path file, so the held-out loss would be measured on training "
        "data: pass another file, or leave it unset to split --eval_samples off --data_path"]


# ----------------------------------------------------------------------------- warm-up and the logged rate
def test_warmup_steps_and_the_rate_each_step_used_is_the_logged_one(tiny_dir, alpaca_40, tmp_path):
    """With --warmup_steps 2 over 5 cosine steps, step i (0-based) uses base * lambda(i): 0, 1/2, the peak,
    then the cosine; the log row of step i + 1 carries that rate (the peak included)."""
    import train_sft

    out = tmp_path / "run"
    train_sft.main(train_args(tiny_dir, alpaca_40, out, "--max_steps", "5", "--warmup_steps", "2",
                              "--generate_tokens", "0"))
    rows = [json.loads(line) for line in open(out / "train_log.jsonl")]
    lambdas = [i / 2 if i < 2 else 0.5 * (1 + math.cos(math.pi * (i - 2) / 3)) for i in range(5)]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["lr"] for r in rows] == pytest.approx([1e-3 * x for x in lambdas], rel=1e-12, abs=0)
    assert rows[2]["lr"] == 1e-3  # the peak, exactly
    assert json.loads((out / "args.json").read_text())["train"]["warmup_steps"] == 2
    assert "--warmup_steps 3 and --warmup_ratio 0.1: give one of them" in targs.parse(
        ["--warmup_steps", "3", "--warmup_ratio", "0.1"]).problems()
    assert targs.warmup_steps(targs.parse([]).train, 25) == 2  # the ratio's steps when --warmup_steps is unset
