"""train_sft.py's configuration: typed dataclasses, HF/FastChat flag names, every problem at once."""
from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass, field, fields

from data_prep.dataset import BUNDLED_ALPACA
from sift.config import LLAMA_LINEARS, OPTIMIZERS, SELECTIONS
from common.modeling import EMBEDDED

DEFAULT_DATA = str(BUNDLED_ALPACA)
FINETUNING_TYPES = ("sift", "full", "lora")
DEMO_STEPS = 20  # the no-argument run: under five minutes on two idle CPU cores (README)


def _help(text, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = _help("local HF directory or hub id; empty = embedded SmolLM2-135M-Instruct", default=None)
    finetuning_type: str = _help("sift | full | lora (full and lora are baselines in the same loop)", default="sift")
    sift_rate: float = _help("fraction of each target weight's entries trained", default=0.05)
    sift_targets: str = _help("comma-separated module names trained sparsely", default=",".join(LLAMA_LINEARS))
    sift_dense: str = _help("comma-separated parameter-name substrings trained densely (e.g. norm)", default="")
    sift_selection: str = _help("grad | random | magnitude", default="grad")
    optim: str = _help("adamw8bit | adamw (SIFT's moments; for full: bitsandbytes AdamW8bit or torch AdamW)", default="adamw8bit")
    step_in_backward: bool = _help("update inside backward hooks (no accumulation, no clipping)", default=False)
    lora_rank: int = _help("LoRA rank", default=8)
    lora_alpha: int = _help("LoRA alpha", default=16)
    lora_dropout: float = _help("LoRA dropout", default=0.0)
    quantization: str = _help("none | nf4 | fp4: the target linears' base held in bitsandbytes 4 bits "
                              "(QSIFT with sift, QLoRA with lora)", default="none")
    double_quant: bool = _help("with --quantization: quantize the 4-bit scales too (--no_double_quant: off)",
                               default=True)


@dataclass
class DataArguments:
    data_path: str = _help("Alpaca / ShareGPT / unified JSON(L) file or hub dataset id", default=DEFAULT_DATA)
    template: str = _help("auto | chat (tokenizer chat template) | alpaca (Stanford Alpaca prompt)", default="auto")
    model_max_length: int = _help("tokens per sample; longer conversations keep whole rounds", default=256)
    eval_samples: int = _help("held-out samples for the before/after loss (taken from the data)", default=32)
    max_train_samples: int = _help("use at most this many training samples (0 = all)", default=0)
    strict: bool = _help("fail on the first malformed record instead of skipping and counting", default=False)


@dataclass
class TrainArguments:
    output_dir: str = _help("where the increment, merged model, checkpoints and logs go", default="outputs/sift-smollm2")
    overwrite_output_dir: bool = _help("allow writing into a directory that holds another run", default=False)
    num_train_epochs: float = _help("epochs (ignored when max_steps > 0)", default=1.0)
    max_steps: int | None = _help("optimizer steps; > 0 overrides num_train_epochs (unset: "
                                     f"{DEMO_STEPS} for the embedded demo model, else epochs)", default=None)
    per_device_train_batch_size: int = _help("micro-batch size", default=4)
    per_device_eval_batch_size: int = _help("batch size of the held-out loss", default=8)
    gradient_accumulation_steps: int = _help("micro-batches per optimizer step", default=2)
    learning_rate: float = _help("peak learning rate", default=2e-4)
    weight_decay: float = _help("decoupled weight decay", default=0.0)
    warmup_ratio: float = _help("fraction of steps of linear warm-up", default=0.1)
    lr_scheduler_type: str = _help("transformers scheduler name (cosine, linear, constant, ...)", default="cosine")
    max_grad_norm: float = _help("global L2 clipping; 0 = off", default=1.0)
    bf16: bool = _help("bf16 weights (fp32 masters keep the updates); default on CUDA", default=False)
    gradient_checkpointing: bool = _help("recompute activations in backward", default=False)
    logging_steps: int = _help("log every N steps", default=2)
    save_steps: int = _help("checkpoint every N steps (0 = only at the end)", default=0)
    save_total_limit: int = _help("keep at most N checkpoints (0 = all)", default=2)
    seed: int = _help("seed of data order, selection and init", default=42)
    resume_from_checkpoint: str | None = _help("a checkpoint directory, or 'latest' in output_dir", default=None)
    report_to: str = _help("none | tensorboard | wandb (comma-separated)", default="none")
    deepspeed: str | None = _help("DeepSpeed JSON config (launch with `deepspeed train_sft.py ...`)", default=None)
    local_rank: int = _help("set by the deepspeed launcher", default=-1)
    generate_tokens: int = _help("tokens of the before/after sample generation (0 = skip)", default=48)


def use_bf16(t: TrainArguments) -> bool:
    import torch

    return t.bf16 or torch.cuda.is_available()


def total_steps(m: ModelArguments, t: TrainArguments, micro_batches_per_epoch: int) -> int:
    if t.max_steps is None and m.model_name_or_path in (None, "", EMBEDDED):
        return DEMO_STEPS
    if t.max_steps and t.max_steps > 0:
        return t.max_steps
    return max(1, round(t.num_train_epochs * micro_batches_per_epoch / t.gradient_accumulation_steps))


def split_list(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def parse(argv=None) -> tuple[ModelArguments, DataArguments, TrainArguments]:
    """CLI flags, or a single .yaml/.json file of them (flags after the file override it)."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser((ModelArguments, DataArguments, TrainArguments))
    argv = list(sys.argv[1:] if argv is None else argv)
    launcher = [a for a in argv if a.startswith("--local_rank=")]  # the deepspeed launcher's, first
    argv = [a for a in argv if a not in launcher]
    if argv and argv[0].endswith((".yaml", ".yml", ".json")) and not argv[0].startswith("-"):
        import yaml  # JSON is YAML

        with open(argv[0]) as f:
            values = yaml.safe_load(f) or {}
        known = {f.name for dc in (ModelArguments, DataArguments, TrainArguments) for f in fields(dc)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SystemExit(f"{argv[0]}: unknown option(s) {', '.join(unknown)}")
        flags = []
        for key, value in values.items():
            flags += [f"--{key}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
        argv = flags + argv[1:]
    return tuple(parser.parse_args_into_dataclasses(args=argv + launcher))


def problems(m: ModelArguments, d: DataArguments, t: TrainArguments) -> list[str]:
    """Everything wrong with the options, checked before any weight is loaded."""
    out = []
    if m.finetuning_type not in FINETUNING_TYPES:
        out.append(f"--finetuning_type {m.finetuning_type}: choose one of {', '.join(FINETUNING_TYPES)}")
    if m.optim not in OPTIMIZERS:
        out.append(f"--optim {m.optim}: choose one of {', '.join(OPTIMIZERS)}")
    if m.finetuning_type == "sift":
        if not 0 < m.sift_rate <= 1:
            out.append(f"--sift_rate {m.sift_rate}: must be in (0, 1], e.g. 0.05")
        if m.sift_selection not in SELECTIONS:
            out.append(f"--sift_selection {m.sift_selection}: choose one of {', '.join(SELECTIONS)}")
        if not split_list(m.sift_targets) and not split_list(m.sift_dense):
            out.append("--sift_targets and --sift_dense are both empty")
    if m.step_in_backward:
        if m.finetuning_type != "sift":
            out.append("--step_in_backward needs --finetuning_type sift")
        if t.gradient_accumulation_steps != 1:
            out.append(f"--step_in_backward cannot accumulate gradients: set --gradient_accumulation_steps 1 "
                       f"(got {t.gradient_accumulation_steps})")
        if t.max_grad_norm:
            out.append(f"--step_in_backward cannot clip by the global norm: set --max_grad_norm 0 (got {t.max_grad_norm})")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "logging_steps"):
        if getattr(t, name) < 1:
            out.append(f"--{name} {getattr(t, name)}: must be >= 1")
    if (t.max_steps or 0) <= 0 and t.num_train_epochs <= 0:
        out.append("set --max_steps > 0 or --num_train_epochs > 0")
    if not 0 <= t.warmup_ratio < 1:
        out.append(f"--warmup_ratio {t.warmup_ratio}: must be in [0, 1)")
    if d.template not in ("auto", "chat", "alpaca"):
        out.append(f"--template {d.template}: choose auto, chat or alpaca")
    if d.model_max_length < 16:
        out.append(f"--model_max_length {d.model_max_length}: too short to hold a prompt and an answer")
    if not os.path.exists(d.data_path) and ("/" not in d.data_path or d.data_path.endswith((".json", ".jsonl"))):
        out.append(f"--data_path {d.data_path}: no such file (a hub dataset is written owner/name)")
    if m.model_name_or_path and not os.path.isdir(m.model_name_or_path) and (
            m.model_name_or_path.startswith((".", "/", "~")) or m.model_name_or_path.count("/") != 1):
        out.append(f"--model_name_or_path {m.model_name_or_path}: no such directory (a hub id is written owner/name)")
    for backend in split_list(t.report_to):
        module = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(backend)
        if backend != "none" and module is None:
            out.append(f"--report_to {backend}: choose none, tensorboard or wandb")
        elif module and importlib.util.find_spec(module) is None:
            out.append(f"--report_to {backend}: the package is not installed (pip install {module})")
    if t.deepspeed and not os.path.isfile(t.deepspeed):
        out.append(f"--deepspeed {t.deepspeed}: no such config file")
    elif t.deepspeed:
        from .ds import resolve_config

        out += resolve_config(t.deepspeed, m, t, use_bf16(t))[1]
    from .quantized import problems as quantization_problems

    out += quantization_problems(m, t)
    out += _output_dir_problems(t)
    return out


def check_targets(model_path: str, m: ModelArguments) -> None:
    """Unknown target modules fail here, on a weightless meta-device model built from the config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sift.targets import find_trainable

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    dense = split_list(m.sift_dense) if m.finetuning_type == "sift" else ()
    if m.finetuning_type != "full":
        try:
            find_trainable(skeleton, split_list(m.sift_targets), dense)
        except ValueError as e:
            sys.exit(f"train_sft.py: invalid options:\n  - --sift_targets/--sift_dense: {e}")


def _output_dir_problems(t: TrainArguments) -> list[str]:
    from .checkpoint import find_checkpoint

    if t.resume_from_checkpoint:
        try:
            find_checkpoint(t.output_dir, t.resume_from_checkpoint)
        except FileNotFoundError as e:
            return [f"--resume_from_checkpoint {t.resume_from_checkpoint}: {e}"]
        return []
    if os.path.isdir(t.output_dir) and not t.overwrite_output_dir:
        marks = [n for n in os.listdir(t.output_dir)
                 if n in ("args.json", "train_log.jsonl", "sift_increment.safetensors") or n.startswith("checkpoint-")]
        if marks:
            return [f"--output_dir {t.output_dir} holds another run ({', '.join(sorted(marks)[:3])}): pass "
                    "--overwrite_output_dir, --resume_from_checkpoint latest, or another directory"]
    return []
