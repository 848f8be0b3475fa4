"""Instruction-tune a LLaMA-family model with SIFT (or full / LoRA baselines) on one device.

    python train_sft.py                                   # embedded SmolLM2-135M on bundled Alpaca
    python train_sft.py --model_name_or_path meta-llama/Llama-2-7b-hf --data_path alpaca.json --bf16 ...
    deepspeed train_sft.py ... --deepspeed ds_configs/zero3_offload.json

setup (arguments, data, model, method) → train loop → save. See DESIGN.md for the output directory.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import torch
from tqdm.auto import tqdm

from data_prep.encode import IGNORE_INDEX
from sift.modeling import load_model_and_tokenizer, resolve_model_path
from trainer import args as targs
from trainer import methods
from trainer.checkpoint import find_checkpoint, load_state, save_checkpoint
from data_prep.dataset import collate
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

    Normalisation: the loss is the sum of token losses over the WHOLE window divided by the window's
    label-token count, so accumulation 4 x batch 1 gives the gradient of batch 4 (up to float error)
    and long samples weigh by their tokens, not by their sample.
    """
    n_labels = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)
    loss_sum, tokens = 0.0, 0
    for b in micro_batches:
        b = {k: v.to(device) for k, v in b.items()}
        loss = (engine or model)(**b, num_items_in_batch=n_labels).loss
        if engine is not None:
            engine.backward(loss)
        else:
            loss.backward()
        loss_sum += float(loss.detach())  # host sync once per micro-batch, for the log
        tokens += int(b["attention_mask"].sum())
    return loss_sum, tokens


def main(argv=None):
    # ------------------------------------------------------------------ setup
    m, d, t = targs.parse(argv)
    problems = targs.problems(m, d, t)
    if problems:
        sys.exit("train_sft.py: invalid options:\n  - " + "\n  - ".join(problems))
    torch.manual_seed(t.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = t.bf16 or device == "cuda"
    model_path = resolve_model_path(m.model_name_or_path)
    targs.check_targets(model_path, m)  # on a meta-device model: before any weight is read

    model, tokenizer = load_model_and_tokenizer(model_path, dtype=torch.bfloat16 if bf16 else torch.float32,
                                                device=device)
    train_set, eval_set, data_report = build_datasets(d, tokenizer, t.seed)
    if t.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    model, opt = methods.build(model, m, t)
    per_epoch = micro_batches_per_epoch(len(train_set), t.per_device_train_batch_size)
    total_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * per_epoch / t.gradient_accumulation_steps)
    from transformers import get_scheduler

    scheduler = get_scheduler(t.lr_scheduler_type, opt, num_warmup_steps=int(t.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    os.makedirs(t.output_dir, exist_ok=True)
    write_json_atomic(os.path.join(t.output_dir, "args.json"),
                      {"model": vars(m), "data": vars(d), "train": vars(t), "resolved_model_path": model_path,
                       "total_steps": total_steps, "device": device, "bf16": bf16, "data_report": data_report})

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
    gen_prompt = eval_set[0]["prompt_ids"] if eval_set else None
    before = {"heldout_loss": heldout_loss(model, eval_set, pad_id, t.per_device_eval_batch_size, device)} if eval_set else {}
    if gen_prompt and t.generate_tokens:
        before["sample"] = sample_generation(model, tokenizer, gen_prompt, t.generate_tokens, device)
    print(f"before: {json.dumps(before, ensure_ascii=False)}")

    # ------------------------------------------------------------------ train
    log = Logger(t.output_dir, t.report_to, resume_step=start_step)
    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, desc="train", dynamic_ncols=True)
    window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
    model.train()
    for step in bar:
        micro = batches_for_window(train_set, step, t.per_device_train_batch_size, t.gradient_accumulation_steps,
                                   t.seed, pad_id)
        loss, tokens = train_window(model, micro, device)
        grad_norm = methods.step(model, opt, t)
        scheduler.step()
        window_loss += loss
        window_tokens += tokens
        done = step + 1
        if done % t.logging_steps == 0 or done == total_steps:
            n = done % t.logging_steps or t.logging_steps
            elapsed = time.perf_counter() - window_start
            row = {"step": done, "loss": window_loss / n, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                   "tokens_per_s": window_tokens / elapsed, **memory_stats(device)}
            if hasattr(opt, "skipped_steps"):
                row["skipped_steps"] = opt.skipped_steps
            log.write(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
            window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
        if t.save_steps and done % t.save_steps == 0 and done < total_steps:
            state = {"step": done, "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state().tolist()}
            save_checkpoint(t.output_dir, done, lambda tmp: methods.save_payload(tmp, model, opt, model_path),
                            state, t.save_total_limit)
    log.close()

    # ------------------------------------------------------------------ save
    after = {"heldout_loss": heldout_loss(model, eval_set, pad_id, t.per_device_eval_batch_size, device)} if eval_set else {}
    if gen_prompt and t.generate_tokens:
        after["sample"] = sample_generation(model, tokenizer, gen_prompt, t.generate_tokens, device)
    print(f"after: {json.dumps(after, ensure_ascii=False)}")
    if isinstance(opt, methods.SIFT):
        methods.save_increment(opt, os.path.join(t.output_dir, methods.FILENAME), base_model=model_path)
        print(f"memory: {json.dumps(opt.memory_report())}")
    save_merged(methods.merged_model(model, opt), tokenizer, os.path.join(t.output_dir, "merged"))
    write_json_atomic(os.path.join(t.output_dir, "results.json"), {"before": before, "after": after,
                                                                    "steps": total_steps})
    plot_loss(t.output_dir)
    print(f"saved to {t.output_dir}")
    return before, after


if __name__ == "__main__":
    main()
