"""train_sft.py's configuration: typed dataclasses, HF/FastChat flag names, every problem at once.

    args = parse(argv)               # Arguments: args.model, .method, .data, .train, .output
    resolved, problems = resolve(args)

Each group holds what its name says: the model (weights, precision, 4-bit base), the fine-tuning
method (what is trained, by which optimizer), the data, the training (length, batches, schedule,
devices), the output (directory, checkpoints, evaluation, logging); `--help` shows them under those
titles. `resolve(args)` checks everything that can be checked before a weight is read (SIFT's own rules
come from `SIFTConfig.problems()`, translated to flag names) and resolves what depends on the
machine and on the DeepSpeed config (bf16, the filled-in config), once. Library code raises
`UsageError`; the CLI prints it as one message and exits with status 2.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
from dataclasses import dataclass, field, fields

from data_prep.dataset import BUNDLED_ALPACA
from sift.config import LLAMA_LINEARS, SIFTConfig
from common.cli import UsageError
from common.modeling import EMBEDDED

DEFAULT_DATA = str(BUNDLED_ALPACA)
FINETUNING_TYPES = ("sift", "full", "lora")
FULL_OPTIMIZERS = ("adamw", "adamw8bit", "adamw32bit")  # full / lora: torch AdamW, bitsandbytes 8-bit / fp32
DESCRIPTION = ("Instruction-tune a LLaMA-family model with SIFT (sparse increment fine-tuning), or the full / "
               "LoRA baselines, on one device or under DeepSpeed. Every option can also come from one YAML / JSON "
               "file of option: value (flags after it override it). Bad options are all reported at once, "
               "before any weight is read (exit status 2).")
USAGE = "%(prog)s [options.yaml] [--option value ...]"
DEMO_STEPS = 20  # the no-argument run: about ten minutes on two idle CPU cores (README)
# SIFTConfig field -> the flag that sets it
SIFT_FLAGS = {"rate": "sift_rate", "targets": "sift_targets", "dense": "sift_dense", "selection": "sift_selection",
              "optimizer": "optim", "lr": "learning_rate", "weight_decay": "weight_decay",
              "max_grad_norm": "max_grad_norm", "step_in_backward": "step_in_backward", "seed": "seed"}
# rules of SIFTConfig that hold for every method (an optimizer step is an AdamW step in all three)
SHARED_FIELDS = ("lr", "weight_decay", "max_grad_norm", "betas", "eps")
# SIFTConfig's wording -> the flags' (None = off is 0 on the command line)
_FLAG_WORDS = {"max_grad_norm=None": "--max_grad_norm 0", "step_in_backward=False": "no --step_in_backward",
               "or None to disable": "or 0 to disable"}


def _help(text, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class ModelArguments:
    _argument_group_name = "model: which weights, in which precision"
    model_name_or_path: str | None = _help("local HF directory or hub id; empty = embedded SmolLM2-135M-Instruct", default=None)
    bf16: bool | None = _help("bf16 weights (fp32 masters keep the updates); unset: the DeepSpeed config's "
                              "bf16.enabled if it sets one, else bf16 on CUDA and fp32 on CPU; --bf16 false = fp32",
                              default=None)
    quantization: str = _help("none | nf4 | fp4: the target linears' base held in bitsandbytes 4 bits "
                              "(QSIFT with sift, QLoRA with lora)", default="none")
    double_quant: bool = _help("with --quantization: quantize the 4-bit scales too (--no_double_quant: off)",
                               default=True)
    embeddings_on_host: bool = _help("keep the (frozen, untied) input embedding table in host memory: "
                                     "each step looks its rows up there (0.30 GiB less GPU memory at 13B)",
                                     default=False)


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
    lora_rank: int = _help("LoRA rank", default=8)
    lora_alpha: int = _help("LoRA alpha", default=16)
    lora_dropout: float = _help("LoRA dropout", default=0.0)


@dataclass
class DataArguments:
    _argument_group_name = "data: training and held-out samples"
    data_path: str = _help("Alpaca / ShareGPT / unified JSON(L) file or hub dataset id", default=DEFAULT_DATA)
    eval_data_path: str | None = _help("a separate held-out file (same formats); unset = --eval_samples "
                                       "samples split off --data_path", default=None)
    template: str = _help("auto | chat (tokenizer chat template) | alpaca (Stanford Alpaca prompt)", default="auto")
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


GROUPS = tuple(f.default_factory for f in fields(Arguments))  # the group classes, in Arguments' order


@dataclass
class Resolved:
    """What the options mean on this machine: weight dtype, the filled-in DeepSpeed config."""
    bf16: bool
    deepspeed: dict | None = None

    @property
    def zero3(self) -> bool:
        return bool(self.deepspeed) and self.deepspeed["zero_optimization"].get("stage") == 3


def default_bf16() -> bool:
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
    """The arguments as args.json (and every checkpoint) records them, by group; resuming compares
    these flag by flag (trainer.rundir.flat_args), so a record of older groups still compares."""
    from .ds import world_size

    return {**args.groups(), "world_size": world_size(), "bf16": bf16, **extra}


def sift_fields(args: Arguments) -> dict:
    """SIFTConfig's fields as the flags set them (the CLI's 0 = no clipping is SIFTConfig's None)."""
    method, train = args.method, args.train
    return dict(rate=method.sift_rate, targets=split_list(method.sift_targets), dense=split_list(method.sift_dense),
                selection=method.sift_selection, optimizer=method.optim, lr=train.learning_rate,
                weight_decay=train.weight_decay, max_grad_norm=train.max_grad_norm or None,
                step_in_backward=method.step_in_backward, seed=train.seed)


def method_problems(args: Arguments) -> list[str]:
    """SIFTConfig's rules, in flag names: all of them for sift, the AdamW ones for full / lora."""
    kind = args.method.finetuning_type
    cfg = object.__new__(SIFTConfig)  # unchecked: __post_init__ would raise on the first problem
    cfg.__dict__.update(SIFTConfig().__dict__, **sift_fields(args))
    out = []
    for name, message in cfg.problems():
        if kind != "sift" and name not in SHARED_FIELDS:
            continue
        flag = SIFT_FLAGS.get(name, name)
        for theirs, ours in _FLAG_WORDS.items():
            message = message.replace(theirs, ours)
        out.append(f"--{flag} {args.value(flag)}: {message}" if name != "step_in_backward" else f"--{flag}: {message}")
    if kind != "sift" and args.method.optim not in FULL_OPTIMIZERS:
        out.append(f"--optim {args.method.optim}: choose one of {', '.join(FULL_OPTIMIZERS)} for --finetuning_type "
                   f"{kind}")
    return out


def resolve(args: Arguments) -> tuple[Resolved, list[str]]:
    """(what the options resolve to, everything wrong with them), checked before any weight is loaded."""
    method, data, train, output = args.method, args.data, args.train, args.output
    out = []
    if method.finetuning_type not in FINETUNING_TYPES:
        out.append(f"--finetuning_type {method.finetuning_type}: choose one of {', '.join(FINETUNING_TYPES)}")
    else:
        out += method_problems(args)
    if method.step_in_backward:
        if method.finetuning_type != "sift":
            out.append("--step_in_backward needs --finetuning_type sift")
        if train.gradient_accumulation_steps != 1:
            out.append(f"--step_in_backward cannot accumulate gradients: set --gradient_accumulation_steps 1 "
                       f"(got {train.gradient_accumulation_steps})")
    schedulers = schedulers_available()
    if train.lr_scheduler_type not in schedulers:
        out.append(f"--lr_scheduler_type {train.lr_scheduler_type}: choose one of {', '.join(schedulers)}")
    if not 0 <= train.max_skipped_steps <= 1:
        out.append(f"--max_skipped_steps {train.max_skipped_steps}: a share of the steps, in [0, 1]")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                 "logging_steps"):
        if args.value(name) < 1:
            out.append(f"--{name} {args.value(name)}: must be >= 1")
    if output.eval_steps < 0:
        out.append(f"--eval_steps {output.eval_steps}: must be >= 0 (0 = only before and after)")
    if (train.max_steps or 0) <= 0 and train.num_train_epochs is not None and not train.num_train_epochs > 0:
        out.append(f"--num_train_epochs {train.num_train_epochs}: must be > 0 (or set --max_steps > 0)")
    if not 0 <= train.warmup_ratio < 1:
        out.append(f"--warmup_ratio {train.warmup_ratio}: must be in [0, 1)")
    if data.template not in ("auto", "chat", "alpaca"):
        out.append(f"--template {data.template}: choose auto, chat or alpaca")
    if data.model_max_length < 16:
        out.append(f"--model_max_length {data.model_max_length}: too short to hold a prompt and an answer")
    if data.eval_samples < 0 or (data.eval_samples == 0 and not data.eval_data_path):
        out.append(f"--eval_samples {data.eval_samples}: must be >= 1 (0 = all of --eval_data_path, when given)")
    out += _source_problems(args)
    for backend in split_list(output.report_to):
        module = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(backend)
        if backend != "none" and module is None:
            out.append(f"--report_to {backend}: choose none, tensorboard or wandb")
        elif module and importlib.util.find_spec(module) is None:
            out.append(f"--report_to {backend}: the package is not installed (pip install {module})")
    resolved = Resolved(bf16=default_bf16() if args.model.bf16 is None else args.model.bf16)
    if args.model.embeddings_on_host and (method.finetuning_type == "full" or train.deepspeed
                                          or any("embed" in n for n in split_list(method.sift_dense))):
        out.append("--embeddings_on_host: only for a frozen table without DeepSpeed (not with full fine-tuning, "
                   "--sift_dense embed..., or --deepspeed)")
    if train.deepspeed and not os.path.isfile(train.deepspeed):
        out.append(f"--deepspeed {train.deepspeed}: no such config file")
    elif train.deepspeed:
        from .ds import launcher_problem, resolve_config

        resolved.deepspeed, ds_problems = resolve_config(train.deepspeed, args)
        out += ds_problems + [p for p in [launcher_problem(train.deepspeed)] if p]
        if resolved.deepspeed:
            resolved.bf16 = bool(resolved.deepspeed["bf16"]["enabled"])
    from .quantized import problems as quantization_problems
    from .rundir import output_dir_problems

    out += quantization_problems(args)
    out += output_dir_problems(record(args, resolved.bf16), output.output_dir, output.resume_from_checkpoint,
                               output.overwrite_output_dir)
    return resolved, out


def problems(args: Arguments) -> list[str]:
    """Everything wrong with the options (see `resolve`)."""
    return resolve(args)[1]


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


def _source_problems(args: Arguments) -> list[str]:
    """The model and the data exist (locally, in the hub cache, or on a reachable hub)."""
    from common.hub import hub_problem, looks_like_hub_id

    out = []
    for flag in ("data_path", "eval_data_path"):
        path = getattr(args.data, flag)
        if not path:
            continue
        if os.path.isdir(path):
            out.append(f"--{flag} {path}: is a directory: pass a JSON / JSONL file in it (or a hub id owner/name)")
        elif not os.path.exists(path) and not looks_like_hub_id(path):
            parent = os.path.dirname(os.path.abspath(path))
            missing = "" if os.path.isdir(parent) else f" (nor its directory {parent})"
            out.append(f"--{flag} {path}: no such file{missing}; a hub dataset is written owner/name")
        elif not os.path.exists(path):
            problem = hub_problem(path, "dataset")
            if problem:
                out.append(f"--{flag} {path}: no such file, and as a hub dataset: {problem}")
    name = args.model.model_name_or_path
    if name and name != EMBEDDED:
        if os.path.isdir(name):
            if not os.path.isfile(os.path.join(name, "config.json")):
                out.append(f"--model_name_or_path {name}: no config.json in it: pass a Hugging Face model directory")
        elif not looks_like_hub_id(name):
            out.append(f"--model_name_or_path {name}: no such directory (a hub id is written owner/name)")
        else:
            problem = hub_problem(name, "model")
            if problem:
                out.append(f"--model_name_or_path {name}: no such directory, and as a hub id: {problem}")
    return out


def check_targets(model_path: str, method: MethodArguments, embeddings_on_host: bool = False) -> None:
    """Unknown target modules (and a tied table for --embeddings_on_host) fail here, on a weightless
    meta-device model built from the config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sift.targets import find_trainable

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    head = skeleton.get_output_embeddings()
    if embeddings_on_host and head is not None and head.weight is skeleton.get_input_embeddings().weight:
        raise UsageError("train_sft.py: --embeddings_on_host: this model ties its input embeddings to the "
                         "output head, which needs them on the device (tie_word_embeddings)")
    dense = split_list(method.sift_dense) if method.finetuning_type == "sift" else ()
    if method.finetuning_type != "full":
        try:
            find_trainable(skeleton, split_list(method.sift_targets), dense)
        except ValueError as e:
            detail = "; ".join(line.strip(" -") for line in str(e).splitlines() if line.strip())
            raise UsageError(f"train_sft.py: --sift_targets/--sift_dense: {detail}") from None
