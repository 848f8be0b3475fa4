"""Instruction-tune a LLaMA-family model with SIFT (or full / LoRA baselines) on one device.

    python train_sft.py                                   # embedded SmolLM2-135M on bundled Alpaca
    python train_sft.py --model_name_or_path meta-llama/Llama-2-7b-hf --data_path alpaca.json --bf16 ...
    deepspeed train_sft.py ... --deepspeed ds_configs/zero3_offload.json

setup (arguments, data, model, method) → train loop → save. See docs/DESIGN.md for the output directory.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import Counter

# bitsandbytes' CPU optimizer kernels each wait ~7.5 ms on spinning OpenMP threads otherwise
# (benchmarks/README.md); must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from common.quiet import silence_unrelated_warnings  # noqa: E402

silence_unrelated_warnings(sys.argv[1:])  # before bitsandbytes / DeepSpeed load and log

import torch  # noqa: E402
import torch.distributed as dist
from tqdm.auto import tqdm

from data_prep.dataset import collate
from common import cli
from common.modeling import EMBEDDED, load_model_and_tokenizer, load_tokenizer, resolve_model_path
from trainer import args as targs
from trainer import ds, methods, offload, quantized, rundir
from trainer.checkpoint import load_state, resume_candidates, save_checkpoint
from trainer.interrupts import Interrupts
from trainer.loss import causal_lm_loss, label_tokens, unwrap
from trainer.data import batches_for_window, build_datasets, micro_batches_per_epoch
from trainer.report import Logger, memory_stats, plot_loss, write_json_atomic


@torch.no_grad()
def heldout_loss(model, samples, pad_id, batch_size, device) -> float:
    """Mean loss over all label tokens of the held-out samples."""
    model.eval()
    total, tokens = 0.0, 0
    for i in range(0, len(samples), batch_size):
        b = {k: v.to(device) for k, v in collate(samples[i:i + batch_size], pad_id).items()}
        n = label_tokens(b["labels"])
        total += float(causal_lm_loss(model, b, n)) * n
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


def train_window(model, micro_batches, device, engine=None) -> tuple[float, dict]:
    """Forward/backward over one accumulation window; returns (mean token loss, counts): this rank's
    real `tokens` and padded `grid` (tokens + padding), the window's `label_tokens` on all ranks.

    Normalisation: the loss is the sum of token losses over the WHOLE window (of every rank) divided
    by the window's label-token count, so accumulation 4 x batch 1, batch 4, and 2 ranks x batch 2
    all give the same gradient (up to float error), and samples weigh by their tokens.
    """
    n_labels = torch.tensor(sum(label_tokens(b["labels"]) for b in micro_batches))
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    if distributed:
        dist.all_reduce(n_labels)
    n_labels = int(n_labels)
    loss_sum, tokens, grid = torch.zeros(()), 0, 0
    for b in micro_batches:
        b = {k: v.to(device) for k, v in b.items()}
        loss = engine(b, n_labels) if engine is not None else causal_lm_loss(model, b, n_labels)
        if engine is None:
            loss.backward()
        else:
            engine.backward(loss, scale_wrt_gas=False)  # our normalisation already covers the window
            engine.step()  # DeepSpeed's micro-step bookkeeping; its anchor optimizer moves nothing
        loss_sum += loss.detach().float().cpu()  # host sync once per micro-batch, for the log
        tokens += int(b["num_tokens"] if "num_tokens" in b else b["attention_mask"].sum())  # packed rows: no mask
        grid += b["input_ids"].numel()
    if distributed:  # each rank holds its share of the window's loss
        dist.all_reduce(loss_sum)
    return float(loss_sum), {"tokens": tokens, "grid": grid, "label_tokens": n_labels}


def continue_schedule(scheduler) -> None:
    """Set the resumed step's learning rate from this run's schedule. A checkpoint holds the rate its
    own schedule gave next (0 at the end of a finished cosine run): right only while --max_steps is
    unchanged, where both are the same float (base_lr * lambda(step), as LambdaLR computes it)."""
    if hasattr(scheduler, "lr_lambdas"):  # every transformers schedule but reduce_lr_on_plateau
        lrs = [base * f(scheduler.last_epoch) for f, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
        for group, lr in zip(scheduler.optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs


def main(argv=None):
    """The loop; a usage or input problem raises `common.cli.UsageError` (one message, exit status 2)."""
    # ------------------------------------------------------------------ setup
    args = targs.parse(argv)  # args.model, .method, .data, .train, .output
    resolved, problems = targs.resolve(args)
    if problems:
        raise cli.problems_error("train_sft.py", problems)
    output_dir = args.output.output_dir
    torch.manual_seed(args.train.seed)
    bf16, ds_cfg = resolved.bf16, resolved.deepspeed
    rank, world, device = 0, 1, "cuda" if torch.cuda.is_available() else "cpu"
    if args.train.deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
    main_process = rank == 0
    model_path = resolve_model_path(args.model.model_name_or_path)
    base_id = args.model.model_name_or_path or EMBEDDED  # the increment records the id users load, not our cache path
    targs.check_targets(model_path, args.method, args.model.embeddings_on_host)  # meta: before any weight is read

    try:  # the data is settled with the tokenizer alone, before a multi-GB model load
        train_set, eval_set, data_report = build_datasets(args.data, load_tokenizer(model_path), args.train.seed,
                                                            verbose=main_process)
    except (ValueError, FileNotFoundError) as e:
        raise cli.UsageError(f"train_sft.py: {e}") from None  # the data errors name their file (and line)
    dtype = torch.bfloat16 if bf16 else torch.float32
    if quantized.enabled(args.model):  # QSIFT / QLoRA: the base straight into 4 bits on the device
        model, tokenizer = quantized.load(model_path, args, dtype, device)
    else:
        model, tokenizer = load_model_and_tokenizer(model_path, dtype=dtype,
                                                    device="cpu" if resolved.zero3 else device)  # ZeRO-3 places it
    if args.train.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    if args.train.offload_activations:
        offload.enable(model)
    engine = ds.initialize(model, ds_cfg) if ds_cfg else None
    method = methods.build(model, args)
    if args.model.embeddings_on_host:
        try:
            offload.embeddings_on_host(unwrap(method.model))
        except ValueError as e:
            raise cli.UsageError(f"train_sft.py: --embeddings_on_host: {e}") from None
    model, opt = method.model, method.opt
    per_epoch = micro_batches_per_epoch(len(train_set), args.train.per_device_train_batch_size * world)
    total_steps = targs.total_steps(args, per_epoch)
    from transformers import get_scheduler

    scheduler = get_scheduler(args.train.lr_scheduler_type, opt,
                              num_warmup_steps=int(args.train.warmup_ratio * total_steps), num_training_steps=total_steps)
    candidates = []
    if args.output.resume_from_checkpoint:
        candidates = resume_candidates(output_dir, args.output.resume_from_checkpoint,
                                       rundir.run_info(output_dir).get("run_id"), warn=main_process)
    run_args = targs.record(args, bf16, resolved_model_path=model_path, total_steps=total_steps, device=device,
                              deepspeed_config=ds_cfg, data_report=data_report)
    run_id = None
    if main_process:  # the old run's files go before this run writes its first one
        run_id = rundir.start(output_dir, candidates[0] if candidates else None)
        write_json_atomic(os.path.join(output_dir, "args.json"), {**run_args, "run_id": run_id})

    start_step, before = 0, None
    for ckpt in candidates:  # newest first; a payload that fails to load falls back to the one before
        try:
            method.load_payload(ckpt)
            state = load_state(ckpt)
            scheduler.load_state_dict(state["scheduler"])
            continue_schedule(scheduler)
        except Exception as e:  # noqa: BLE001  whatever a damaged file raises (OSError, SafetensorError, ...)
            if args.output.resume_from_checkpoint != "latest" or ckpt == candidates[-1]:
                raise SystemExit(f"train_sft.py: cannot resume from {ckpt}: {type(e).__name__}: {e}") from None
            print(f"warning: skipping {ckpt}: its payload fails to load ({type(e).__name__}: {e})", file=sys.stderr)
            continue
        start_step, before = state["step"], state.get("before")  # the base model's figures, from the first run
        torch.set_rng_state(torch.tensor(state["rng"], dtype=torch.uint8))
        print(f"resumed from {ckpt} at step {start_step}")
        break
    pad_id = tokenizer.pad_token_id
    gen_prompt = eval_set[0]["prompt_ids"]

    def evaluate() -> float:
        return heldout_loss(model, eval_set, pad_id, args.train.per_device_eval_batch_size, device)

    def measure():
        out = {"heldout_loss": evaluate()}
        if args.output.generate_tokens:
            out["sample"] = sample_generation(model, tokenizer, gen_prompt, args.output.generate_tokens, device)
        return out

    if before is None:
        before = measure()
    if main_process:
        print(f"before: {json.dumps(before, ensure_ascii=False)}")

    # ------------------------------------------------------------------ train
    log = Logger(output_dir, args.output.report_to, resume_step=start_step, run_name=targs.run_name(args.output),
                 config=args.groups()) if main_process else None
    if main_process and args.output.eval_steps and start_step == 0:
        log.write({"step": 0, "eval_loss": before["heldout_loss"]})
    distributed = world > 1

    def checkpoint(done: int) -> str:
        path = os.path.join(output_dir, f"checkpoint-{done}")
        if main_process:  # SIFT's state is replicated: one rank writes it
            state = {"step": done, "run_id": run_id, "scheduler": scheduler.state_dict(),
                     "rng": torch.get_rng_state().tolist(), "before": before}
            path = save_checkpoint(output_dir, done, lambda tmp: method.save_payload(tmp, base_id),
                                   state, args.output.save_total_limit, args=run_args)
        if distributed:
            dist.barrier()
        return path

    def stop(status: str, done: int, message: str, code: int):
        interrupts.restore()
        if main_process:
            log.close()
            rundir.set_status(output_dir, run_id, status, done)
            print(message, file=sys.stderr, flush=True)
        raise SystemExit(code)

    interrupts = Interrupts().install()  # from here on a signal means: checkpoint at the next step boundary
    if start_step < total_steps and interrupts.requested(distributed):
        stop("interrupted", start_step, f"{interrupts.name} before the first step: nothing new to save", interrupts.exit_code)
    skip_limit = args.train.max_skipped_steps * total_steps
    last_loss = None  # of the last step of this process (none when resumed at the end)
    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, desc="train",
               dynamic_ncols=True, disable=not main_process)
    window_loss, window_start, window_cpu, counts = 0.0, time.perf_counter(), time.process_time(), Counter()
    comm_at_start = getattr(opt, "comm_bytes", 0)
    postfix = {}
    model.train()
    try:
        for step in bar:
            micro = batches_for_window(train_set, step, args.train.per_device_train_batch_size,
                                       args.train.gradient_accumulation_steps, args.train.seed, pad_id, rank, world,
                                       packed=args.data.packing)
            loss, seen = train_window(model, micro, device, engine)
            grad_norm = method.step()
            scheduler.step()
            last_loss = loss
            window_loss += loss
            counts.update(tokens=seen["tokens"] * world, grid=seen["grid"] * world, labels=seen["label_tokens"])
            done = step + 1
            if main_process and (done % args.output.logging_steps == 0 or done == total_steps):
                n = done % args.output.logging_steps or args.output.logging_steps
                elapsed = time.perf_counter() - window_start
                row = {"step": done, "loss": window_loss / n, "lr": scheduler.get_last_lr()[0],
                       "grad_norm": grad_norm, "tokens_per_s": counts["tokens"] / elapsed,
                       "label_tokens": counts["labels"], "label_tokens_per_s": counts["labels"] / elapsed,
                       "padding_share": 1 - counts["tokens"] / counts["grid"], "seconds": elapsed,
                       # CPU seconds of this process: steadier than wall time on a shared machine
                       "cpu_seconds": time.process_time() - window_cpu, **memory_stats(device)}
                if hasattr(opt, "skipped_steps"):
                    row["skipped_steps"] = opt.skipped_steps
                if world > 1:
                    row["allreduce_bytes_per_step"] = (opt.comm_bytes - comm_at_start) / n
                    comm_at_start = opt.comm_bytes
                log.write(row)
                postfix.update(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
                bar.set_postfix(postfix)
                window_loss, window_start, window_cpu, counts = 0.0, time.perf_counter(), time.process_time(), Counter()
            # held-out loss every --eval_steps; the last one is "after"
            if args.output.eval_steps and done % args.output.eval_steps == 0 and done < total_steps:
                eval_loss = evaluate()  # every rank: ZeRO-3 gathers need them all
                if main_process:
                    log.write({"step": done, "eval_loss": eval_loss})
                    postfix["eval_loss"] = f"{eval_loss:.4f}"
                    bar.set_postfix(postfix)
                window_start, window_cpu = time.perf_counter(), time.process_time()  # throughput leaves evaluation out
            if getattr(opt, "skipped_steps", 0) > skip_limit:  # replicated count: every rank stops here alike
                stop("failed", done, f"train_sft.py: {opt.skipped_steps} of {done} steps skipped for non-finite "
                     f"gradients, more than --max_skipped_steps {args.train.max_skipped_steps} of {total_steps}: "
                     "the run diverges (lower --learning_rate?); no merged model written", 1)
            interrupted = interrupts.requested(distributed)
            # the final checkpoint too: a finished run can be extended with a larger --max_steps
            if (args.output.save_steps and done % args.output.save_steps == 0) or done == total_steps or interrupted:
                saved = checkpoint(done)
                if interrupted:
                    stop("interrupted", done, f"{interrupts.name} at step {done} of {total_steps}: saved {saved}; "
                         "resume with the same command and --resume_from_checkpoint latest", interrupts.exit_code)

        # ------------------------------------------------------------------ save
        after = measure()
        if main_process and args.output.eval_steps:
            log.write({"step": total_steps, "eval_loss": after["heldout_loss"]})
    finally:
        interrupts.restore()
        if log is not None:
            log.close()  # flushes and closes TensorBoard / W&B, also on an error
    if main_process and hasattr(opt, "skipped_steps"):
        print(f"skipped steps (non-finite gradients): {opt.skipped_steps} of {total_steps}")
    if not (math.isfinite(after["heldout_loss"]) and (last_loss is None or math.isfinite(last_loss))):
        stop("failed", total_steps, f"train_sft.py: the loss is not finite at the end (held-out {after['heldout_loss']}, "
             f"last step {last_loss}): the run diverged (lower --learning_rate?); no merged model written", 1)
    with ds.gathered(model):  # ZeRO-3: every rank takes part in the gather
        if main_process:
            print(f"after: {json.dumps(after, ensure_ascii=False)}")
            method.save_final(output_dir, tokenizer, base_id)
            if method.memory_report():
                print(f"memory: {json.dumps(method.memory_report())}")
            write_json_atomic(os.path.join(output_dir, "results.json"),
                              {"before": before, "after": after, "steps": total_steps})
            plot_loss(output_dir)
            rundir.set_status(output_dir, run_id, "finished", total_steps)  # last: the completion marker
            print(f"saved to {output_dir}")
    if world > 1:
        dist.barrier()
    return before, after


if __name__ == "__main__":
    sys.exit(cli.run(main))
