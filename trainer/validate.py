"""Every problem with train_sft.py's options, from every owner, at once, before any weight is read.

    plan = resolve(args)            # a Plan, or UsageError listing every problem (exit status 2);
                                    # valid: plan.notes (warnings, implied values) printed on stderr
    plan, problems = check(args)    # the same, without raising or printing

Each rule is written once, by the module that owns what it is about; `check` only collects:
    trainer.args      the options on their own: ranges, choice lists, the data files
    common.inputs     the model source (the eval CLIs use the same check)
    trainer.ds        the DeepSpeed config and launch (the file is read here, once)
    trainer.methods   what the chosen method supports and refuses (its `Rules`)
    trainer.tiled_decoder  --tile_tokens against the model's config, ZeRO-3 and LoRA dropout
    trainer.rundir    the output directory (a running process's lock on it), and what a resume may
                      change: options, and the inputs (`run_inputs`: the model's weights fingerprint and
                      the data files' sha256, read without loading anything)
    the model itself  on a weightless meta-device copy built from its config: the method's target
                      modules (`Method.trained_names`) and --embeddings_on_host (trainer.offload)
    the model's config --model_max_length against its positions (a warning)
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
from common.inputs import data_problem, model_problem
from common.modeling import EMBEDDED, resolve_model_path

from . import ds, methods, offload, rundir, tiled_decoder
from .args import Arguments, data_files, default_bf16, record


@dataclass
class Plan:
    """What valid options resolve to on this machine."""
    method: type[methods.Method] | None  # the method class (None only while a problem stands)
    bf16: bool                           # the weights' dtype: bf16, else fp32
    model_path: str | None = None        # what the weights load from (the embedded model: its cache directory)
    deepspeed: dict | None = None        # the filled-in DeepSpeed config
    notes: list[str] = field(default_factory=list)  # warnings and implied values, one line each
    inputs: dict | None = None           # run_inputs: what args.json records of the model and data files

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
    model_path, found = _model_path(args)
    out += found
    config, found = model_config(model_path)
    out += found
    inputs, found = run_inputs(args, model_path)
    out += found
    notes += length_notes(args, config)
    plan = Plan(method=method, bf16=bf16, model_path=model_path, deepspeed=deepspeed, notes=notes,
                inputs=inputs)
    out += output_problems(args, plan, warn=rundir.launch_rank() == 0)
    out += model_problems(args, method, config)
    out += tiled_decoder.flag_problems(args, config, plan.zero3)
    return plan, out


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


def output_problems(args: Arguments, plan: Plan, warn: bool = False) -> list[str]:
    """The output directory's problems (trainer.rundir), resume's comparisons with the checkpoint's
    record; `warn`: say which checkpoints a resume passes over (once: the check under the lock does not)."""
    output = args.output
    return rundir.output_dir_problems(record(args, plan.bf16, inputs=plan.inputs), output.output_dir,
                                      output.resume_from_checkpoint, output.overwrite_output_dir, warn)


def claim_output_dir(args: Arguments, plan: Plan):
    """The output directory locked for this run for the block (rundir.claim), its problems checked again
    under the lock: of two runs started together into one directory exactly one proceeds."""
    return rundir.claim(args.output.output_dir, lambda: output_problems(args, plan))


def run_inputs(args: Arguments, model_path: str | None) -> tuple[dict, list[str]]:
    """({flag: fingerprint} of what the run reads, problems): the model's weights files (a few values
    per tensor, common.fingerprint; a hub id's cached snapshot; None when not on this machine yet)
    and each data file's sha256 (a hub dataset's snapshot). args.json records it; resume compares it."""
    from common.fingerprint import data_fingerprint, weights_fingerprint
    from common.inputs import model_location

    inputs, out = {}, []
    if model_path is not None:
        location = model_location(args.model.model_name_or_path)
        try:
            inputs["model_name_or_path"] = weights_fingerprint(location) if location is not None else None
        except Exception as e:  # noqa: BLE001  a damaged weights file: safetensors, torch and OS errors alike
            out.append(f"--model_name_or_path {args.model.model_name_or_path or EMBEDDED}: cannot read its weights "
                       f"files ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    for flag in ("data_path", "eval_data_path"):
        source = getattr(args.data, flag)
        if source and data_problem(f"--{flag}", source) is None:
            found = [data_fingerprint(p) for p in data_files(source)]
            inputs[flag] = None if None in found else ",".join(found)
    return inputs, out


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

