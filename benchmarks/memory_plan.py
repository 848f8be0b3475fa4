"""Item 2: the peak GPU memory of a training step, planned on meta tensors (no weights, no GPU).

    python -m benchmarks.memory_plan --model llama-7b --seq 2048 --batch 1 \\
        --gradient_checkpointing --method sift --rate 0.05
    python -m benchmarks.memory_plan --model path/to/config.json ...   # any HF causal-LM config
    python -m benchmarks.memory_plan ... --gradient_accumulation_steps 2   # micro-batches per step (deferred rows)

How: the model is built on the meta device (shapes and dtypes, no storage), and the *real*
training step of each method (benchmarks.methods: the method built by trainer.methods, the
trainer's chunked loss (trainer.loss), autograd backward, SIFT's hooks, the optimizer's step) runs on it inside the same byte counter that measures the CPU
runs (benchmarks.memtrack). Meta kernels allocate outputs of the true shapes and dtypes, so the
count is what the step allocates, op for op. Two things differ from a plain run:

- attention goes through the fused SDPA kernel (benchmarks.models.FUSED_SDPA): what the CPU run
  dispatches to, and the flash-attention profile (no S x S matrix) of a GPU run;
- host syncs on meta tensors return 1 (numbers) or True (booleans) instead of failing. The ones
  a step makes: transformers' "is this batch packed?" test, `(mask[:, -1] == 0).all()`, answered
  "not packed" as for real unpadded rows; SIFT's global gradient norm (1: a finite norm, no skip);
  SIFT in-backward's non-finite flag (True: counted as a skipped step, which changes no memory,
  the in-hook updates having been done; its warning is silenced).

What it is not: it counts tensor bytes (torch.cuda.max_memory_allocated, give or take the caching
allocator's 512-byte rounding), not reserved memory, CUDA context (~0.3-0.5 GiB) or fragmentation,
and it assumes the step's kernels are the CPU/meta ones (e.g. torch AdamW's single-tensor loop;
on a GPU the default foreach / fused paths allocate other temporaries).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import warnings

import torch
from bitsandbytes import functional as bnbf

from . import memory_speed
from .memtrack import MemoryTracker
from .methods import Method, lora_rank_for_rate
from .models import FUSED_SDPA, SHAPES, SMOLLM2, build_model, count_params, enable_checkpointing, load_config

GIB = 2**30
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Song et al. 2024, LLaMA-7B, seq 2048, batch 1, gradient checkpointing
PAPER_7B = {"full": 76.12, "sift 5%": 16.50}


class MetaTracker(MemoryTracker):
    """MemoryTracker that answers host syncs on meta tensors with a neutral value."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].is_meta:
            return True if args[0].dtype == torch.bool else 1
        return super().__torch_dispatch__(func, types, args, kwargs)


def build(config, device: str, dtype: torch.dtype, gradient_checkpointing: bool, attention: str = FUSED_SDPA):
    """The model a training step runs on: meta with the fused attention (or `attention`), or real with sdpa."""
    model = build_model(config, device, dtype, attention if device == "meta" else "sdpa")
    model.config.use_cache = False  # a training forward keeps no KV cache
    if gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    return model


def plan(config, method: Method, batch_size: int, seq_len: int, dtype: torch.dtype = torch.bfloat16,
         gradient_checkpointing: bool = False, steps: int = 3, accumulation: int = 1,
         attention: str = FUSED_SDPA, tracker=MetaTracker, on_model=None) -> dict:
    """Peak bytes of `method`'s steady-state step (the last of `steps`, each of `accumulation`
    micro-batches) and what made it up. `tracker` makes the byte counter, `on_model(model)` sees the
    model before the method is built on it (benchmarks.longest uses both)."""
    model = build(config, "meta", dtype, gradient_checkpointing, attention)
    # bitsandbytes caches its 8-bit map on the device of the first tensor it quantizes blockwise: made
    # on meta here, it would break every later real quantization in this process (and add 1 KiB to this plan)
    bnbf.name2qmap.setdefault("dynamic", bnbf.create_dynamic_map())
    if on_model is not None:
        on_model(model)
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")
    batches = [{"input_ids": ids, "labels": ids}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SIFT's non-finite warning (see the module doc), peft's notes
        trainee, out, after = memory_speed.track_steps(method, model, batches, steps, tracker=tracker,
                                                       accumulation=accumulation)
    trainee.close()
    host = out[-1]["breakdown"]["host"]  # fixed after the first step, so it shifts the peak only
    return {"name": method.name, "method": method.__dict__.copy(), "trainable_entries": trainee.entries,
            "params": count_params(trainee.model), "peak": out[-1]["peak"] - host,
            "peak_with_host": out[-1]["peak"], "first_step_peak": out[0]["peak"] - host,
            "peak_breakdown": out[-1]["breakdown"], "after_step": after, "sift": trainee.sift_report(),
            "offloaded_bytes": trainee.offload.offloaded_bytes if trainee.offload else 0}


def table1_methods(config, rate: float, rank: int | None = None, which: str = "all") -> list[Method]:
    """floor, full fine-tuning (three optimizers), LoRA at SIFT's count, the original SIFT
    profile and SIFT in both step modes; `which` keeps one family, plus the floor and the rows
    of the paper's Table 1 it is compared with (full fine-tuning with fp32 moments, LoRA)."""
    probe = build(config, "meta", torch.bfloat16, False)
    rank = rank or lora_rank_for_rate(probe, rate)
    pct = f"{rate:.0%}" if rate >= 0.01 else f"{rate:.1%}"
    families = {
        "floor": [Method("floor", "floor")],
        "full": [Method("full AdamW (moments in weight dtype)", "full"),
                 Method("full AdamW (fp32 moments)", "full", "adamw32bit"),
                 Method("full AdamW8bit", "full", "adamw8bit")],
        "lora": [Method(f"LoRA r={rank}", "lora", rank=rank)],
        "original": [Method(f"original SIFT {pct} (profile)", "original", rate=rate)],
        "sift": [Method(f"SIFT {pct} deferred", "sift", rate=rate),
                 Method(f"SIFT {pct} in-backward", "sift", rate=rate, step_in_backward=True)],
    }
    if which == "all":
        return [m for ms in families.values() for m in ms]
    rows = families["floor"] + [families["full"][1]] + families["lora"] + families[which]
    return list({m.name: m for m in rows}.values())  # each row once


def quantized_methods(config, rate: float, quantization: str, rank: int | None = None) -> list[Method]:
    """QSIFT at `rate` (both step modes) and QLoRA at the same trainable count on the same 4-bit
    base, beside their bf16 counterparts and the (bf16) floor."""
    probe = build(config, "meta", torch.bfloat16, False)
    rank = rank or lora_rank_for_rate(probe, rate)
    pct = f"{rate:.0%}" if rate >= 0.01 else f"{rate:.1%}"
    return [Method("floor", "floor"),
            Method(f"SIFT {pct} deferred", "sift", rate=rate),
            Method(f"QSIFT {pct} {quantization} deferred", "sift", rate=rate, quantization=quantization),
            Method(f"QSIFT {pct} {quantization} in-backward", "sift", rate=rate, step_in_backward=True,
                   quantization=quantization),
            Method(f"LoRA r={rank}", "lora", rank=rank),
            Method(f"QLoRA r={rank} {quantization}", "lora", rank=rank, quantization=quantization)]


def render_table(rows: list[dict]) -> str:
    """Markdown, in the shape of the paper's Table 1 (GiB): the device columns sum to the peak;
    host-resident state (the original SIFT's coordinates, offloaded activations) is shown apart."""
    lines = ["| method | trainable | weights | grads | optimizer state | activations & temporaries | "
             "peak | host RAM |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        bd = r["peak_breakdown"]
        rest = bd["activations"] + bd["backward"] + bd["step"] + bd["other"]
        host_bytes = bd["host"] + r.get("offloaded_bytes", 0)  # + activations waiting on the host
        host = f"{host_bytes / GIB:.2f}" if host_bytes else ""
        lines.append(f"| {r['name']} | {r['trainable_entries'] / 1e6:,.1f} M | {bd['params'] / GIB:.2f} | "
                     f"{bd['grads'] / GIB:.2f} | {bd['optimizer'] / GIB:.2f} | {rest / GIB:.2f} | "
                     f"**{r['peak'] / GIB:.2f}** | {host} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.memory_plan", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-7b",
                    help=f"{', '.join(SHAPES)}, {SMOLLM2}, a config.json or a HF model dir / id")
    ap.add_argument("--seq", type=int, default=2048, help="sequence length (tokens per row)")
    ap.add_argument("--batch", type=int, default=1, help="rows per micro-batch")
    ap.add_argument("--gradient_checkpointing", action="store_true", help="recompute each layer in backward")
    ap.add_argument("--method", default="all", choices=["all", "full", "lora", "original", "sift"],
                    help="which methods to plan; the floor, full fine-tuning and LoRA are always planned, "
                         "as in the paper's Table 1")
    ap.add_argument("--rate", type=float, default=0.05, help="SIFT rate; LoRA's rank is matched to it")
    ap.add_argument("--lora_rank", type=int, default=None, help="override the matched LoRA rank")
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="weight / activation dtype")
    ap.add_argument("--quantization", default=None, choices=["nf4", "fp4"],
                    help="plan QSIFT / QLoRA on a 4-bit base of the targets (double quantization) instead")
    ap.add_argument("--gradient_accumulation_steps", type=int, default=1,
                    help="micro-batches per optimizer step (the in-backward rows need 1 and are left out)")
    ap.add_argument("--offload_activations", action="store_true",
                    help="plan every row with the saved activations in host memory (trainer.offload)")
    ap.add_argument("--embeddings_on_host", action="store_true",
                    help="plan the (frozen) input embedding table in host memory (not for full fine-tuning)")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    from . import longest  # imported here: benchmarks.longest plans through this module
    longest.add_arguments(ap)
    args = ap.parse_args(argv)
    if args.gradient_accumulation_steps < 1:
        ap.error(f"--gradient_accumulation_steps {args.gradient_accumulation_steps}: must be >= 1")
    longest.check(ap, args)  # --max_seq's options, before anything is planned

    config = load_config(args.model)
    dtype = DTYPES[args.dtype]
    rows = []
    methods = quantized_methods(config, args.rate, args.quantization, args.lora_rank) if args.quantization \
        else table1_methods(config, args.rate, args.lora_rank, args.method)
    if args.offload_activations:
        methods = [dataclasses.replace(m, name=f"{m.name} + offload", offload_activations=True) for m in methods]
    if args.embeddings_on_host:
        methods = [dataclasses.replace(m, name=f"{m.name} + host embeddings", embeddings_on_host=True)
                   for m in methods if m.kind != "full"]
    if args.tile_tokens is not None and args.tile_tokens >= 0:
        methods = [dataclasses.replace(m, tile_tokens=args.tile_tokens) for m in methods]
    if args.max_seq:
        return longest.report(config, methods, args)
    accumulation = args.gradient_accumulation_steps
    for method in (m for m in methods if accumulation == 1 or not m.step_in_backward):
        rows.append(plan(config, method, args.batch, args.seq, dtype, args.gradient_checkpointing,
                         accumulation=accumulation))
    setting = (f"{args.model}, {rows[0]['params'] / 1e9:.2f} B params, {args.dtype}, seq {args.seq}, "
               f"batch {args.batch}, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}"
               + (f", {accumulation} micro-batches per step" if accumulation > 1 else ""))
    print(f"Planned peak tensor memory (GiB) of one steady-state training step: {setting}\n")
    print(render_table(rows))
    if args.model == "llama-7b" and args.seq == 2048 and args.batch == 1 and args.gradient_checkpointing \
            and accumulation == 1:
        print(f"\nPaper (Song et al. 2024, same setting): full fine-tuning {PAPER_7B['full']} GB, "
              f"SIFT 5% {PAPER_7B['sift 5%']} GB.")
    print("\nTensor bytes only (torch.cuda.max_memory_allocated); add the CUDA context and allocator slack.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setting": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
