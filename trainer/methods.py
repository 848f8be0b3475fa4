"""The fine-tuning methods behind one interface, and the registry of what each one supports.

    cls = method_class(args)             # Sift | Full | Lora, or the 4-bit forms QSift | QLora
    cls.settle(args)                     # what its flags imply where the user left them unset (said in lines)
    cls.problems(args, deepspeed)        # its rules, in flag names (trainer.validate collects them)
    cls.ignored(args)                    # a warning per flag the user set that this method does not read
    model = cls.load(path, args, dtype, device)     # the weights as this method trains them
    method = build(model, args)          # cls(model, args); method.model may be wrapped (LoRA)
    loss.backward(); method.step()       # clip, step, clear; returns the global grad norm
    method.skipped_steps(), .communicated_bytes(), .memory_report()   # what the loop logs
    method.save_payload(dir, base, main) / method.load_payload(dir)   # checkpoint files
    method.save_final(output_dir, tokenizer, base, main)              # what a finished run leaves
Every rank calls save_payload / save_final (their gathers of a sharded run are collectives); the
files are written where `main` (and a sharded run's own state by each rank).

sift: SIFT (clipping inside its step); leaves the increment and merged/.
full: every weight, torch AdamW or bitsandbytes AdamW8bit / AdamW32bit; leaves merged/.
lora: PEFT LoRA on the same target modules, AdamW over the adapters; leaves adapter/ and merged/.
With --quantization the target linears' base is 4-bit: QSIFT (sift) and QLoRA (lora); full has no
4-bit form (a 4-bit base is frozen).

A method declares what it supports and reads in its `rules` (a `Rules`); `Method.problems` turns
each refusal into one line, `Method.ignored` each flag set for another method into a warning. A new capability is a field of `Rules` plus its check in `Method.problems`; a rule
only one method has goes into that method's `problems` (calling the base's).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import ClassVar

import torch
from safetensors.torch import load_file, save_file

from common.atomic import atomic_dir
from common.modeling import load_model
from sift import SIFT, SIFTConfig, save_increment
from sift.config import OPTIMIZERS
from sift.increment import FILENAME

from . import ds, quantized
from .args import Arguments, TrainArguments, split_list, world_size

OPTIMIZER_FILE, TRAINABLE_FILE = "optimizer.pt", "trainable.safetensors"
ADAPTER_DIR, MERGED_DIR = "adapter", "merged"
# SIFTConfig field -> the flag that sets it
SIFT_FLAGS = {"rate": "sift_rate", "targets": "sift_targets", "dense": "sift_dense", "selection": "sift_selection",
              "optimizer": "optim", "lr": "learning_rate", "weight_decay": "weight_decay",
              "max_grad_norm": "max_grad_norm", "step_in_backward": "step_in_backward", "seed": "seed",
              "regrow_steps": "sift_regrow_steps", "regrow_fraction": "sift_regrow_fraction",
              "regrow_window": "sift_regrow_window"}
# SIFTConfig's rules that hold for every method (an optimizer step is an AdamW step in all three)
ADAMW_FIELDS = ("lr", "weight_decay", "max_grad_norm", "betas", "eps")
# The flags of one method or another (Rules.reads): the rest of the options are every method's
SIFT_READS = ("sift_rate", "sift_targets", "sift_dense", "sift_selection", "optim", "step_in_backward",
              "sift_regrow_steps", "sift_regrow_fraction", "sift_regrow_window")
LORA_READS = ("sift_targets", "optim", "lora_rank", "lora_alpha", "lora_dropout")
FOUR_BIT_READS = ("double_quant",)
# SIFTConfig's wording -> the flags' (None = off is 0 on the command line)
_FLAG_WORDS = {"max_grad_norm=None": "--max_grad_norm 0", "step_in_backward=False": "no --step_in_backward",
               "or None to disable": "or 0 to disable", "regrow_steps = ": "--sift_regrow_steps ",
               "regrow_steps=0": "--sift_regrow_steps 0",
               "rate < 1, or": "--sift_rate < 1, or"}


@dataclass(frozen=True)
class Rules:
    """What a method supports and refuses, declared once per method class."""
    optimizers: tuple[str, ...]                  # the --optim values it takes
    config_fields: tuple[str, ...] = ADAMW_FIELDS  # SIFTConfig fields whose rules apply (in flag names)
    zero: tuple[int, ...] = ()                   # the ZeRO stages it runs under, on any ranks; (): no DeepSpeed
    step_in_backward: bool = False               # may step inside backward (--step_in_backward)
    refuses: tuple[tuple[str, str], ...] = ()    # (flag, the line printed when that flag is set)
    reads: tuple[str, ...] = ()                  # the method-specific flags it reads (one set for another: a warning)


def sift_fields(args: Arguments) -> dict:
    """SIFTConfig's fields as the flags set them (the CLI's 0 = no clipping is SIFTConfig's None)."""
    method, train = args.method, args.train
    return dict(rate=method.sift_rate, targets=split_list(method.sift_targets), dense=split_list(method.sift_dense),
                selection=method.sift_selection, optimizer=method.optim, lr=train.learning_rate,
                weight_decay=train.weight_decay, max_grad_norm=train.max_grad_norm or None,
                step_in_backward=method.step_in_backward, seed=train.seed, regrow_steps=method.sift_regrow_steps,
                regrow_fraction=method.sift_regrow_fraction, regrow_window=method.sift_regrow_window)


def sift_config(args: Arguments) -> SIFTConfig:
    """The SIFT configuration the flags describe (the validator has reported its problems already)."""
    return SIFTConfig(**sift_fields(args))


def config_problems(args: Arguments, names: tuple[str, ...]) -> list[str]:
    """SIFTConfig's rules for the fields `names`, in flag names: SIFTConfig is where they are written."""
    cfg = object.__new__(SIFTConfig)  # unchecked: __post_init__ would raise on the first problem
    cfg.__dict__.update(SIFTConfig().__dict__, **sift_fields(args))
    out = []
    for name, message in cfg.problems():
        if name not in names:
            continue
        flag = SIFT_FLAGS.get(name, name)
        for theirs, ours in _FLAG_WORDS.items():
            message = message.replace(theirs, ours)
        out.append(f"--{flag} {args.value(flag)}: {message}" if name != "step_in_backward" else f"--{flag}: {message}")
    return out


class Method:
    """What the loop and the benchmarks need of a method; subclasses declare `rules` and fill in the
    optimizer."""
    name: ClassVar[str]    # its --finetuning_type
    title: ClassVar[str]   # its name in messages
    rules: ClassVar[Rules]

    def __init__(self, model, args: Arguments):
        self.model, self.args = model, args
        self.opt: torch.optim.Optimizer

    # ---------------------------------------------------------------- the rules
    @classmethod
    def settle(cls, args: Arguments) -> list[str]:
        """Give the flags the user left unset the values this method's chosen mode needs (in place);
        one line saying so. --step_in_backward steps each tensor inside backward, so it needs one
        micro-batch per step and no global clipping; given values stay, for `problems` to refuse."""
        if not (args.method.step_in_backward and cls.rules.step_in_backward):
            return []
        train, implied = args.train, []
        if not args.is_set("gradient_accumulation_steps"):
            train.gradient_accumulation_steps = 1
            implied.append("--gradient_accumulation_steps 1")
        if not args.is_set("max_grad_norm"):
            train.max_grad_norm = 0.0
            implied.append("--max_grad_norm 0 (no clipping)")
        return [f"--step_in_backward: using {' and '.join(implied)}, which it needs"] if implied else []

    @classmethod
    def ignored(cls, args: Arguments) -> list[str]:
        """A warning per flag the user set that this method does not read, though another one does
        (`Rules.reads`); flags it refuses are `problems`' to report."""
        rules, every = cls.rules, (*METHODS.values(), *FOUR_BIT.values())
        refused = {flag for flag, _ in rules.refuses} | ({"step_in_backward"} if not rules.step_in_backward else set())
        out = []
        for flag in dict.fromkeys(f for m in every for f in m.rules.reads):
            if args.is_set(flag) and flag not in rules.reads and flag not in refused:
                readers = ", ".join(dict.fromkeys(m.title for m in every if flag in m.rules.reads))
                out.append(f"warning: --{flag} {args.value(flag)} is ignored: {cls.title} (--finetuning_type "
                           f"{args.method.finetuning_type}) does not read it; {readers} do")
        return out

    @classmethod
    def problems(cls, args: Arguments, deepspeed: dict | None = None) -> list[str]:
        """Every option this method refuses, given the resolved DeepSpeed config (None: no DeepSpeed)."""
        rules, method = cls.rules, args.method
        out = config_problems(args, rules.config_fields)
        if method.optim not in rules.optimizers:
            out.append(f"--optim {method.optim}: choose one of {', '.join(rules.optimizers)} for "
                       f"--finetuning_type {cls.name}")
        if method.step_in_backward and not rules.step_in_backward:
            able = [m.name for m in METHODS.values() if m.rules.step_in_backward]
            out.append(f"--step_in_backward needs --finetuning_type {' or '.join(able)}")
        if method.step_in_backward and args.train.gradient_accumulation_steps != 1:
            out.append("--step_in_backward cannot accumulate gradients: set --gradient_accumulation_steps 1 "
                       f"(got {args.train.gradient_accumulation_steps})")
        if method.sift_regrow_steps and "sift_regrow_steps" not in rules.reads:
            out.append(f"--sift_regrow_steps {method.sift_regrow_steps}: drop and regrow moves SIFT's trained entries; "
                       f"{cls.title} (--finetuning_type {cls.name}) has none: use --finetuning_type sift")
        out += [line for flag, line in rules.refuses if args.is_set(flag)]
        if deepspeed is not None:
            out += cls.deepspeed_problems(args, deepspeed)
        return out

    @classmethod
    def deepspeed_problems(cls, args: Arguments, deepspeed: dict) -> list[str]:
        """The line for a ZeRO stage this method does not run under (`rules.zero`); a stage DeepSpeed
        does not have is trainer.ds's to report."""
        stage, zero = deepspeed["zero_optimization"].get("stage", 0), cls.rules.zero
        if not zero:
            able = [m.title for m in METHODS.values() if m.rules.zero]
            return [f"--deepspeed runs {' or '.join(able)} only; run the {cls.name} baseline without --deepspeed"]
        if stage not in ds.STAGES or stage in zero:
            return []
        return [f"--deepspeed {args.train.deepspeed}: {cls.title} runs under ZeRO stages "
                f"{', '.join(map(str, zero))}, not {stage}"]

    @classmethod
    def trained_names(cls, skeleton, args: Arguments) -> set[str]:
        """Names of the parameters of `skeleton` (the model built on the meta device) this method
        trains; a ValueError lists the targets that match nothing."""
        raise NotImplementedError

    @classmethod
    def load(cls, model_path: str, args: Arguments, dtype: torch.dtype, device: str):
        """The model as this method trains it, on `device`."""
        return load_model(model_path, dtype=dtype, device=device)

    def plan(self, total_steps: int) -> None:
        """The run's length in optimizer steps, known once the data is (SIFT's regrow decays over it)."""

    # ---------------------------------------------------------------- the step
    def step(self) -> float:
        """Clip by the global norm (0 = off), step, clear the gradients; returns the norm."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = float(torch.nn.utils.clip_grad_norm_(params, self.args.train.max_grad_norm or float("inf")))  # host sync
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return norm

    def skipped_steps(self) -> int | None:
        """Steps skipped for non-finite gradients so far, the same on every rank (None: this method
        does not skip)."""
        return None

    def communicated_bytes(self) -> int:
        """Bytes this method's own collectives have sent so far (its gradient all-reduce)."""
        return 0

    # ---------------------------------------------------------------- what the benchmarks count
    def grad_tensors(self) -> list[torch.Tensor]:
        """Gradients alive between backward and step."""
        return [p.grad for p in self.model.parameters() if p.grad is not None]

    def state_tensors(self) -> list[torch.Tensor]:
        """Optimizer state (moments, step counters, 8-bit scales)."""
        return [v for st in self.opt.state.values() for v in st.values() if torch.is_tensor(v)]

    def host_tensors(self) -> list[torch.Tensor]:
        """State a GPU run keeps in host RAM."""
        return []

    def trained_entries(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.model.parameters() if p.requires_grad}.values())

    def memory_report(self) -> dict | None:
        return None

    def close(self) -> None:
        """Detach from the model (hooks)."""

    # ---------------------------------------------------------------- files
    def save_payload(self, directory: str, base_model: str, main: bool = True) -> None:
        """Checkpoint files: the optimizer state and the trained tensors."""
        if not main:
            return
        torch.save(self.opt.state_dict(), os.path.join(directory, OPTIMIZER_FILE))
        save_file({n: p.detach().cpu().contiguous() for n, p in self.model.named_parameters() if p.requires_grad},
                  os.path.join(directory, TRAINABLE_FILE))

    @torch.no_grad()
    def load_payload(self, directory: str) -> None:
        params = dict(self.model.named_parameters())
        for name, value in load_file(os.path.join(directory, TRAINABLE_FILE)).items():
            params[name].copy_(value)
        self.opt.load_state_dict(torch.load(os.path.join(directory, OPTIMIZER_FILE), weights_only=True))

    def save_final(self, output_dir: str, tokenizer, base_model: str, main: bool = True) -> list[str]:
        """What a finished run leaves (the merged model here); returns the paths written."""
        merged = self.merged_model(base_model)
        state = ds.full_state_dict(merged, main)  # ZeRO-3: gathered one weight at a time
        if not main:
            return []
        return [save_merged(merged, tokenizer, os.path.join(output_dir, MERGED_DIR), state)]

    def merged_model(self, base_model: str):
        """The fine-tuned model as a plain transformers model (SIFT wrote its values in place)."""
        return self.model


class Sift(Method):
    """SIFT: its hooks reduce each target's gradient to the selected entries inside backward."""
    name, title = "sift", "SIFT"
    rules = Rules(optimizers=OPTIMIZERS, step_in_backward=True, reads=SIFT_READS,
                  # --optim is checked against `optimizers` for every method
                  config_fields=tuple(f.name for f in dataclasses.fields(SIFTConfig) if f.name != "optimizer"),
                  zero=ds.STAGES)

    def __init__(self, model, args):
        super().__init__(model, args)
        self.opt = SIFT(model, sift_config(args))

    @classmethod
    def trained_names(cls, skeleton, args):
        from sift.targets import find_trainable

        cfg = sift_fields(args)
        sparse, dense = find_trainable(skeleton, cfg["targets"], cfg["dense"])
        return {n for n, _ in sparse + dense}

    @classmethod
    def deepspeed_problems(cls, args, deepspeed):
        """Also a regrow under ZeRO-3 on several ranks: a rank's slice has a bank sized at selection."""
        out = super().deepspeed_problems(args, deepspeed)
        steps = args.method.sift_regrow_steps
        if steps and deepspeed["zero_optimization"].get("stage", 0) == 3 and world_size() > 1:
            out.append(f"--sift_regrow_steps {steps}: drop and regrow is not built for ZeRO-3 on several ranks "
                       f"(--deepspeed {args.train.deepspeed}); use ds_configs/zero2.json or --sift_regrow_steps 0")
        return out

    @classmethod
    def settle(cls, args):
        """Also a regrow more often than the default window: the window, unset, shrinks to the interval
        (it ends at a regrow and starts after the one before)."""
        out, method = super().settle(args), args.method
        steps, window = method.sift_regrow_steps, method.sift_regrow_window
        if isinstance(steps, int) and 0 < steps < window and not args.is_set("sift_regrow_window"):
            method.sift_regrow_window = steps
            out.append(f"--sift_regrow_steps {steps}: using --sift_regrow_window {steps} (a window is at most the "
                       "steps between two regrows)")
        return out

    @classmethod
    def ignored(cls, args):
        """Also the regrow's share and window given while the regrow is off (--sift_regrow_steps 0)."""
        out = super().ignored(args)
        if not args.method.sift_regrow_steps:
            out += [f"warning: --{flag} {args.value(flag)} is ignored: the regrow is off (--sift_regrow_steps 0)"
                    for flag in ("sift_regrow_fraction", "sift_regrow_window") if args.is_set(flag)]
        return out

    def plan(self, total_steps):
        self.opt.plan_regrow(total_steps)

    def step(self) -> float:
        self.opt.step()  # clips by the global norm of its sparse gradients itself
        self.opt.zero_grad(set_to_none=True)
        return self.opt.last_grad_norm

    def skipped_steps(self):
        return self.opt.skipped_steps

    def communicated_bytes(self):
        return self.opt.comm_bytes

    def grad_tensors(self):
        return self.opt.grad_tensors()

    def state_tensors(self):
        return self.opt.state_tensors()

    def host_tensors(self):
        return self.opt.host_tensors()

    def trained_entries(self):
        return self.opt.trained_entries()

    def memory_report(self):
        return self.opt.memory_report()

    def close(self):
        self.opt.remove_hooks()

    def state_file(self) -> str:
        """The checkpoint file of this rank's SIFT state: one for every rank, or (ZeRO-3 on several
        ranks) one per rank, holding its slices."""
        rank, ranks = self.opt.shards()
        return OPTIMIZER_FILE if ranks == 1 else f"optimizer.rank{rank}-of-{ranks}.pt"

    def save_payload(self, directory, base_model, main=True):
        # the optimizer state holds the trained values; the increment beside it is for people. The
        # collectives (ZeRO-3 gathers) come before any write, so that a rank whose write fails is in none
        # the others wait in (Recipe.agree)
        parts = self.increment_parts(main)
        rank, ranks = self.opt.shards()
        if main or ranks > 1:
            torch.save(self.opt.state_dict(), os.path.join(directory, self.state_file()))
        if main:
            self.write_increment(parts, os.path.join(directory, FILENAME), base_model)

    def load_payload(self, directory):
        path = os.path.join(directory, self.state_file())
        if not os.path.isfile(path):
            saved = sorted(n for n in os.listdir(directory) if n.startswith("optimizer"))
            raise ValueError(f"it holds {', '.join(saved) or 'no SIFT state'}, not {self.state_file()}: it was "
                             "written under another DeepSpeed layout (ZeRO-3 shards SIFT's state per rank); "
                             "resume with the launch that wrote it")
        self.opt.load_state_dict(torch.load(path, weights_only=True))

    def save_final(self, output_dir, tokenizer, base_model, main=True):
        parts = self.increment_parts(main)
        written = super().save_final(output_dir, tokenizer, base_model, main)  # values are in place; gathers first
        if not main:
            return []
        path = os.path.join(output_dir, FILENAME)
        self.write_increment(parts, path, base_model)
        return [path] + written

    def increment_parts(self, main: bool):
        """What the increment is written from, whole in the main process (a collective: every rank calls it)."""
        return self.opt.gathered(keep=main)

    def write_increment(self, parts, path: str, base_model: str) -> None:
        save_increment(parts, path, base_model=base_model)


class QSift(Sift):
    """QSIFT: SIFT on a 4-bit base; the trained deltas and their indices live in the target linears
    (QSIFTLinear), which SIFT trains as dense fp32 parameters."""
    title = "QSIFT"
    rules = dataclasses.replace(
        Sift.rules, reads=SIFT_READS + FOUR_BIT_READS,
        refuses=(("sift_dense", "--sift_dense is not supported with --quantization (only the target linears' "
                                "deltas train)"),))

    @classmethod
    def load(cls, model_path, args, dtype, device):
        model = quantized.load(model_path, args, dtype, device, qsift=True)
        quantized.attach_deltas(model, args)
        return model

    def load_payload(self, directory):
        quantized.load_payload(directory, self.model, FILENAME)  # the indices are module buffers: restored first
        super().load_payload(directory)

    def increment_parts(self, main):
        return quantized.increment_tensors(self.model, keep=main)  # every rank: ZeRO-3 gathers

    def write_increment(self, parts, path, base_model):
        quantized.save_increment(self.model, path, self.args.method, base_model, parts)

    def save_final(self, output_dir, tokenizer, base_model, main=True):
        parts = self.increment_parts(main)
        if not main:
            return []
        path = os.path.join(output_dir, FILENAME)
        self.write_increment(parts, path, base_model)
        merged = quantized.merged_qsift(self.model, base_model, parts[0])  # the full-precision base + the deltas
        return [path, save_merged(merged, tokenizer, os.path.join(output_dir, MERGED_DIR))]


class Full(Method):
    """Every weight trained (a baseline)."""
    name, title = "full", "full fine-tuning"
    rules = Rules(optimizers=("adamw", "adamw8bit", "adamw32bit"), reads=("optim",))  # torch AdamW, bitsandbytes 8-bit / fp32

    def __init__(self, model, args):
        super().__init__(model, args)
        model.requires_grad_(True)
        self.opt = _adamw(args.method.optim, list(model.parameters()), args.train)

    @classmethod
    def trained_names(cls, skeleton, args):
        return {n for n, _ in skeleton.named_parameters()}


class Lora(Method):
    """PEFT LoRA on the target modules (a baseline); the model comes back wrapped."""
    name, title = "lora", "LoRA"
    rules = dataclasses.replace(Full.rules, reads=LORA_READS)

    def __init__(self, model, args):
        from peft import LoraConfig, get_peft_model

        method = args.method
        torch.manual_seed(args.train.seed)  # LoRA's A matrices are random
        cfg = LoraConfig(r=method.lora_rank, lora_alpha=method.lora_alpha, lora_dropout=method.lora_dropout,
                         target_modules=list(split_list(method.sift_targets)), task_type="CAUSAL_LM")
        super().__init__(get_peft_model(model, cfg), args)
        self.opt = _adamw(method.optim, [p for p in self.model.parameters() if p.requires_grad], args.train)

    @classmethod
    def problems(cls, args, deepspeed=None):
        method, out = args.method, super().problems(args, deepspeed)
        if method.lora_rank < 1:
            out.append(f"--lora_rank {method.lora_rank}: must be >= 1")
        if method.lora_alpha <= 0:
            out.append(f"--lora_alpha {method.lora_alpha}: must be > 0 (the adapters' scale is alpha / rank)")
        if not 0 <= method.lora_dropout < 1:
            out.append(f"--lora_dropout {method.lora_dropout}: must be in [0, 1)")
        return out

    @classmethod
    def trained_names(cls, skeleton, args):
        from sift.targets import find_trainable

        find_trainable(skeleton, split_list(args.method.sift_targets), ())  # the adapted modules exist
        return set()  # the adapters are new parameters; every weight of the model stays frozen

    def save_final(self, output_dir, tokenizer, base_model, main=True):
        adapter = os.path.join(output_dir, ADAPTER_DIR)
        self.model.peft_config["default"].base_model_name_or_path = base_model  # the id, not this machine's cache path
        with atomic_dir(adapter, prefix=".adapter-") as tmp:  # before merging: merge_and_unload folds it in
            self.model.save_pretrained(tmp, save_embedding_layers=False)  # the vocabulary never changes: no hub check
        return [adapter] + super().save_final(output_dir, tokenizer, base_model, main)

    def merged_model(self, base_model):
        return self.model.merge_and_unload()


class QLora(Lora):
    """QLoRA: LoRA on a 4-bit base (bitsandbytes Linear4bit target linears)."""
    title = "QLoRA"
    rules = dataclasses.replace(Lora.rules, reads=LORA_READS + FOUR_BIT_READS)

    @classmethod
    def load(cls, model_path, args, dtype, device):
        return quantized.load(model_path, args, dtype, device, qsift=False)

    def merged_model(self, base_model):
        return quantized.merged_qlora(self.model, base_model)


METHODS: dict[str, type[Method]] = {m.name: m for m in (Sift, Full, Lora)}  # the --finetuning_type choices
FOUR_BIT: dict[str, type[Method]] = {"sift": QSift, "lora": QLora}  # each method's form on a 4-bit base


def lookup(args: Arguments) -> tuple[type[Method] | None, list[str]]:
    """(the method class the options name, or None; why none)."""
    kind, four_bit = args.method.finetuning_type, quantized.enabled(args.model)
    if kind not in METHODS:
        return None, [f"--finetuning_type {kind}: choose one of {', '.join(METHODS)}"]
    if not four_bit:
        return METHODS[kind], []
    if kind not in FOUR_BIT:
        able = " or ".join(f"{name} ({cls.title})" for name, cls in FOUR_BIT.items())
        return None, [f"--quantization needs --finetuning_type {able}: a 4-bit base is frozen"]
    return FOUR_BIT[kind], []


def flag_choices() -> dict[str, tuple[str, ...]]:
    """The choice lists of the flags this registry owns, for --help (trainer.args.parser)."""
    optimizers = dict.fromkeys(o for m in METHODS.values() for o in m.rules.optimizers)
    return {"finetuning_type": tuple(METHODS), "optim": tuple(optimizers)}


def method_class(args: Arguments) -> type[Method]:
    """The method class of valid options (see `lookup`)."""
    cls, problems = lookup(args)
    if cls is None:
        raise ValueError("; ".join(problems))
    return cls


def build(model, args: Arguments) -> Method:
    return method_class(args)(model, args)


def _adamw(name: str, params: list, train: TrainArguments) -> torch.optim.Optimizer:
    """torch AdamW (moments in the weights' dtype) or bitsandbytes AdamW with 8-bit / fp32 moments."""
    if name in ("adamw8bit", "adamw32bit"):
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit if name == "adamw8bit" else bnb.optim.AdamW32bit
        return cls(params, lr=train.learning_rate, weight_decay=train.weight_decay)
    return torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay)


def save_merged(model, tokenizer, target: str, state: dict | None = None) -> str:
    """save_pretrained (of `state` when given: a ZeRO-3 model's gathered tensors) + tokenizer into a
    temp directory, then renamed into place (0644 files)."""
    with atomic_dir(target, prefix=".merged-") as tmp:
        model.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
    return target
