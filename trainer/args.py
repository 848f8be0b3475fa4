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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

from common.cli import UsageError, did_you_mean, problems_error
from common.inputs import data_problem, model_problem
from common.modeling import EMBEDDED
from data_prep.dataset import BUNDLED_ALPACA
from data_prep.templates import TEMPLATES
from sift.config import LLAMA_LINEARS
from sift.quantize import QUANT_TYPES
from sift.selection import RULES

DEFAULT_DATA = str(BUNDLED_ALPACA)
QUANTIZATIONS = ("none", *QUANT_TYPES)  # none: the weights as loaded; else bitsandbytes' 4-bit type
REPORT_BACKENDS = ("none", "tensorboard", "wandb")  # "none" and the packages the others need
# Choice lists, from the modules that own them (and check them); --help shows them as {a,b,c}.
# --lr_scheduler_type's is transformers' (`schedulers_available`), --finetuning_type's and --optim's
# the method registry's (trainer.methods.flag_choices, handed to `parse` / `parser`).
CHOICES = {"quantization": QUANTIZATIONS, "template": TEMPLATES, "sift_selection": tuple(RULES),
           "report_to": REPORT_BACKENDS}
# Defaults --help describes instead of printing their value (a path of this checkout).
SHOWN_DEFAULTS = {"data_path": "the bundled Alpaca sample, data_prep/samples/alpaca_en_demo.json"}
DESCRIPTION = ("Instruction-tune a LLaMA-family model with SIFT (sparse increment fine-tuning), or the full / "
               "LoRA baselines, on one device or under DeepSpeed. Every option can also come from one YAML / JSON "
               "file of option: value (flags after it override it). Bad options are all reported at once, "
               "before any weight is read (exit status 2).")
USAGE = "%(prog)s [options.yaml] [--option value ...]"
DEMO_STEPS = 20  # the no-argument run: about ten minutes on two idle CPU cores (README)
_ZERO_MEANS = {"eval_steps": "only before and after", "save_steps": "only at the end", "save_total_limit": "all",
               "generate_tokens": "skip"}


def _help(text, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class ModelArguments:
    _argument_group_name = "model: which weights, in which precision"
    model_name_or_path: str | None = _help("local HF directory or hub id; empty = embedded SmolLM2-135M-Instruct", default=None)
    bf16: bool | None = _help("bf16 weights (fp32 masters keep the updates); unset: the DeepSpeed config's "
                              "bf16.enabled if it sets one, else bf16 on CUDA and fp32 on CPU; --bf16 false = fp32",
                              default=None)
    quantization: str = _help("the target linears' base held in bitsandbytes 4 bits (QSIFT with sift, QLoRA with "
                              "lora); none: the weights as loaded", default="none")
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
    finetuning_type: str = _help("sift, or the full / lora baselines through the same loop", default="sift")
    sift_rate: float = _help("fraction of each target weight's entries trained", default=0.05)
    sift_targets: str = _help("comma-separated module names trained sparsely (lora: the adapted modules)",
                              default=",".join(LLAMA_LINEARS))
    sift_dense: str = _help("comma-separated parameter-name substrings trained densely (e.g. norm)", default="")
    sift_selection: str = _help("which entries: grad (largest |gradient| of the first micro-batch, the paper), "
                                "random, magnitude (largest |weight|)", default="grad")
    optim: str = _help("adamw8bit or adamw (SIFT's moments in 8 bits or fp32); full / lora also adamw32bit "
                       "(bitsandbytes, fp32 moments); adamw for full / lora is torch AdamW (moments in the "
                       "weights' dtype)", default="adamw8bit")
    step_in_backward: bool = _help("update inside backward hooks; it needs --gradient_accumulation_steps 1 and "
                                   "--max_grad_norm 0, which it sets when they are not given", default=False)
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
    data_path: str = _help("Alpaca / ShareGPT / unified JSON(L) file or hub dataset id; several, comma-separated, "
                           "are each read in their own format and joined before the shuffle", default=DEFAULT_DATA)
    eval_data_path: str | None = _help("a separate held-out file (same formats; comma-separated for several); "
                                       "unset = --eval_samples samples split off --data_path", default=None)
    template: str = _help("auto (chat when the tokenizer has a template), chat (the tokenizer's chat template), "
                          "alpaca (Stanford Alpaca prompt)", default="auto")
    train_on_prompt: bool = _help("train on the prompt tokens too (system and user turns), not only on the "
                                  "assistant's; the held-out loss stays on the assistant's tokens", default=False)
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
        out = [p for flag in ("data_path", "eval_data_path") for path in data_files(getattr(self, flag))
               if (p := data_problem(f"--{flag}", path))]
        train = data_files(self.data_path)
        if not train:
            out.append(f"--data_path {self.data_path!r}: name a data file (comma-separated for several)")
        out += [f"--data_path: {path} is listed twice" for i, path in enumerate(train)
                if any(same_source(path, earlier) for earlier in train[:i])]
        out += [f"--eval_data_path {path}: is also a --data_path file, so the held-out loss would be measured on "
                "training data: pass another file, or leave it unset to split --eval_samples off --data_path"
                for path in data_files(self.eval_data_path)
                if any(same_source(path, source) for source in train)]
        if self.template not in TEMPLATES:
            out.append(f"--template {self.template}: choose one of {', '.join(TEMPLATES)}")
        if self.model_max_length < 16:
            out.append(f"--model_max_length {self.model_max_length}: too short to hold a prompt and an answer")
        if self.eval_samples < 0 or (self.eval_samples == 0 and not self.eval_data_path):
            out.append(f"--eval_samples {self.eval_samples}: must be >= 1 (0 = all of --eval_data_path, when given)")
        if self.max_train_samples < 0:
            out.append(f"--max_train_samples {self.max_train_samples}: must be >= 0 (0 = all)")
        return out


@dataclass
class TrainArguments:
    _argument_group_name = "training: length, batches, optimizer schedule, devices"
    num_train_epochs: float | None = _help("epochs (ignored when --max_steps is set); unset: 1, or the embedded "
                                           f"demo's {DEMO_STEPS} steps when --max_steps is unset too", default=None)
    max_steps: int | None = _help("optimizer steps (>= 1), instead of --num_train_epochs (both unset: "
                                  f"{DEMO_STEPS} for the embedded demo model, else 1 epoch)", default=None)
    per_device_train_batch_size: int = _help("micro-batch size (samples, or packed rows with --packing)", default=4)
    per_device_eval_batch_size: int = _help("batch size of the held-out loss", default=8)
    gradient_accumulation_steps: int = _help("micro-batches per optimizer step", default=2)
    learning_rate: float = _help("peak learning rate", default=2e-4)
    weight_decay: float = _help("decoupled weight decay", default=0.0)
    warmup_ratio: float = _help("fraction of steps of linear warm-up", default=0.1)
    warmup_steps: int | None = _help("optimizer steps of linear warm-up, instead of --warmup_ratio (give one of "
                                     "the two)", default=None)
    lr_scheduler_type: str = _help("the transformers learning-rate schedule", default="cosine")
    max_grad_norm: float = _help("global L2 clipping; 0 = off", default=1.0)
    max_skipped_steps: float = _help("stop (exit 1, no merged model) when more than this share of the steps is "
                                     "skipped for non-finite gradients", default=0.05)
    gradient_checkpointing: bool = _help("recompute activations in backward", default=False)
    offload_activations: bool = _help("keep the activations saved for backward (with checkpointing: each "
                                      "layer's input) in pinned host memory until backward: less GPU "
                                      "memory, two host-link copies per layer and step", default=False)
    tile_tokens: int = _help("long sequences: each decoder layer's per-token work (norms, q/k/v, RoPE, o "
                             "projection, MLP) runs in chunks of this many tokens, so the MLP's intermediate "
                             "never exists for the whole sequence (the same gradients, Llama models, about 3 in "
                             "100 more matmul work); it acts on sequences longer than one chunk, e.g. 2304 at "
                             "Llama-3-8B; 0 = off", default=0)
    seed: int = _help("seed of data order, selection and init", default=42)
    deepspeed: str | None = _help("DeepSpeed JSON config (launch with `deepspeed train_sft.py ...`)", default=None)
    local_rank: int = _help("set by the deepspeed launcher", default=-1)

    def problems(self) -> list[str]:
        out = []
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                out.append(f"--{name} {getattr(self, name)}: must be >= 1")
        if self.tile_tokens < 0:
            out.append(f"--tile_tokens {self.tile_tokens}: must be >= 0 (0: off, else tokens per chunk)")
        if self.max_steps is not None and self.max_steps < 1:
            out.append(f"--max_steps {self.max_steps}: must be >= 1 (leave it unset to train --num_train_epochs)")
        elif self.max_steps is None and self.num_train_epochs is not None and not self.num_train_epochs > 0:
            out.append(f"--num_train_epochs {self.num_train_epochs}: must be > 0 (or set --max_steps)")
        if not 0 <= self.warmup_ratio < 1:
            out.append(f"--warmup_ratio {self.warmup_ratio}: must be in [0, 1)")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            out.append(f"--warmup_steps {self.warmup_steps}: must be >= 0")
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
    report_to: str = _help("where the log rows also go (comma-separated); TensorBoard writes "
                           "<output_dir>/runs/<run_name>", default="none")
    run_name: str | None = _help("the run's name in TensorBoard / W&B (default: the output directory's name)",
                                 default=None)
    generate_tokens: int = _help("tokens of the before/after sample generation (0 = skip)", default=48)
    verbose: bool = _help("print every skipped data record (by default: counts by reason, per file)", default=False)

    def problems(self) -> list[str]:
        out = []
        if self.logging_steps < 1:
            out.append(f"--logging_steps {self.logging_steps}: must be >= 1")
        for flag in ("eval_steps", "save_steps", "save_total_limit", "generate_tokens"):
            if getattr(self, flag) < 0:
                out.append(f"--{flag} {getattr(self, flag)}: must be >= 0 (0 = {_ZERO_MEANS[flag]})")
        name = self.run_name
        if name is not None and (name in ("", ".", "..") or "/" in name or "\\" in name):
            out.append(f"--run_name {name!r}: a name, not a path (TensorBoard writes <output_dir>/runs/<run_name>): "
                       "no path separator, not empty, '.' or '..'")
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
    given = frozenset()  # not a field: the flags the command line or options file gave (`parse` sets it)

    def groups(self) -> dict[str, dict]:
        """{group: {flag: value}}, as args.json, every checkpoint and the TensorBoard / W&B config record them."""
        return {f.name: dict(vars(getattr(self, f.name))) for f in fields(self)}

    def value(self, flag: str):
        """The value of the flag `--<flag>`, whichever group holds it."""
        return next(group[flag] for group in self.groups().values() if flag in group)

    def is_set(self, flag: str) -> bool:
        """Did the user give `--<flag>` (on the command line or in the options file), or does it differ
        from its default?"""
        default = next(f.default for group in GROUPS for f in fields(group) if f.name == flag)
        return flag in self.given or self.value(flag) != default

    def problems(self) -> list[str]:
        """Everything wrong with the options on their own (ranges, choice lists, the data files). The
        method's rules, DeepSpeed's, the output directory's and the model's are their owners' (the
        validator, trainer.validate, collects them all)."""
        out = [p for group in (self.model, self.data, self.train, self.output) for p in group.problems()]
        if self.is_set("warmup_ratio") and self.train.warmup_steps is not None:
            out.append(f"--warmup_steps {self.train.warmup_steps} and --warmup_ratio {self.train.warmup_ratio}: "
                       "give one of them")
        return out


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


def warmup_steps(train: TrainArguments, total: int) -> int:
    """Optimizer steps of linear warm-up: --warmup_steps, else --warmup_ratio of the run's `total`."""
    return train.warmup_steps if train.warmup_steps is not None else int(train.warmup_ratio * total)


def run_name(output: OutputArguments) -> str:
    return output.run_name or os.path.basename(os.path.abspath(output.output_dir))


def split_list(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def data_files(spec: str | None) -> list[str]:
    """The sources of --data_path / --eval_data_path: comma-separated, or one path that exists as given
    (a file name holding a comma)."""
    if not spec:
        return []
    return [spec] if os.path.exists(spec) else list(split_list(spec))


def same_source(a: str, b: str) -> bool:
    """Do two data sources name the same file (symlinks and spellings resolved) or hub id?"""
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return a == b


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help lists each option once, in its underscore spelling (the dashed one is accepted too), and
    shows a default only where the help does not say what unset means (a path of this checkout as
    what it is: SHOWN_DEFAULTS)."""

    def _format_action_invocation(self, action):
        shown = copy.copy(action)
        shown.option_strings = [s for s in action.option_strings if "-" not in s[2:]] or action.option_strings
        return super()._format_action_invocation(shown)

    def _get_help_string(self, action):
        if action.dest in SHOWN_DEFAULTS:
            return f"{action.help} (default: {SHOWN_DEFAULTS[action.dest]})"
        return action.help if action.default in (None, "") else super()._get_help_string(action)


def _usage_error(message: str):
    """argparse's own errors (a value that is not a number, a missing value): one line, exit status 2."""
    raise UsageError(f"train_sft.py: {message}")


def parser(choices: Mapping[str, Sequence[str]] | None = None):
    """The CLI: HfArgumentParser over GROUPS, one titled --help section per group, no abbreviations
    (--max_step is not --max_steps); `choices` adds the choice lists of the flags this module does not
    own (the method registry's) to --help."""
    from transformers import HfArgumentParser

    out = HfArgumentParser(GROUPS, prog="train_sft.py", usage=USAGE, description=DESCRIPTION,
                           formatter_class=_HelpFormatter, allow_abbrev=False)
    out.error = _usage_error
    shown = {**CHOICES, "lr_scheduler_type": schedulers_available(), **(choices or {})}
    for action in out._actions:
        if action.dest == "bf16":  # HfArgumentParser gives `bool | None = None` no bare-flag form
            action.nargs, action.const = "?", True
        if action.nargs == "?" and action.const is True:  # a boolean: --flag, --flag true, --flag false
            action.metavar = "{true,false}"
        if action.option_strings and action.option_strings[0].startswith("--no_"):  # its `--no_<flag>` twins
            action.help, action.default = f"the same as --{action.dest} false", None
        elif action.dest in shown:
            action.metavar = "{" + ",".join(shown[action.dest]) + "}"
    return out


def parse(argv=None, choices: Mapping[str, Sequence[str]] | None = None) -> Arguments:
    """CLI flags, or a single .yaml/.json file of them (flags after the file override it); an unknown
    option is one line with the closest known one. `choices`: see `parser`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    launcher = [a for a in argv if a.startswith("--local_rank=")]  # the deepspeed launcher's, first
    argv = [a for a in argv if a not in launcher]
    if argv and argv[0].endswith((".yaml", ".yml", ".json")) and not argv[0].startswith("-"):
        values = _read_options_file(argv[0])
        known = [f.name for group in GROUPS for f in fields(group)]
        unknown = [key for key in values if key not in known]
        if unknown:
            raise problems_error(argv[0], [_unknown(key, known) for key in unknown])
        flags = []
        for key, value in values.items():
            flags += [f"--{key}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
        argv = flags + argv[1:]
    cli = parser(choices)
    *groups, rest = cli.parse_args_into_dataclasses(args=argv + launcher, return_remaining_strings=True)
    if rest:
        options = [t.split("=", 1)[0] for t in rest if t.startswith("-")]
        known = [s for a in cli._actions for s in a.option_strings if "-" not in s[2:]]
        raise problems_error("train_sft.py", [_unknown(t, known) for t in options]
                             or [f"unexpected argument(s) {' '.join(rest)}: options are written --name value"])
    args = Arguments(*groups)
    given = {cli._option_string_actions[t.split("=", 1)[0]].dest for t in argv + launcher
             if t.split("=", 1)[0] in cli._option_string_actions}
    args.given = frozenset(given)
    return args


def _unknown(name: str, known: list[str]) -> str:
    """`unknown option NAME` and the closest known one, compared without the leading dashes (a dashed
    spelling is matched as underscores)."""
    dashes = "--" if name.startswith("-") else ""
    match = did_you_mean(name.lstrip("-").replace("-", "_"), [k.lstrip("-") for k in known])
    return f"unknown option {name}" + (f": did you mean {dashes}{match}?" if match else ": see --help")


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
