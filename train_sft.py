"""Instruction-tune a LLaMA-family model with SIFT (or full / LoRA baselines) on one device.

    python train_sft.py                                   # embedded SmolLM2-135M on bundled Alpaca
    python train_sft.py --model_name_or_path meta-llama/Llama-2-7b-hf --data_path alpaca.json --bf16 ...
    deepspeed train_sft.py ... --deepspeed ds_configs/zero3_offload.json

setup (arguments, data, model, method) → train loop → save. See DESIGN.md for the output directory.
"""
from __future__ import annotations

import json
import os
import sys
import time

# bitsandbytes' CPU optimizer kernels each wait ~7.5 ms on spinning OpenMP threads otherwise
# (benchmarks/README.md); must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.distributed as dist
from tqdm.auto import tqdm

from data_prep.dataset import collate
from data_prep.encode import IGNORE_INDEX
from common.modeling import load_model_and_tokenizer, resolve_model_path
from trainer import args as targs
from trainer import ds, methods, quantized
from trainer.checkpoint import find_checkpoint, load_state, save_checkpoint
from trainer.data import batches_for_window, build_datasets, micro_batches_per_epoch
from trainer.report import Logger, memory_stats, plot_loss, save_merged, write_json_atomic


@torch.no_grad()
def heldout_loss(model, samples, pad_id, batch_size, device) -> float:
    """Mean loss over all label tokens of the held-out samples."""
    model.eval()
    total, tokens = 0.0, 0
    for i in range(0, len(samples), batch_size):
        b = {k: v.to(device) for k, v in collate(samples[i:i + batch_size], pad_id).items()}
        n = int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
        total += float(model(**b, num_items_in_batch=n).loss) * n
        tokens += n
    model.train()
    return total / max(tokens, 1)


@torch.no_grad()
def sample_generation(model, tokenizer, prompt_ids, max_new_tokens, device) -> str:
    model.eval()
    ids = torch.tensor([prompt_ids], device=device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id)
    model.train()
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def train_window(model, micro_batches, device, engine=None) -> tuple[float, int]:
    """Forward/backward over one accumulation window; returns (mean token loss, tokens seen).

    Normalisation: the loss is the sum of token losses over the WHOLE window (of every rank) divided
    by the window's label-token count, so accumulation 4 x batch 1, batch 4, and 2 ranks x batch 2
    all give the same gradient (up to float error), and samples weigh by their tokens.
    """
    n_labels = torch.tensor(sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches))
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    if distributed:
        dist.all_reduce(n_labels)
    n_labels = int(n_labels)
    loss_sum, tokens = torch.zeros(()), 0
    for b in micro_batches:
        b = {k: v.to(device) for k, v in b.items()}
        loss = (engine or model)(**b, num_items_in_batch=n_labels).loss
        if engine is None:
            loss.backward()
        else:
            engine.backward(loss, scale_wrt_gas=False)  # our normalisation already covers the window
            engine.step()  # DeepSpeed's micro-step bookkeeping; its anchor optimizer moves nothing
        loss_sum += loss.detach().float().cpu()  # host sync once per micro-batch, for the log
        tokens += int(b["attention_mask"].sum())
    if distributed:  # each rank holds its share of the window's loss
        dist.all_reduce(loss_sum)
    return float(loss_sum), tokens


def main(argv=None):
    # ------------------------------------------------------------------ setup
    m, d, t = targs.parse(argv)
    problems = targs.problems(m, d, t)
    if problems:
        sys.exit("train_sft.py: invalid options:\n  - " + "\n  - ".join(problems))
    torch.manual_seed(t.seed)
    bf16 = targs.use_bf16(t)
    rank, world, device = 0, 1, "cuda" if torch.cuda.is_available() else "cpu"
    if t.deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
    main_process = rank == 0
    model_path = resolve_model_path(m.model_name_or_path)
    targs.check_targets(model_path, m)  # on a meta-device model: before any weight is read

    ds_cfg = ds.resolve_config(t.deepspeed, m, t, bf16)[0] if t.deepspeed else None
    zero3 = bool(ds_cfg) and ds_cfg["zero_optimization"].get("stage") == 3
    dtype = torch.bfloat16 if bf16 else torch.float32
    if quantized.enabled(m):  # QSIFT / QLoRA: the base straight into 4 bits on the device
        model, tokenizer = quantized.load(model_path, m, t, dtype, device)
    else:
        model, tokenizer = load_model_and_tokenizer(model_path, dtype=dtype,
                                                    device="cpu" if zero3 else device)  # ZeRO-3 places it
    train_set, eval_set, data_report = build_datasets(d, tokenizer, t.seed, verbose=main_process)
    if t.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    engine = ds.initialize(model, ds_cfg) if ds_cfg else None
    model, opt = methods.build(model, m, t)
    per_epoch = micro_batches_per_epoch(len(train_set), t.per_device_train_batch_size * world)
    total_steps = targs.total_steps(m, t, per_epoch)
    from transformers import get_scheduler

    scheduler = get_scheduler(t.lr_scheduler_type, opt, num_warmup_steps=int(t.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    if main_process:
        os.makedirs(t.output_dir, exist_ok=True)
        write_json_atomic(os.path.join(t.output_dir, "args.json"),
                          {"model": vars(m), "data": vars(d), "train": vars(t), "resolved_model_path": model_path,
                           "total_steps": total_steps, "device": device, "world_size": world, "bf16": bf16,
                           "deepspeed_config": ds_cfg, "data_report": data_report})

    start_step = 0
    if t.resume_from_checkpoint:
        ckpt = find_checkpoint(t.output_dir, t.resume_from_checkpoint)
        methods.load_payload(ckpt, model, opt)
        state = load_state(ckpt)
        scheduler.load_state_dict(state["scheduler"])
        start_step = state["step"]
        torch.set_rng_state(torch.tensor(state["rng"], dtype=torch.uint8))
        print(f"resumed from {ckpt} at step {start_step}")
    pad_id = tokenizer.pad_token_id
    gen_prompt = eval_set[0]["prompt_ids"]

    def measure():
        out = {"heldout_loss": heldout_loss(model, eval_set, pad_id, t.per_device_eval_batch_size, device)}
        if t.generate_tokens:
            out["sample"] = sample_generation(model, tokenizer, gen_prompt, t.generate_tokens, device)
        return out

    before = measure()
    if main_process:
        print(f"before: {json.dumps(before, ensure_ascii=False)}")

    # ------------------------------------------------------------------ train
    log = Logger(t.output_dir, t.report_to, resume_step=start_step) if main_process else None
    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, desc="train",
               dynamic_ncols=True, disable=not main_process)
    window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
    comm_at_start = getattr(opt, "comm_bytes", 0)
    model.train()
    for step in bar:
        micro = batches_for_window(train_set, step, t.per_device_train_batch_size, t.gradient_accumulation_steps,
                                   t.seed, pad_id, rank, world)
        loss, tokens = train_window(model, micro, device, engine)
        grad_norm = methods.step(model, opt, t)
        scheduler.step()
        window_loss += loss
        window_tokens += tokens * world
        done = step + 1
        if main_process and (done % t.logging_steps == 0 or done == total_steps):
            n = done % t.logging_steps or t.logging_steps
            elapsed = time.perf_counter() - window_start
            row = {"step": done, "loss": window_loss / n, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                   "tokens_per_s": window_tokens / elapsed, **memory_stats(device)}
            if hasattr(opt, "skipped_steps"):
                row["skipped_steps"] = opt.skipped_steps
            if world > 1:
                row["allreduce_bytes_per_step"] = (opt.comm_bytes - comm_at_start) / n
                comm_at_start = opt.comm_bytes
            log.write(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
            window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
        if t.save_steps and done % t.save_steps == 0 and done < total_steps:
            if main_process:  # SIFT's state is replicated: one rank writes it
                state = {"step": done, "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state().tolist()}
                save_checkpoint(t.output_dir, done, lambda tmp: methods.save_payload(tmp, model, opt, model_path, m),
                                state, t.save_total_limit)
            if world > 1:
                dist.barrier()

    # ------------------------------------------------------------------ save
    after = measure()
    with ds.gathered(model):  # ZeRO-3: every rank takes part in the gather
        if main_process:
            log.close()
            print(f"after: {json.dumps(after, ensure_ascii=False)}")
            if quantized.enabled(m):  # increment / adapter; merged/ = full-precision base + delta
                quantized.save_outputs(t.output_dir, model, tokenizer, m, model_path, dtype, methods.FILENAME)
            else:
                if isinstance(opt, methods.SIFT):
                    methods.save_increment(opt, os.path.join(t.output_dir, methods.FILENAME), base_model=model_path)
                save_merged(methods.merged_model(model, opt), tokenizer, os.path.join(t.output_dir, "merged"))
            if isinstance(opt, methods.SIFT):
                print(f"memory: {json.dumps(opt.memory_report())}")
            write_json_atomic(os.path.join(t.output_dir, "results.json"),
                              {"before": before, "after": after, "steps": total_steps})
            plot_loss(t.output_dir)
            print(f"saved to {t.output_dir}")
    if world > 1:
        dist.barrier()
    return before, after


if __name__ == "__main__":
    main()
