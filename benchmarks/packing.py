"""--packing on the default run: the embedded SmolLM2-135M on the bundled Alpaca, with and without
packing, in one process one after the other (same machine state, same held-out samples).

`compare` trains both. `pipeline_counts` counts, from train_sft.py's own data pipeline (trainer.data,
trainer.packing) and without a forward pass, the label tokens and grid tokens (tokens + padding) per
optimizer step of one epoch of the padded and the packed loader at a --model_max_length, and the
matmul FLOPs of those grids: what the label tokens per second of packing can reach where a step
costs its grid tokens, or its FLOPs (attention's [width x width] scores grow with the packed rows'
width).

Reports per run: trained label tokens per second (label tokens of all logged windows / their
seconds, evaluation and saving left out; also per CPU second of the process, steadier than wall
time when other jobs share the cores), the padding share of the batches, the held-out loss
before and after, and the wall time of `train_sft.main`.
"""
from __future__ import annotations

import os
import tempfile
import time


def run_one(output_dir: str, packing: bool, extra: list[str]) -> dict:
    import train_sft
    from trainer.rundir import read_log

    argv = ["--output_dir", output_dir, "--overwrite_output_dir", "--generate_tokens", "0", *extra]
    if packing:
        argv.append("--packing")
    t0 = time.perf_counter()
    before, after = train_sft.main(argv)
    wall = time.perf_counter() - t0
    rows = [r for r in read_log(output_dir) if "loss" in r]
    labels, seconds = sum(r["label_tokens"] for r in rows), sum(r["seconds"] for r in rows)
    cpu = sum(r["cpu_seconds"] for r in rows)
    grid_share = sum(r["padding_share"] * r["seconds"] for r in rows) / seconds  # time-weighted
    return {"packing": packing, "steps": rows[-1]["step"], "label_tokens": labels, "train_seconds": seconds,
            "label_tokens_per_s": labels / seconds, "label_tokens_per_cpu_s": labels / cpu, "cpu_seconds": cpu,
            "padding_share": grid_share,
            "padding_share_per_window": [r["padding_share"] for r in rows],
            "heldout_loss_before": before["heldout_loss"], "heldout_loss_after": after["heldout_loss"],
            "wall_s": wall}


def pipeline_counts(model_max_length: int, packing: bool, batch_size: int = 4, accumulation: int = 2,
                    seed: int = 42, data_path: str | None = None, model: str | None = None) -> dict:
    """One epoch of train_sft.py's loader (its defaults: embedded model, bundled Alpaca, batch 4 x
    accumulation 2, seed 42), counted without training: optimizer steps, label tokens (what the
    loss trains), real and grid tokens, and forward matmul FLOPs of the grids."""
    from transformers import AutoConfig

    from common.modeling import load_tokenizer, resolve_model_path
    from trainer.args import DEFAULT_DATA, DataArguments
    from trainer.data import batches_for_window, build_datasets, micro_batches_per_epoch
    from trainer.loss import label_tokens

    data = DataArguments(data_path=data_path or DEFAULT_DATA, model_max_length=model_max_length, packing=packing)
    tokenizer = load_tokenizer(model)
    units, _, _ = build_datasets(data, tokenizer, seed, verbose=False)
    flops = _flops_per_row(AutoConfig.from_pretrained(resolve_model_path(model)))
    steps = micro_batches_per_epoch(len(units), batch_size) // accumulation
    out = {"model_max_length": model_max_length, "packing": packing, "units": len(units), "steps": steps,
           "label_tokens": 0, "real_tokens": 0, "grid_tokens": 0, "flops": 0}
    for step in range(steps):
        for b in batches_for_window(units, step, batch_size, accumulation, seed, tokenizer.pad_token_id,
                                    packed=packing):
            rows, width = b["input_ids"].shape
            out["label_tokens"] += label_tokens(b["labels"])
            out["real_tokens"] += int(b["num_tokens"] if packing else b["attention_mask"].sum())
            out["grid_tokens"] += rows * width
            out["flops"] += rows * flops(width)
    return out


def _flops_per_row(cfg):
    """Forward matmul FLOPs of one row of `width` tokens: the linears and the head per token, plus the
    attention scores and their weighted sum over the whole [width x width] square (SDPA with a mask,
    as padded and packed rows both get, computes all of it). Backward is about twice this, alike."""
    d, heads = cfg.hidden_size, cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or d // heads
    kv = cfg.num_key_value_heads * head_dim
    linear = cfg.num_hidden_layers * (2 * d * heads * head_dim + 2 * d * kv + 3 * d * cfg.intermediate_size)
    per_token = 2 * (linear + d * cfg.vocab_size)
    return lambda width: width * per_token + cfg.num_hidden_layers * 4 * width * width * heads * head_dim


def compare(max_steps: int | None, model_max_length: int | None, packed_first: bool, log=print) -> dict:
    """The default run padded and packed (or packed first), and the ratio of their label tokens per
    second (wall and CPU time); None keeps train_sft.py's default."""
    extra = ["--max_steps", str(max_steps)] if max_steps else []
    extra += ["--model_max_length", str(model_max_length)] if model_max_length else []
    rows = []
    with tempfile.TemporaryDirectory(prefix="packing-bench-") as tmp:
        for packing in ((True, False) if packed_first else (False, True)):
            log(f"  train_sft.py {'--packing ' if packing else ''}{' '.join(extra)}")
            rows.append(run_one(os.path.join(tmp, "packed" if packing else "padded"), packing, extra))
    plain, packed = sorted(rows, key=lambda r: r["packing"])
    return {"rows": rows, "label_tokens_per_s_ratio": packed["label_tokens_per_s"] / plain["label_tokens_per_s"],
            "label_tokens_per_cpu_s_ratio": packed["label_tokens_per_cpu_s"] / plain["label_tokens_per_cpu_s"]}
