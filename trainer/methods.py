"""The three fine-tuning methods behind one interface, for the trainer and the benchmarks alike.

    method = build(model, args)          # Sift | Full | Lora (args: trainer.args.Arguments);
                                         # method.model may be wrapped (LoRA)
    loss.backward(); method.step()       # clip, step, clear; returns the global grad norm
    method.save_payload(dir, base) / method.load_payload(dir)    # checkpoint files
    method.save_final(output_dir, tokenizer, base)               # what a finished run leaves

sift: SIFT (clipping inside its step); leaves the increment and merged/.
full: every weight, torch AdamW or bitsandbytes AdamW8bit / AdamW32bit; leaves merged/.
lora: PEFT LoRA on the same target modules, AdamW over the adapters; leaves adapter/ and merged/.
"""
from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file

from common.atomic import atomic_dir
from sift import SIFT, SIFTConfig, save_increment
from sift.increment import FILENAME

from . import quantized
from .args import Arguments, TrainArguments, sift_fields, split_list

OPTIMIZER_FILE, TRAINABLE_FILE = "optimizer.pt", "trainable.safetensors"
ADAPTER_DIR, MERGED_DIR = "adapter", "merged"


def sift_config(args: Arguments) -> SIFTConfig:
    """The SIFT configuration the flags describe (the CLI has reported its problems already)."""
    return SIFTConfig(**sift_fields(args))


class Method:
    """What the loop and the benchmarks need of a method; subclasses fill in the optimizer."""

    def __init__(self, model, args: Arguments):
        self.model, self.args = model, args
        self.opt: torch.optim.Optimizer

    # ---------------------------------------------------------------- the step
    def step(self) -> float:
        """Clip by the global norm (0 = off), step, clear the gradients; returns the norm."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = float(torch.nn.utils.clip_grad_norm_(params, self.args.train.max_grad_norm or float("inf")))  # host sync
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return norm

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
    def save_payload(self, directory: str, base_model: str) -> None:
        """Checkpoint files: the optimizer state and the trained tensors."""
        torch.save(self.opt.state_dict(), os.path.join(directory, OPTIMIZER_FILE))
        save_file({n: p.detach().cpu().contiguous() for n, p in self.model.named_parameters() if p.requires_grad},
                  os.path.join(directory, TRAINABLE_FILE))

    @torch.no_grad()
    def load_payload(self, directory: str) -> None:
        params = dict(self.model.named_parameters())
        for name, value in load_file(os.path.join(directory, TRAINABLE_FILE)).items():
            params[name].copy_(value)
        self.opt.load_state_dict(torch.load(os.path.join(directory, OPTIMIZER_FILE), weights_only=True))

    def save_final(self, output_dir: str, tokenizer, base_model: str) -> list[str]:
        """What a finished run leaves (the merged model here); returns the paths written."""
        return [save_merged(self.merged_model(base_model), tokenizer, os.path.join(output_dir, MERGED_DIR))]

    def merged_model(self, base_model: str):
        """The fine-tuned model as a plain transformers model (SIFT wrote its values in place); on a
        4-bit base, the full-precision base plus what was trained."""
        if quantized.enabled(self.args.model):
            return quantized.merged_full_model(self.model, self.args.method, base_model)
        return self.model


class Sift(Method):
    """SIFT: its hooks reduce each target's gradient to the selected entries inside backward."""

    def __init__(self, model, args):
        super().__init__(model, args)
        self.opt = SIFT(model, sift_config(args))

    def step(self) -> float:
        self.opt.step()  # clips by the global norm of its sparse gradients itself
        self.opt.zero_grad(set_to_none=True)
        return self.opt.last_grad_norm

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

    def save_payload(self, directory, base_model):
        # the optimizer state holds the trained values; the increment beside it is for people
        torch.save(self.opt.state_dict(), os.path.join(directory, OPTIMIZER_FILE))
        self._save_increment(os.path.join(directory, FILENAME), base_model)

    def load_payload(self, directory):
        if quantized.is_quantized(self.model):  # QSIFT's indices are module buffers: restored first
            quantized.load_payload(directory, self.model, FILENAME)
        self.opt.load_state_dict(torch.load(os.path.join(directory, OPTIMIZER_FILE), weights_only=True))

    def save_final(self, output_dir, tokenizer, base_model):
        path = os.path.join(output_dir, FILENAME)
        self._save_increment(path, base_model)
        return [path] + super().save_final(output_dir, tokenizer, base_model)  # SIFT wrote its values in place

    def _save_increment(self, path, base_model):
        if quantized.is_quantized(self.model):  # QSIFT: the deltas and indices live in the 4-bit modules
            quantized.save_increment(self.model, path, self.args.method, base_model)
        else:
            save_increment(self.opt, path, base_model=base_model)



class Full(Method):
    """Every weight trained (a baseline)."""

    def __init__(self, model, args):
        super().__init__(model, args)
        model.requires_grad_(True)
        self.opt = _adamw(args.method.optim, list(model.parameters()), args.train)


class Lora(Method):
    """PEFT LoRA on the target modules (a baseline); the model comes back wrapped."""

    def __init__(self, model, args):
        from peft import LoraConfig, get_peft_model

        method = args.method
        torch.manual_seed(args.train.seed)  # LoRA's A matrices are random
        cfg = LoraConfig(r=method.lora_rank, lora_alpha=method.lora_alpha, lora_dropout=method.lora_dropout,
                         target_modules=list(split_list(method.sift_targets)), task_type="CAUSAL_LM")
        super().__init__(get_peft_model(model, cfg), args)
        self.opt = _adamw(method.optim, [p for p in self.model.parameters() if p.requires_grad], args.train)

    def save_final(self, output_dir, tokenizer, base_model):
        adapter = os.path.join(output_dir, ADAPTER_DIR)
        with atomic_dir(adapter, prefix=".adapter-") as tmp:  # before merging: merge_and_unload folds it in
            self.model.save_pretrained(tmp)
        return [adapter] + super().save_final(output_dir, tokenizer, base_model)

    def merged_model(self, base_model):
        if quantized.enabled(self.args.model):
            return super().merged_model(base_model)
        return self.model.merge_and_unload()


METHODS = {"sift": Sift, "full": Full, "lora": Lora}


def build(model, args: Arguments) -> Method:
    return METHODS[args.method.finetuning_type](model, args)


def _adamw(name: str, params: list, train: TrainArguments) -> torch.optim.Optimizer:
    """torch AdamW (moments in the weights' dtype) or bitsandbytes AdamW with 8-bit / fp32 moments."""
    if name in ("adamw8bit", "adamw32bit"):
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit if name == "adamw8bit" else bnb.optim.AdamW32bit
        return cls(params, lr=train.learning_rate, weight_decay=train.weight_decay)
    return torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay)


def save_merged(model, tokenizer, target: str) -> str:
    """save_pretrained + tokenizer into a temp directory, then renamed into place (0644 files)."""
    with atomic_dir(target, prefix=".merged-") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target
