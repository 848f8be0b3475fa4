"""Every problem with train_sft.py's options, from every owner, at once, before any weight is read.

    plan = resolve(args)            # a Plan, or UsageError listing every problem (exit status 2);
                                    # valid: plan.notes (warnings, implied values) printed on stderr
    plan, problems = check(args)    # the same, without raising or printing

Each rule is written once, by the module that owns what it is about; `check` only collects:
    trainer.args      the options on their own: ranges, choice lists, the data files
    common.hub        the model source (the eval CLIs use the same check)
    trainer.ds        the DeepSpeed config and launch (the file is read here, once)
    trainer.methods   what the chosen method supports and refuses (its `Rules`)
    trainer.rundir    the output directory, and what a resume may change
    the model itself  its config: --model_max_length against its positions (a warning); on a
                      weightless meta-device copy built from it: the method's target modules
                      (`Method.trained_names`) and --embeddings_on_host (trainer.offload)
A new check goes into its owner's problems function (or a new owner's, added to `check`). Before its
rules, the method settles what its flags imply where the user left others unset
(`Method.settle`: args change in place); after them it names the flags set for another method
(`Method.ignored`). Those lines, and the warnings, are `plan.notes`.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from common.cli import problems_error
from common.inputs import model_problem
from common.modeling import EMBEDDED, resolve_model_path

from . import ds, methods, offload, rundir
from .args import Arguments, default_bf16, record


@dataclass
class Plan:
    """What valid options resolve to on this machine."""
    method: type[methods.Method] | None  # the method class (None only while a problem stands)
    bf16: bool                           # the weights' dtype: bf16, else fp32
    model_path: str | None = None        # what the weights load from (the embedded model: its cache directory)
    deepspeed: dict | None = None        # the filled-in DeepSpeed config
    notes: list[str] = field(default_factory=list)  # warnings and implied values, one line each

    @property
    def zero3(self) -> bool:
        return bool(self.deepspeed) and self.deepspeed["zero_optimization"].get("stage") == 3


def base_model(args: Arguments) -> str:
    """The model id an increment records: what users load, not this machine's cache path."""
    return args.model.model_name_or_path or EMBEDDED


def check(args: Arguments) -> tuple[Plan, list[str]]:
    """(what the options resolve to, everything wrong with them), checked before any weight is read."""
    out = args.problems()
    deepspeed, found = ds.problems(args)
    out += found
    method, found = methods.lookup(args)
    out += found
    notes = []
    if method is not None:
        notes += method.settle(args)
        out += method.problems(args, deepspeed)
        notes += method.ignored(args)
    bf16 = deepspeed["bf16"]["enabled"] if deepspeed else default_bf16() if args.model.bf16 is None else args.model.bf16
    output = args.output
    out += rundir.output_dir_problems(record(args, bf16), output.output_dir, output.resume_from_checkpoint,
                                      output.overwrite_output_dir)
    model_path, found = _model_path(args)
    out += found
    config, found = model_config(model_path)
    out += found
    out += model_problems(args, method, config)
    notes += length_notes(args, config)
    return Plan(method=method, bf16=bf16, model_path=model_path, deepspeed=deepspeed, notes=notes), out


def resolve(args: Arguments) -> Plan:
    """The Plan of `args`, or a UsageError with every problem (one line for one, a list for several);
    the notes of valid options go to stderr (once: on the first rank of a DeepSpeed launch), a
    refusal is its problems alone."""
    plan, problems = check(args)
    if problems:
        raise problems_error("train_sft.py", problems)
    if os.environ.get("RANK", "0") == "0":
        for note in plan.notes:
            print(note, file=sys.stderr)
    return plan


def _model_path(args: Arguments) -> tuple[str | None, list[str]]:
    """(the path the model loads from, or None; why not)."""
    name = args.model.model_name_or_path
    problem = model_problem("--model_name_or_path", name)
    if problem:
        return None, [problem]
    try:
        return resolve_model_path(name), []
    except FileNotFoundError as e:  # the embedded model's package is missing
        return None, [f"--model_name_or_path {name or EMBEDDED}: {e}"]


def model_config(model_path: str | None):
    """(the model's transformers config, or None; why not)."""
    if model_path is None:
        return None, []
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_path), []
    except (OSError, ValueError) as e:
        return None, [f"--model_name_or_path {model_path}: cannot read its config ({e})"]


def length_notes(args: Arguments, config) -> list[str]:
    """A warning when --model_max_length goes past the positions the model has (its config's
    max_position_embeddings): RoPE runs there, but on positions the model never saw."""
    positions = getattr(config, "max_position_embeddings", None)
    if positions is None or args.data.model_max_length <= positions:
        return []
    return [f"warning: --model_max_length {args.data.model_max_length} is beyond the model's {positions} positions "
            "(max_position_embeddings in its config.json): the tokens past them sit at positions it was not trained on"]


def model_problems(args: Arguments, method: type[methods.Method] | None, config) -> list[str]:
    """The rules that need the model's modules, on a weightless meta-device model built from its config
    (none is built when the model or the method is already wrong)."""
    skeleton, trained, out = None, set(), []
    if method is not None and config is not None:
        try:
            skeleton = meta_model(config)
        except (OSError, ValueError) as e:
            return [f"--model_name_or_path {args.model.model_name_or_path}: cannot build the model from its "
                    f"config ({e})"]
        try:
            trained = method.trained_names(skeleton, args)
        except ValueError as e:
            detail = "; ".join(line.strip(" -") for line in str(e).splitlines() if line.strip())
            out.append(f"--sift_targets/--sift_dense: {detail}")
    if args.model.embeddings_on_host:
        out += offload.embeddings_on_host_problems(skeleton, trained, bool(args.train.deepspeed))
    return out


def meta_model(config):
    """The model of `config` on the meta device: its modules and shapes, no weights."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)

