"""train_sft.py's configuration: typed dataclasses, HF/FastChat flag names, the schema's own checks.

    args = parse(argv)               # Arguments: args.model, .method, .data, .train, .output
    args.problems()                  # what is wrong with the options on their own

Each group holds what its name says: the model (weights, precision, 4-bit base), the fine-tuning
method (what is trained, by which optimizer), the data, the training (length, batches, schedule,
devices), the output (directory, checkpoints, evaluation, logging); `--help` shows them under those
titles. Each group's `problems()` checks ranges and choice lists (imported from the modules that
own them) and the files it names. This module imports no other trainer module: the rules of the
methods, of DeepSpeed, of the output directory and of the model's modules live with their owners,
and `trainer.validate` collects every problem at once before any weight is read.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
from dataclasses import dataclass, field, fields

from common.cli import UsageError
from common.inputs import data_problem, model_problem
from common.modeling import EMBEDDED
from data_prep.dataset import BUNDLED_ALPACA
from data_prep.templates import TEMPLATES
from sift.config import LLAMA_LINEARS
from sift.quantize import QUANT_TYPES

DEFAULT_DATA = str(BUNDLED_ALPACA)
QUANTIZATIONS = ("none", *QUANT_TYPES)  # none: the weights as loaded; else bitsandbytes' 4-bit type
REPORT_BACKENDS = ("none", "tensorboard", "wandb")  # "none" and the packages the others need
DESCRIPTION = ("Instruction-tune a LLaMA-family model with SIFT (sparse increment fine-tuning), or the full / "
               "LoRA baselines, on one device or under DeepSpeed. Every option can also come from one YAML / JSON "
               "file of option: value (flags after it override it). Bad options are all reported at once, "
               "before any weight is read (exit status 2).")
USAGE = "%(prog)s [options.yaml] [--option value ...]"
DEMO_STEPS = 20  # the no-argument run: about ten minutes on two idle CPU cores (README)


def _help(text, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class ModelArguments:
    _argument_group_name = "model: which weights, in which precision"
    model_name_or_path: str | None = _help("local HF directory or hub id; empty = embedded SmolLM2-135M-Instruct", default=None)
    bf16: bool | None = _help("bf16 weights (fp32 masters keep the updates); unset: the DeepSpeed config's "
                              "bf16.enabled if it sets one, else bf16 on CUDA and fp32 on CPU; --bf16 false = fp32",
                              default=None)
    quantization: str = _help(f"{' | '.join(QUANTIZATIONS)}: the target linears' base held in bitsandbytes 4 bits "
                              "(QSIFT with sift, QLoRA with lora)", default="none")
    double_quant: bool = _help("with --quantization: quantize the 4-bit scales too (--no_double_quant: off)",
                               default=True)
    embeddings_on_host: bool = _help("keep the (frozen, untied) input embedding table in host memory: "
                                     "each step looks its rows up there (0.30 GiB less GPU memory at 13B)",
                                     default=False)

    def problems(self) -> list[str]:
        """The choice of --quantization (the model source, tied weights and the trained table are
        checked on the model's config: trainer.validate)."""
        if self.quantization not in QUANTIZATIONS:
            return [f"--quantization {self.quantization}: choose one of {', '.join(QUANTIZATIONS)}"]
        return []


@dataclass
class MethodArguments:
    _argument_group_name = "fine-tuning method: what is trained, by which optimizer"
    finetuning_type: str = _help("sift | full | lora (full and lora are baselines in the same loop)", default="sift")
    sift_rate: float = _help("fraction of each target weight's entries trained", default=0.05)
    sift_targets: str = _help("comma-separated module names trained sparsely (lora: the adapted modules)",
                              default=",".join(LLAMA_LINEARS))
    sift_dense: str = _help("comma-separated parameter-name substrings trained densely (e.g. norm)", default="")
    sift_selection: str = _help("grad | random | magnitude", default="grad")
    optim: str = _help("adamw8bit | adamw (SIFT's moments); full / lora also adamw32bit (bitsandbytes, fp32 "
                       "moments); adamw for full / lora is torch AdamW (moments in the weights' dtype)",
                       default="adamw8bit")
    step_in_backward: bool = _help("update inside backward hooks (no accumulation, no clipping)", default=False)
    sift_regrow_steps: int = _help("drop and regrow each tensor's entries every N optimizer steps (SpIEL-style: "
                                   "the smallest trained changes go back to the base, the candidates with the "
                                   "largest accumulated gradient come in); 0 = off: the first choice stays",
                                   default=0)
    sift_regrow_fraction: float = _help("share of each tensor's entries replaced at the first regrow, decaying "
                                        "linearly to 0 at the end of the run", default=0.2)
    sift_regrow_window: int = _help("optimizer steps of gradient statistics gathered before each regrow "
                                    "(<= --sift_regrow_steps)", default=5)
    lora_rank: int = _help("LoRA rank", default=8)
    lora_alpha: int = _help("LoRA alpha", default=16)
    lora_dropout: float = _help("LoRA dropout", default=0.0)


@dataclass
class DataArguments:
    _argument_group_name = "data: training and held-out samples"
    data_path: str = _help("Alpaca / ShareGPT / unified JSON(L) file or hub dataset id", default=DEFAULT_DATA)
    eval_data_path: str | None = _help("a separate held-out file (same formats); unset = --eval_samples "
                                       "samples split off --data_path", default=None)
    template: str = _help("auto (chat when the tokenizer has a template) | chat (the tokenizer's chat template) | "
                          "alpaca (Stanford Alpaca prompt)", default="auto")
    model_max_length: int = _help("tokens per sample (and per packed row); longer conversations keep whole rounds "
                                  "(512: Stanford Alpaca's cut, which leaves 23 of the bundled 985 samples short)",
                                  default=512)
    packing: bool = _help("concatenate samples into rows of --model_max_length tokens (position ids restart per "
                          "sample, attention never crosses samples): less padding, more label tokens per step",
                          default=False)
    eval_samples: int = _help("held-out samples: split off --data_path, or the first N of --eval_data_path "
                              "(0 = all of it)", default=32)
    max_train_samples: int = _help("use at most this many training samples (0 = all)", default=0)
    strict: bool = _help("fail on the first malformed record instead of skipping and counting", default=False)

    def problems(self) -> list[str]:
        out = [p for flag in ("data_path", "eval_data_path") if (p := data_problem(f"--{flag}", getattr(self, flag)))]
        if self.template not in TEMPLATES:
            out.append(f"--template {self.template}: choose one of {', '.join(TEMPLATES)}")
        if self.model_max_length < 16:
            out.append(f"--model_max_length {self.model_max_length}: too short to hold a prompt and an answer")
        if self.eval_samples < 0 or (self.eval_samples == 0 and not self.eval_data_path):
            out.append(f"--eval_samples {self.eval_samples}: must be >= 1 (0 = all of --eval_data_path, when given)")
        return out


@dataclass
class TrainArguments:
    _argument_group_name = "training: length, batches, optimizer schedule, devices"
    num_train_epochs: float | None = _help("epochs (ignored when max_steps > 0); unset: 1, or the embedded "
                                           f"demo's {DEMO_STEPS} steps when --max_steps is unset too", default=None)
    max_steps: int | None = _help("optimizer steps; > 0 overrides num_train_epochs (unset with num_train_epochs "
                                  f"unset: {DEMO_STEPS} for the embedded demo model, else 1 epoch)", default=None)
    per_device_train_batch_size: int = _help("micro-batch size (samples, or packed rows with --packing)", default=4)
    per_device_eval_batch_size: int = _help("batch size of the held-out loss", default=8)
    gradient_accumulation_steps: int = _help("micro-batches per optimizer step", default=2)
    learning_rate: float = _help("peak learning rate", default=2e-4)
    weight_decay: float = _help("decoupled weight decay", default=0.0)
    warmup_ratio: float = _help("fraction of steps of linear warm-up", default=0.1)
    lr_scheduler_type: str = _help("transformers scheduler name (cosine, linear, constant, ...)", default="cosine")
    max_grad_norm: float = _help("global L2 clipping; 0 = off", default=1.0)
    max_skipped_steps: float = _help("stop (exit 1, no merged model) when more than this share of the steps is "
                                     "skipped for non-finite gradients", default=0.05)
    gradient_checkpointing: bool = _help("recompute activations in backward", default=False)
    offload_activations: bool = _help("keep the activations saved for backward (with checkpointing: each "
                                      "layer's input) in pinned host memory until backward: less GPU "
                                      "memory, two host-link copies per layer and step", default=False)
    seed: int = _help("seed of data order, selection and init", default=42)
    deepspeed: str | None = _help("DeepSpeed JSON config (launch with `deepspeed train_sft.py ...`)", default=None)
    local_rank: int = _help("set by the deepspeed launcher", default=-1)

    def problems(self) -> list[str]:
        out = []
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                out.append(f"--{name} {getattr(self, name)}: must be >= 1")
        if (self.max_steps or 0) <= 0 and self.num_train_epochs is not None and not self.num_train_epochs > 0:
            out.append(f"--num_train_epochs {self.num_train_epochs}: must be > 0 (or set --max_steps > 0)")
        if not 0 <= self.warmup_ratio < 1:
            out.append(f"--warmup_ratio {self.warmup_ratio}: must be in [0, 1)")
        schedulers = schedulers_available()
        if self.lr_scheduler_type not in schedulers:
            out.append(f"--lr_scheduler_type {self.lr_scheduler_type}: choose one of {', '.join(schedulers)}")
        if not 0 <= self.max_skipped_steps <= 1:
            out.append(f"--max_skipped_steps {self.max_skipped_steps}: a share of the steps, in [0, 1]")
        return out


@dataclass
class OutputArguments:
    _argument_group_name = "output: directory, checkpoints and resume, evaluation, logging"
    output_dir: str = _help("where the increment, merged model, checkpoints and logs go", default="outputs/sift-smollm2")
    overwrite_output_dir: bool = _help("allow writing into a directory that holds another run", default=False)
    resume_from_checkpoint: str | None = _help("a checkpoint directory, or 'latest' in output_dir", default=None)
    save_steps: int = _help("checkpoint every N steps (0 = only at the end)", default=0)
    save_total_limit: int = _help("keep at most N checkpoints (0 = all); the final one is always written", default=2)
    eval_steps: int = _help("held-out loss every N steps (eval_loss rows in train_log.jsonl, the bar, "
                            "TensorBoard / W&B; 0 = only before and after)", default=0)
    logging_steps: int = _help("log every N steps", default=2)
    report_to: str = _help("none | tensorboard | wandb (comma-separated); TensorBoard writes "
                           "<output_dir>/runs/<run_name>", default="none")
    run_name: str | None = _help("the run's name in TensorBoard / W&B (default: the output directory's name)",
                                 default=None)
    generate_tokens: int = _help("tokens of the before/after sample generation (0 = skip)", default=48)

    def problems(self) -> list[str]:
        out = []
        if self.logging_steps < 1:
            out.append(f"--logging_steps {self.logging_steps}: must be >= 1")
        if self.eval_steps < 0:
            out.append(f"--eval_steps {self.eval_steps}: must be >= 0 (0 = only before and after)")
        for backend in split_list(self.report_to):
            if backend not in REPORT_BACKENDS:
                out.append(f"--report_to {backend}: choose {', '.join(REPORT_BACKENDS[:-1])} or {REPORT_BACKENDS[-1]}")
            elif backend != "none" and importlib.util.find_spec(backend) is None:
                out.append(f"--report_to {backend}: the package is not installed (pip install {backend})")
        return out


@dataclass
class Arguments:
    """Every option of train_sft.py, by group: `args.model.bf16`, `args.method.sift_rate`, `args.train.seed`,
    ... (a flag's name is unique across the groups; the --help sections follow this order)."""
    model: ModelArguments = field(default_factory=ModelArguments)
    method: MethodArguments = field(default_factory=MethodArguments)
    data: DataArguments = field(default_factory=DataArguments)
    train: TrainArguments = field(default_factory=TrainArguments)
    output: OutputArguments = field(default_factory=OutputArguments)

    def groups(self) -> dict[str, dict]:
        """{group: {flag: value}}, as args.json, every checkpoint and the TensorBoard / W&B config record them."""
        return {f.name: dict(vars(getattr(self, f.name))) for f in fields(self)}

    def value(self, flag: str):
        """The value of the flag `--<flag>`, whichever group holds it."""
        return next(group[flag] for group in self.groups().values() if flag in group)

    def is_set(self, flag: str) -> bool:
        """Does `--<flag>` differ from its default?"""
        default = next(f.default for group in GROUPS for f in fields(group) if f.name == flag)
        return self.value(flag) != default

    def problems(self) -> list[str]:
        """Everything wrong with the options on their own (ranges, choice lists, the data files). The
        method's rules, DeepSpeed's, the output directory's and the model's are their owners' (the
        validator, trainer.validate, collects them all)."""
        return [p for group in (self.model, self.data, self.train, self.output) for p in group.problems()]


GROUPS = tuple(f.default_factory for f in fields(Arguments))  # the group classes, in Arguments' order


def world_size() -> int:
    """Ranks of this launch (the deepspeed launcher sets WORLD_SIZE before we start)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def default_bf16() -> bool:
    """bf16 weights when --bf16 and the DeepSpeed config leave it open: on CUDA, not on the CPU."""
    import torch

    return torch.cuda.is_available()


def total_steps(args: Arguments, micro_batches_per_epoch: int) -> int:
    train = args.train
    if train.max_steps is not None and train.max_steps > 0:
        return train.max_steps
    if train.max_steps is None and train.num_train_epochs is None and args.model.model_name_or_path in (None, "", EMBEDDED):
        return DEMO_STEPS
    epochs = 1.0 if train.num_train_epochs is None else train.num_train_epochs
    return max(1, round(epochs * micro_batches_per_epoch / train.gradient_accumulation_steps))


def run_name(output: OutputArguments) -> str:
    return output.run_name or os.path.basename(os.path.abspath(output.output_dir))


def split_list(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help lists each option once, in its underscore spelling (the dashed one is accepted too), and
    shows a default only where the help does not say what unset means."""

    def _format_action_invocation(self, action):
        shown = copy.copy(action)
        shown.option_strings = [s for s in action.option_strings if "-" not in s[2:]] or action.option_strings
        return super()._format_action_invocation(shown)

    def _get_help_string(self, action):
        return action.help if action.default in (None, "") else super()._get_help_string(action)


def parser():
    """The CLI: HfArgumentParser over GROUPS, one titled --help section per group."""
    from transformers import HfArgumentParser

    out = HfArgumentParser(GROUPS, prog="train_sft.py", usage=USAGE, description=DESCRIPTION,
                           formatter_class=_HelpFormatter)
    for action in out._actions:
        if action.dest == "bf16":  # HfArgumentParser gives `bool | None = None` no bare-flag form
            action.nargs, action.const, action.metavar = "?", True, "{true,false}"
        if action.option_strings and action.option_strings[0].startswith("--no_"):  # its `--no_<flag>` twins
            action.help, action.default = f"the same as --{action.dest} false", None
    return out


def parse(argv=None) -> Arguments:
    """CLI flags, or a single .yaml/.json file of them (flags after the file override it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    launcher = [a for a in argv if a.startswith("--local_rank=")]  # the deepspeed launcher's, first
    argv = [a for a in argv if a not in launcher]
    if argv and argv[0].endswith((".yaml", ".yml", ".json")) and not argv[0].startswith("-"):
        values = _read_options_file(argv[0])
        known = {f.name for group in GROUPS for f in fields(group)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"{argv[0]}: unknown option(s) {', '.join(unknown)}")
        flags = []
        for key, value in values.items():
            flags += [f"--{key}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
        argv = flags + argv[1:]
    return Arguments(*parser().parse_args_into_dataclasses(args=argv + launcher))


def _read_options_file(path: str) -> dict:
    import yaml  # JSON is YAML

    try:
        with open(path) as f:
            values = yaml.safe_load(f)
    except OSError as e:
        raise UsageError(f"{path}: cannot read the options file ({e.strerror})") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise UsageError(f"{path}: not valid YAML{line} ({getattr(e, 'problem', None) or e}): fix the file") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UsageError(f"{path}: expected a mapping of option: value, got a {type(values).__name__}")
    return values


def record(args: Arguments, bf16: bool, **extra) -> dict:
    """The arguments as args.json (and every checkpoint) records them, by group, with the resolved world
    size and bf16; resuming compares these flag by flag (trainer.rundir.flat_args), whatever group a
    record holds a flag in."""
    return {**args.groups(), "world_size": world_size(), "bf16": bf16, **extra}


def schedulers_available() -> list[str]:
    """transformers' scheduler names that run in this loop: built and stepped once on a one-entry
    optimizer (milliseconds), so the ones needing extra arguments (min_lr, num_decay_steps) or a
    metric per step (reduce_lr_on_plateau, greedy) are left out, whatever transformers adds next."""
    import warnings

    import torch
    from transformers import SchedulerType, get_scheduler

    def runs(name: str) -> bool:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()"
                get_scheduler(name, opt, num_warmup_steps=1, num_training_steps=4).step()
            return True
        except (TypeError, ValueError):
            return False

    return [s.value for s in SchedulerType if runs(s.value)]
