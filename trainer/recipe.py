"""The training loop as a recipe: setup -> train -> save, each part a method a test can call.

    recipe = Recipe(args, plan)     # plan = trainer.validate.resolve(args): the options are valid
    recipe.setup()                  # ranks, data, model + method, schedule, output directory, resume, "before"
    recipe.train()                  # optimizer steps, log rows, held-out losses, checkpoints; a signal or
                                    # divergence ends the process here (SystemExit, run.json says why)
    recipe.save()                   # the method's final files, results.json, loss.png; run.json "finished"

setup() runs, in order: setup_distributed, setup_data, setup_model, setup_schedule, start_run,
resume, measure_before. train() runs step(i) (one optimizer step) and after_step(i + 1) (log_row,
evaluate when eval_due, check_skipped, checkpoint when checkpoint_due or a signal came) per step.
Every rank runs every part; only the main process writes files and prints.
"""
from __future__ import annotations

import json
import math
import os
import sys

import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from common.cli import UsageError
from common.modeling import load_tokenizer

from . import ds, offload, rundir
from .args import Arguments, record, run_name, total_steps
from .checkpoint import begin_checkpoint, finish_checkpoint, load_state, resume_candidates
from .data import batches_for_window, build_datasets, micro_batches_per_epoch
from .interrupts import Interrupts
from .loss import heldout_loss, train_window, unwrap
from .report import Logger, Meter, plot_loss, sample_generation, write_json_atomic
from .validate import Plan, base_model


class Recipe:
    """One training run of valid options (`plan`); its state lives in the attributes the parts set."""

    def __init__(self, args: Arguments, plan: Plan):
        self.args, self.plan, self.base_model = args, plan, base_model(args)
        self.rank, self.world, self.device = 0, 1, "cuda" if torch.cuda.is_available() else "cpu"
        self.engine, self.candidates, self.run_id, self.log, self.bar = None, [], None, None, None
        self.start_step, self.before, self.after, self.last_loss, self.grad_norm = 0, None, None, None, None
        self.meter, self.interrupts, self.postfix = Meter(), Interrupts(), {}

    @property
    def main_process(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    # ================================================================== setup
    def setup(self) -> None:
        torch.manual_seed(self.args.train.seed)
        self.setup_distributed()
        self.setup_data()
        self.setup_model()
        self.setup_schedule()
        self.start_run()
        self.resume()
        self.measure_before()

    def setup_distributed(self) -> None:
        """Under --deepspeed: the process group (the launcher's ranks) and this rank's device."""
        if not self.plan.deepspeed:
            return
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if self.device == "cuda" else "gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if self.device == "cuda":
            self.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(self.device)

    def setup_data(self) -> None:
        """The tokenizer and the samples, settled before a multi-GB model load."""
        self.tokenizer = load_tokenizer(self.plan.model_path)
        self.pad_id = self.tokenizer.pad_token_id
        try:
            self.train_set, self.eval_set, self.data_report = build_datasets(
                self.args.data, self.tokenizer, self.args.train.seed, verbose=self.main_process)
        except (ValueError, FileNotFoundError) as e:
            raise UsageError(f"train_sft.py: {e}") from None  # the data errors name their file (and line)

    def setup_model(self) -> None:
        """The weights as the method trains them (4-bit for QSIFT / QLoRA), the memory options,
        DeepSpeed's engine (ZeRO-3 partitions the weights here) and the method (hooks, optimizer)."""
        args, plan = self.args, self.plan
        dtype = torch.bfloat16 if plan.bf16 else torch.float32
        model = plan.method.load(plan.model_path, args, dtype, "cpu" if plan.zero3 else self.device)  # ZeRO-3 places it
        if args.train.gradient_checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
        if args.train.offload_activations:
            offload.enable(model)
        self.engine = ds.initialize(model, plan.deepspeed) if plan.deepspeed else None
        self.method = plan.method(model, args)
        self.model = self.method.model
        if args.model.embeddings_on_host:  # the validator has ruled out a trained or tied table
            offload.embeddings_on_host(unwrap(self.model))

    def setup_schedule(self) -> None:
        """The run's length in optimizer steps and the learning-rate schedule over it."""
        from transformers import get_scheduler

        train = self.args.train
        per_epoch = micro_batches_per_epoch(len(self.train_set), train.per_device_train_batch_size * self.world)
        self.total_steps = total_steps(self.args, per_epoch)
        self.scheduler = get_scheduler(train.lr_scheduler_type, self.method.opt, num_training_steps=self.total_steps,
                                       num_warmup_steps=int(train.warmup_ratio * self.total_steps))

    def start_run(self) -> None:
        """The output directory: the checkpoints to resume are found, the previous run's files go
        (before this run writes its first one), run.json and args.json are written (main process)."""
        output = self.args.output
        if output.resume_from_checkpoint:
            self.candidates = resume_candidates(output.output_dir, output.resume_from_checkpoint,
                                                rundir.run_info(output.output_dir).get("run_id"), warn=self.main_process)
        self.run_args = record(self.args, self.plan.bf16, resolved_model_path=self.plan.model_path,
                               total_steps=self.total_steps, device=self.device, deepspeed_config=self.plan.deepspeed,
                               data_report=self.data_report)
        if self.main_process:
            self.run_id = rundir.start(output.output_dir, self.candidates[0] if self.candidates else None)
            write_json_atomic(os.path.join(output.output_dir, "args.json"), {**self.run_args, "run_id": self.run_id})

    def resume(self) -> int:
        """Continue from the newest candidate checkpoint whose payload loads (with 'latest', a damaged
        one falls back to the one before); returns the step to start at."""
        for ckpt in self.candidates:
            try:
                state = self.load_checkpoint(ckpt)
            except Exception as e:  # noqa: BLE001  whatever a damaged file raises (OSError, SafetensorError, ...)
                if self.args.output.resume_from_checkpoint != "latest" or ckpt == self.candidates[-1]:
                    raise SystemExit(f"train_sft.py: cannot resume from {ckpt}: {type(e).__name__}: {e}") from None
                print(f"warning: skipping {ckpt}: its payload fails to load ({type(e).__name__}: {e})", file=sys.stderr)
                continue
            self.start_step, self.before = state["step"], state.get("before")  # the base model's figures, from the first run
            torch.set_rng_state(torch.tensor(state["rng"], dtype=torch.uint8))
            print(f"resumed from {ckpt} at step {self.start_step}")
            break
        return self.start_step

    def load_checkpoint(self, ckpt: str) -> dict:
        """The method's payload and the schedule of `ckpt`; returns its state (trainer.checkpoint)."""
        self.method.load_payload(ckpt)
        state = load_state(ckpt)
        self.scheduler.load_state_dict(state["scheduler"])
        continue_schedule(self.scheduler)
        return state

    def measure_before(self) -> None:
        """The base model's held-out loss (and sample): measured once, carried by every checkpoint."""
        if self.before is None:
            self.before = self.measure()
        if self.main_process:
            print(f"before: {json.dumps(self.before, ensure_ascii=False)}")

    def measure(self) -> dict:
        out = {"heldout_loss": self.heldout()}
        if self.args.output.generate_tokens:
            out["sample"] = sample_generation(self.model, self.tokenizer, self.eval_set[0]["prompt_ids"],
                                              self.args.output.generate_tokens, self.device)
        return out

    def heldout(self) -> float:
        """The held-out loss (every rank: ZeRO-3 gathers need them all)."""
        return heldout_loss(self.model, self.eval_set, self.pad_id, self.args.train.per_device_eval_batch_size,
                            self.device)

    # ================================================================== train
    def train(self) -> None:
        self.open_log()
        self.interrupts.install()  # from here on a signal means: checkpoint at the next step boundary
        try:
            if self.start_step < self.total_steps and self.interrupts.requested(self.distributed):
                self.stop("interrupted", self.start_step, f"{self.interrupts.name} before the first step: nothing "
                          "new to save", self.interrupts.exit_code)
            self.meter = Meter(self.method.communicated_bytes())
            self.bar = tqdm(range(self.start_step, self.total_steps), initial=self.start_step, total=self.total_steps,
                            desc="train", dynamic_ncols=True, disable=not self.main_process)
            self.model.train()
            for step in self.bar:
                self.step(step)
                self.after_step(step + 1)
            self.after = self.measure()
            if self.main_process and self.args.output.eval_steps:
                self.log.write({"step": self.total_steps, "eval_loss": self.after["heldout_loss"]})
        finally:
            self.cleanup()

    def open_log(self) -> None:
        """train_log.jsonl (+ TensorBoard / W&B) on the main process; a fresh run's first row is the
        base model's held-out loss when evaluations are asked for."""
        if not self.main_process:
            return
        output = self.args.output
        self.log = Logger(output.output_dir, output.report_to, resume_step=self.start_step,
                          run_name=run_name(output), config=self.args.groups())
        if output.eval_steps and self.start_step == 0:
            self.log.write({"step": 0, "eval_loss": self.before["heldout_loss"]})

    def step(self, step: int) -> float:
        """Optimizer step `step` (0-based): forward and backward over this rank's share of its
        accumulation window, the method's step, the schedule's; returns the window's loss."""
        train = self.args.train
        micro = batches_for_window(self.train_set, step, train.per_device_train_batch_size,
                                   train.gradient_accumulation_steps, train.seed, self.pad_id, self.rank, self.world,
                                   packed=self.args.data.packing)
        loss, seen = train_window(self.model, micro, self.device, self.engine, boundary=False)
        self.grad_norm = self.method.step()
        ds.finish_step(self.engine)  # after the method's step: ZeRO-3's gathered weights then hold it
        self.scheduler.step()
        self.last_loss = loss
        self.meter.add(loss, seen, self.world)
        return loss

    def after_step(self, done: int) -> None:
        """What follows `done` steps: the log row, the held-out loss, the divergence stop, the checkpoint
        (and the stop a signal asked for)."""
        if self.main_process and (done % self.args.output.logging_steps == 0 or done == self.total_steps):
            self.show(self.log_row(done))
        if self.eval_due(done):
            self.evaluate(done)
        self.check_skipped(done)
        interrupted = self.interrupts.requested(self.distributed)
        if self.checkpoint_due(done) or interrupted:
            saved = self.checkpoint(done)
            if interrupted:
                self.stop("interrupted", done, f"{self.interrupts.name} at step {done} of {self.total_steps}: saved "
                          f"{saved}; resume with the same command and --resume_from_checkpoint latest",
                          self.interrupts.exit_code)

    def log_row(self, done: int) -> dict:
        """The training row of step `done`: means since the previous row, rates, memory, the method's
        skipped steps and (several ranks) the bytes it communicated per step."""
        return self.meter.row(done, self.scheduler.get_last_lr()[0], self.grad_norm, self.device,
                              skipped=self.method.skipped_steps(),
                              sent=self.method.communicated_bytes() if self.distributed else None)

    def show(self, row: dict) -> None:
        """`row` into the log, and its loss (or held-out loss) and rate onto the progress bar."""
        self.log.write(row)
        if "eval_loss" in row:
            self.postfix["eval_loss"] = f"{row['eval_loss']:.4f}"
        else:
            self.postfix.update(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
        if self.bar is not None:
            self.bar.set_postfix(self.postfix)

    def eval_due(self, done: int) -> bool:
        """A held-out loss every --eval_steps; the one at the end is "after"."""
        every = self.args.output.eval_steps
        return bool(every) and done % every == 0 and done < self.total_steps

    def evaluate(self, done: int) -> float:
        eval_loss = self.heldout()
        if self.main_process:
            self.show({"step": done, "eval_loss": eval_loss})
        self.meter.restart_clock()  # throughput leaves evaluation out
        return eval_loss

    def check_skipped(self, done: int) -> None:
        """Stop (exit 1, no merged model) when the method skipped more than --max_skipped_steps of the
        steps for non-finite gradients (a replicated count: every rank stops here alike)."""
        skipped, share = self.method.skipped_steps() or 0, self.args.train.max_skipped_steps
        if skipped > share * self.total_steps:
            self.stop("failed", done, f"train_sft.py: {skipped} of {done} steps skipped for non-finite gradients, "
                      f"more than --max_skipped_steps {share} of {self.total_steps}: the run diverges (lower "
                      "--learning_rate?); no merged model written", 1)

    def checkpoint_due(self, done: int) -> bool:
        """Every --save_steps, and at the end: a finished run can be extended with a larger --max_steps."""
        every = self.args.output.save_steps
        return bool(every) and done % every == 0 or done == self.total_steps

    def checkpoint(self, done: int) -> str:
        """checkpoint-<done>: the method's payload, the schedule, the RNG and the "before" figures.
        Every rank takes part (a sharded run's state is written by each rank into the main process's
        temp directory); the main process completes it."""
        output = self.args.output
        tmp = begin_checkpoint(output.output_dir, done) if self.main_process else None
        if self.distributed:
            shared = [tmp]
            dist.broadcast_object_list(shared)  # one file system: every rank writes into the same directory
            tmp = shared[0]
        self.method.save_payload(tmp, self.base_model, self.main_process)
        if self.distributed:
            dist.barrier()
        path = os.path.join(output.output_dir, f"checkpoint-{done}")
        if self.main_process:
            state = {"step": done, "run_id": self.run_id, "scheduler": self.scheduler.state_dict(),
                     "rng": torch.get_rng_state().tolist(), "before": self.before}
            path = finish_checkpoint(output.output_dir, done, tmp, state, output.save_total_limit, args=self.run_args)
        if self.distributed:
            dist.barrier()
        return path

    def stop(self, status: str, done: int, message: str, code: int):
        """End the process: run.json gets `status` (interrupted: resumable; failed: no merged model)."""
        self.cleanup()
        if self.main_process:
            rundir.set_status(self.args.output.output_dir, self.run_id, status, done)
            print(message, file=sys.stderr, flush=True)
        raise SystemExit(code)

    def cleanup(self) -> None:
        """The signal handlers back; the log flushed and closed (TensorBoard / W&B too), also on an error."""
        self.interrupts.restore()
        if self.log is not None:
            self.log.close()

    # ================================================================== save
    def save(self) -> None:
        """A finished run's files (refused when the loss is not finite); run.json "finished" last."""
        skipped = self.method.skipped_steps()
        if self.main_process and skipped is not None:
            print(f"skipped steps (non-finite gradients): {skipped} of {self.total_steps}")
        held, last = self.after["heldout_loss"], self.last_loss  # last: none when resumed at the end
        if not (math.isfinite(held) and (last is None or math.isfinite(last))):
            self.stop("failed", self.total_steps, f"train_sft.py: the loss is not finite at the end (held-out "
                      f"{held}, last step {last}): the run diverged (lower --learning_rate?); no merged model written", 1)
        self.method.save_final(self.args.output.output_dir, self.tokenizer, self.base_model, self.main_process)
        if self.main_process:  # every rank took part in the method's gathers (ZeRO-3)
            self.write_outputs()
        if self.distributed:
            dist.barrier()

    def write_outputs(self) -> None:
        output_dir = self.args.output.output_dir
        print(f"after: {json.dumps(self.after, ensure_ascii=False)}")
        report = self.method.memory_report()
        if report:
            print(f"memory: {json.dumps(report)}")
        write_json_atomic(os.path.join(output_dir, "results.json"),
                          {"before": self.before, "after": self.after, "steps": self.total_steps})
        plot_loss(output_dir)
        rundir.set_status(output_dir, self.run_id, "finished", self.total_steps)  # last: the completion marker
        print(f"saved to {output_dir}")


def continue_schedule(scheduler) -> None:
    """Set the resumed step's learning rate from this run's schedule. A checkpoint holds the rate its
    own schedule gave next (0 at the end of a finished cosine run): right only while --max_steps is
    unchanged, where both are the same float (base_lr * lambda(step), as LambdaLR computes it)."""
    if isinstance(scheduler, LambdaLR):  # every transformers schedule but reduce_lr_on_plateau
        lrs = [base * f(scheduler.last_epoch) for f, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
        for group, lr in zip(scheduler.optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs
