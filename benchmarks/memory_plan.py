"""The peak GPU memory of a training step, planned on meta tensors (no weights, no GPU).

    python -m benchmarks.memory_plan --model llama-7b --seq 2048 --batch 1 \\
        --gradient_checkpointing --method sift --rate 0.05
    python -m benchmarks.memory_plan --model path/to/config.json ...   # any HF causal-LM config
    python -m benchmarks.memory_plan ... --gradient_accumulation_steps 2   # micro-batches per step (deferred rows)

How: the model is built on the meta device (shapes and dtypes, no storage), and the *real*
training step of each method (benchmarks.methods: the method built by trainer.methods, the
trainer's chunked loss (trainer.loss), autograd backward, SIFT's hooks, the optimizer's step)
runs on it inside the same byte counter that measures the CPU runs (benchmarks.memtrack). Meta kernels allocate outputs of the true shapes and dtypes, so the
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
import inspect
import json
import os
import sys

from common.quiet import silence_unrelated_warnings

if __name__ == "__main__":  # it runs no 4-bit CPU kernel and no DeepSpeed: their start-up notices concern no plan
    silence_unrelated_warnings([])

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from common.atomic import atomic_write  # noqa: E402
from common.cli import UsageError, problems_error  # noqa: E402
from sift.config import LLAMA_LINEARS  # noqa: E402
from sift.targets import matches_module  # noqa: E402

from . import longest, zero_plan  # noqa: E402  (longest plans through benchmarks.meta_plan, never this module)
from .constants import DTYPES, GIB, PAPER_7B  # noqa: E402
from .meta_plan import MetaTracker, build, json_problem, plan  # noqa: E402,F401  (MetaTracker: the planner's API)
from .methods import Method, lora_rank_for_rate  # noqa: E402
from .models import SHAPES, SMOLLM2, ConfigError, load_config  # noqa: E402

PROG = "python -m benchmarks.memory_plan"
FAMILIES = ("all", "full", "lora", "original", "sift")
QUANTIZATIONS = ("nf4", "fp4")


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


def plan_setting(model: str = "llama-7b", seq: int = 2048, batch: int = 1, gradient_checkpointing: bool = False,
                 method: str = "all", rate: float = 0.05, lora_rank: int | None = None, dtype: str = "bf16",
                 quantization: str | None = None, gradient_accumulation_steps: int = 1,
                 offload_activations: bool = False, embeddings_on_host: bool = False,
                 regrow_fraction: float | None = None, zero: int | None = None, world_size: int = 1,
                 ds_config: str = "zero3", tile_tokens: int | None = None, dry_run: bool = False) -> dict:
    """The planned rows of one setting (the options of `python -m benchmarks.memory_plan`, which see).
    Every bad option and an unusable model are refused together, before any row is planned; a dry
    run stops there and names the rows it would plan. `zero` 3: the SIFT / QSIFT rows only (what
    DeepSpeed runs), each also per rank of `world_size` (benchmarks.zero_plan)."""
    setting = {k: v for k, v in locals().items() if k != "dry_run"}
    config, methods = setting_methods(setting)
    if dry_run:
        return {"setting": setting, "rows": [m.name for m in methods]}
    values = zero_plan.config_values(ds_config, config) if zero else None
    rows = [plan(config, m, batch, seq, DTYPES[dtype], gradient_checkpointing, accumulation=gradient_accumulation_steps,
                 zero=values, world_size=world_size)
            for m in tqdm(methods, desc=f"planning {model}", unit="row", leave=False, disable=None)]
    return {"setting": setting, "params": rows[0]["params"], "rows": rows}


def setting_methods(setting: dict) -> tuple:
    """(config, the benchmarks Methods a setting plans), or UsageError with every problem of it."""
    problems = option_problems(setting)
    config = None
    if not problems:  # a model check on top of bad numbers would only add noise
        config, problem = checked_config(setting["model"], setting["embeddings_on_host"])
        problems += [problem] if problem else []
    if problems:
        raise problems_error(PROG, problems)
    rate, rank = setting["rate"], setting["lora_rank"]
    methods = quantized_methods(config, rate, setting["quantization"], rank) if setting["quantization"] \
        else table1_methods(config, rate, rank, setting["method"])
    if setting["offload_activations"]:
        methods = [dataclasses.replace(m, name=f"{m.name} + offload", offload_activations=True) for m in methods]
    if setting["embeddings_on_host"]:
        methods = [dataclasses.replace(m, name=f"{m.name} + host embeddings", embeddings_on_host=True)
                   for m in methods if m.kind != "full"]
    regrow_fraction = setting["regrow_fraction"]
    if regrow_fraction is not None:  # each SIFT row again, stepping inside a regrow window (its largest, the first)
        methods += [dataclasses.replace(m, name=f"{m.name} + regrow window ({regrow_fraction:g})",
                                        regrow_fraction=regrow_fraction) for m in methods if m.kind == "sift"]
    if setting["tile_tokens"] is not None:
        methods = [dataclasses.replace(m, tile_tokens=setting["tile_tokens"]) for m in methods]
    accumulation = setting["gradient_accumulation_steps"]
    methods = [m for m in methods if accumulation == 1 or not m.step_in_backward]  # in-backward needs 1
    return config, [m for m in methods if not setting["zero"] or m.kind == "sift"]  # ZeRO-3 runs SIFT only


DEFAULTS = {k: p.default for k, p in inspect.signature(plan_setting).parameters.items() if k != "dry_run"}


def option_problems(setting: dict) -> list[str]:
    """What is wrong with the numbers and names of a setting (nothing is built to tell)."""
    out = []
    for key in ("seq", "batch", "gradient_accumulation_steps", "lora_rank", "world_size", "tile_tokens"):
        value, least = setting[key], 0 if key == "tile_tokens" else 1
        if value is None and key in ("lora_rank", "tile_tokens"):
            continue
        if type(value) is not int:
            out.append(f"--{key} {value!r}: must be an integer")
        elif value < least:
            out.append(f"--{key} {value}: must be >= {least}")
    rate = setting["rate"]
    if type(rate) not in (int, float) or not (0 < rate <= 1):  # NaN fails the comparison too
        out.append(f"--rate {rate}: must be a number in (0, 1] (the share of each target's entries trained)")
    fraction = setting["regrow_fraction"]
    if fraction is not None and (type(fraction) not in (int, float) or not (0 < fraction <= 1)):
        out.append(f"--regrow_fraction {fraction}: must be a number in (0, 1] (the share a regrow replaces)")
    for key, choices in (("method", FAMILIES), ("dtype", tuple(DTYPES)), ("quantization", (None, *QUANTIZATIONS))):
        if setting[key] not in choices:
            out.append(f"--{key} {setting[key]}: choose one of {', '.join(str(c) for c in choices if c)}")
    if setting["zero"] not in (None, 3):
        out.append(f"--zero {setting['zero']}: the per-rank plan is for ZeRO-3 (ZeRO-2 replicates the one-rank plan)")
    config = setting["ds_config"]
    if setting["zero"] and config not in zero_plan.CONFIGS and not os.path.isfile(str(config)):
        out.append(f"--ds_config {config}: choose {' or '.join(zero_plan.CONFIGS)}, or name a DeepSpeed JSON file")
    if not isinstance(setting["model"], str) or not setting["model"]:
        out.append(f"--model {setting['model']!r}: name a shape, a config.json or a model directory")
    return out


def checked_config(model: str, embeddings_on_host: bool):
    """(config, None), or (None, why the planner cannot plan `model`): its config is read, and a
    weightless meta skeleton of it shows whether it has the LLaMA linears every method trains (the
    check train_sft.py makes before it loads weights)."""
    try:
        config = load_config(model)
    except ConfigError as e:
        return None, f"--model {e}"
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        return None, f"--model {model}: transformers has no causal LM for model_type {config.model_type!r}"
    try:
        skeleton = build(config, "meta", torch.bfloat16, False)
    except Exception as e:  # noqa: BLE001  whatever transformers raises for fields it cannot build from
        return None, f"--model {model}: transformers cannot build it: {type(e).__name__}: {str(e).splitlines()[0]}"
    names = [n for n, _ in skeleton.named_parameters()]
    missing = [t for t in LLAMA_LINEARS if not any(matches_module(n, t) for n in names)]
    if missing:
        have = sorted({n.split(".")[-2] for n in names if "." in n})[:12]
        return None, (f"--model {model}: {type(skeleton).__name__} lacks the LLaMA linears every method trains "
                      f"({', '.join(missing)}); its modules include {', '.join(have)}")
    head = skeleton.get_output_embeddings()
    if embeddings_on_host and head is not None and head.weight is skeleton.get_input_embeddings().weight:
        return None, (f"--embeddings_on_host: {model} ties its input embeddings to the output head, "
                      "which needs them on the device")
    return config, None


def max_seq_report(setting: dict, search: dict, out: str | None) -> int:
    """--max_seq (benchmarks.longest): the search for its sift rows (those on the --quantization base)."""
    problems = longest.search_problems(setting, search)
    if problems:
        raise problems_error(PROG, problems)
    config, methods = setting_methods(setting)
    rows = [m for m in methods if m.kind == "sift" and m.quantization == setting["quantization"]]
    chunk = longest.chunk_of(config, rows[0].tile_tokens)
    print(f"Longest sequence (batch 1) per card: {setting['model']}, {setting['dtype']}, gradient checkpointing, "
          f"tiled layers {f'in chunks of {chunk} tokens' if chunk else 'off (--tile_tokens 0 tiles them)'}\n")
    print(longest.render([]))
    cards = longest.cards(search["gpu_gib"], search["context_gib"])
    found = longest.search_rows(config, rows, cards, search["context_gib"], granularity=search["granularity"],
                                dtype=DTYPES[setting["dtype"]])
    longest.write_rows(out, {**setting, **search}, found)
    return 0


def parser() -> argparse.ArgumentParser:
    """The planner's options; an option left out takes plan_setting's default (shown in --help)."""
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 argument_default=argparse.SUPPRESS)

    def opt(name, help, **kw):
        default = "" if kw.get("action") or DEFAULTS[name] is None else f" (default {DEFAULTS[name]})"
        ap.add_argument(f"--{name}", help=help + default, **kw)

    opt("model", f"{', '.join(SHAPES)}, {SMOLLM2}, a config.json or a HF model dir / id")
    opt("seq", "sequence length (tokens per row)", type=int)
    opt("batch", "rows per micro-batch", type=int)
    opt("gradient_checkpointing", "recompute each layer in backward", action="store_true")
    opt("method", "which methods to plan; the floor, full fine-tuning and LoRA are always planned, as in the "
                  "paper's Table 1", choices=FAMILIES)
    opt("rate", "SIFT rate in (0, 1]; LoRA's rank is matched to it", type=float)
    opt("lora_rank", "the LoRA rank (default: matched to --rate)", type=int)
    opt("dtype", "weight / activation dtype", choices=list(DTYPES))
    opt("quantization", "plan QSIFT / QLoRA on a 4-bit base of the targets (double quantization) instead",
        choices=QUANTIZATIONS)
    opt("gradient_accumulation_steps", "micro-batches per optimizer step (the in-backward rows need 1 and are "
                                       "left out)", type=int)
    opt("offload_activations", "plan every row with the saved activations in host memory (trainer.offload)",
        action="store_true")
    opt("embeddings_on_host", "plan the (frozen) input embedding table in host memory (not for full "
                              "fine-tuning)", action="store_true")
    opt("regrow_fraction", "also plan each SIFT row stepping inside a regrow window that replaces this share "
                           "(--sift_regrow_fraction: the first window, the largest)", type=float)
    opt("zero", "also plan each SIFT / QSIFT row per rank under DeepSpeed ZeRO-3 (benchmarks.zero_plan)",
        type=int, choices=[3])
    opt("world_size", "ranks of the ZeRO-3 plan", type=int)
    opt("ds_config", f"the DeepSpeed config of the ZeRO-3 plan: {', '.join(zero_plan.CONFIGS)} or a path")
    opt("tile_tokens", "tile the decoder layers in chunks of this many tokens (trainer.tiled_decoder; 0: its "
                       "chunk_tokens rule; default untiled)", type=int)
    ap.add_argument("--json", help="also write the rows to this file")
    longest.add_arguments(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    options = vars(ap.parse_args(argv))
    out = options.pop("json", None)
    search = {k: options.pop(k) for k in longest.SEARCH if k in options}
    try:
        problem = out and json_problem(out)
        if problem:
            raise problems_error(PROG, [problem])
        if search.get("max_seq"):
            return max_seq_report({**DEFAULTS, **options}, search, out)
        result = plan_setting(**options)
    except UsageError as e:
        ap.exit(2, f"{e}\n")
    s = result["setting"]
    print(f"Planned peak tensor memory (GiB) of one steady-state training step: {s['model']}, "
          f"{result['params'] / 1e9:.2f} B params, {s['dtype']}, seq {s['seq']}, batch {s['batch']}, gradient "
          f"checkpointing {'on' if s['gradient_checkpointing'] else 'off'}"
          + (f", {s['gradient_accumulation_steps']} micro-batches per step"
             if s["gradient_accumulation_steps"] > 1 else "") + "\n")
    print(render_table(result["rows"]))
    if (s["model"], s["seq"], s["batch"], s["gradient_checkpointing"], s["gradient_accumulation_steps"]) \
            == ("llama-7b", 2048, 1, True, 1):
        print(f"\nPaper (Song et al. 2024, same setting): full fine-tuning {PAPER_7B['full']} GB, "
              f"SIFT 5% {PAPER_7B['sift 5%']} GB.")
    if s["zero"]:
        zero = result["rows"][0]["zero3"]["zero"]
        print(f"\nPer rank under ZeRO-3 on {s['world_size']} ranks ({zero['config']}; composed from the rows "
              "above and DeepSpeed's buffers, benchmarks/zero_plan.py):\n")
        print(zero_plan.render(result["rows"]))
    print("\nTensor bytes only (torch.cuda.max_memory_allocated); add the CUDA context and allocator slack.")
    if out:
        atomic_write(out, [json.dumps(result, indent=1)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
