"""The training loop as a recipe: setup -> train -> save, each part a method a test can call.

    recipe = Recipe(args, plan)     # plan = trainer.validate.resolve(args): the options are valid
    with recipe.running():          # the output directory's lock; however the run ends early, run.json says so
        recipe.setup()              # ranks, data, model + method, schedule, output directory, resume, "before"
        recipe.train()              # optimizer steps, log rows, held-out losses, checkpoints; a signal or
                                    # divergence ends the process here (SystemExit, run.json says why)
        recipe.save()               # the method's final files, results.json, loss.png; run.json "finished"

setup() runs, in order: setup_distributed, setup_data, setup_model, setup_schedule, start_run,
resume, measure_before. train() runs step(i) (one optimizer step) and after_step(i + 1) (log_row,
evaluate when eval_due, check_skipped, checkpoint when checkpoint_due or a signal came) per step.
Every rank runs every part; only the main process writes files and prints. `running()` holds the
output directory's lock around them and turns an early end (a signal outside the step loop, a write
that fails: a full disk) into one line, run.json's "interrupted" / "failed" and the exit status
(130 / 143, 1), with where to resume from.
"""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
import sys
from contextlib import contextmanager

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from common.cli import UsageError
from common.modeling import load_tokenizer

from . import ds, offload, rundir, tiled_decoder
from .args import Arguments, record, run_name, total_steps, warmup_steps
from .checkpoint import begin_checkpoint, finish_checkpoint, load_args, load_state, resume_candidates
from .data import batches_for_window, build_datasets, micro_batches_per_epoch
from .interrupts import Interrupts, Signalled, raising
from .loss import heldout_loss, train_window, unwrap
from .report import Logger, Meter, plot_loss, sample_generation, write_json_atomic
from .validate import Plan, base_model, claim_output_dir, run_inputs


class Recipe:
    """One training run of valid options (`plan`); its state lives in the attributes the parts set."""

    def __init__(self, args: Arguments, plan: Plan):
        self.args, self.plan, self.base_model = args, plan, base_model(args)
        self.rank, self.world, self.device = 0, 1, "cuda" if torch.cuda.is_available() else "cpu"
        self.engine, self.candidates, self.run_id, self.log, self.bar = None, [], None, None, None
        self.start_step, self.before, self.after, self.last_loss, self.grad_norm = 0, None, None, None, None
        self.lr = None  # the learning rate the last step used
        self.meter, self.interrupts, self.postfix = Meter(), Interrupts(), {}
        self.phase, self.done = "start-up", 0  # where the run is, for the line an early end prints

    @property
    def main_process(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @contextmanager
    def running(self):
        """The block (setup -> train -> save) owns the output directory: its lock is held (a second run
        into it is refused, naming this process), a signal outside the step loop stops the process where
        it is, and an early end leaves run.json saying so, with one line and the exit status."""
        with claim_output_dir(self.args, self.plan), raising():
            try:
                yield self
            except BaseException as e:
                self.ended_early(e)
                raise

    def ended_early(self, e: BaseException) -> None:
        """The line, run.json's status and the exit status of a run that ends before its last file:
        a signal (Signalled / Ctrl-C: "interrupted", 128 + the signal), a failed write (a full disk) or
        another OSError ("failed", 1), each with where to resume from; a SystemExit keeps its message and
        code (run.json "failed" / "interrupted" if still "running"). Anything else is a bug: run.json
        "failed", and it goes on with its traceback (so do OSErrors with SIFT_TRACEBACK=1)."""
        output_dir = self.args.output.output_dir
        hint = rundir.resume_hint(output_dir, self.run_id) if self.run_id else "nothing was written"
        if isinstance(e, KeyboardInterrupt):
            name = e.args[0] if isinstance(e, Signalled) else "SIGINT"
            self.stop("interrupted", self.done, f"train_sft.py: {name} during {self.phase}: {hint}",
                      128 + getattr(e, "signum", 2))
        if isinstance(e, WriteFailed) or isinstance(e, OSError) and not os.environ.get("SIFT_TRACEBACK"):
            self.stop("failed", self.done, f"train_sft.py: {write_failure(e, output_dir, self.phase)}; {hint}", 1)
        code = e.code if isinstance(e, SystemExit) else 1
        if self.main_process and self.run_id and code not in (0, None) and \
                rundir.run_info(output_dir).get("status") == "running":
            rundir.set_status(output_dir, self.run_id, "interrupted" if code in (130, 143) else "failed", self.done,
                              str(e) if isinstance(e, SystemExit) else f"{type(e).__name__}: {e}")

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
                self.args.data, self.tokenizer, self.args.train.seed, verbose=self.main_process,
                records=self.main_process and self.args.output.verbose)
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
        if args.train.tile_tokens:  # last: the layers' classes swapped on the model as the method built it
            tiled_decoder.enable(unwrap(self.model), args.train.tile_tokens)

    def setup_schedule(self) -> None:
        """The run's length in optimizer steps, the learning-rate schedule over it, and the method's plan
        over it (SIFT's regrow)."""
        from transformers import get_scheduler

        train = self.args.train
        per_epoch = micro_batches_per_epoch(len(self.train_set), train.per_device_train_batch_size * self.world)
        self.total_steps = total_steps(self.args, per_epoch)
        self.scheduler = get_scheduler(train.lr_scheduler_type, self.method.opt, num_training_steps=self.total_steps,
                                       num_warmup_steps=warmup_steps(train, self.total_steps))
        self.method.plan(self.total_steps)

    def start_run(self) -> None:
        """The output directory: the checkpoints to resume are found, the previous run's files go
        (before this run writes its first one), run.json and args.json are written (main process)."""
        output = self.args.output
        if output.resume_from_checkpoint:
            self.candidates = resume_candidates(output.output_dir, output.resume_from_checkpoint,  # warned: validate
                                                rundir.run_info(output.output_dir).get("run_id"), warn=False)
        self.run_args = record(self.args, self.plan.bf16, resolved_model_path=self.plan.model_path,
                               total_steps=self.total_steps, device=self.device, deepspeed_config=self.plan.deepspeed,
                               data_report=self.data_report, inputs=self.inputs())
        if self.main_process:
            self.run_id = rundir.start(output.output_dir, self.candidates[0] if self.candidates else None)
            write_json_atomic(os.path.join(output.output_dir, "args.json"), {**self.run_args, "run_id": self.run_id})

    def inputs(self) -> dict:
        """What args.json records of the model and data files (validate.run_inputs), taken again for
        those that were not on this machine before setup loaded them (a hub model or dataset it
        downloaded); a resumed checkpoint must have been trained on the same (exit 2)."""
        inputs = dict(self.plan.inputs or {})
        if None in inputs.values():
            fresh, _ = run_inputs(self.args, self.plan.model_path)
            inputs.update({flag: fresh.get(flag) for flag, value in inputs.items() if value is None})
            changed = rundir.input_differences(load_args(self.candidates[0]) or {}, record(
                self.args, self.plan.bf16, inputs=inputs)) if self.candidates else []
            if changed:
                raise UsageError(f"train_sft.py: --resume_from_checkpoint {self.candidates[0]}: {changed[0]}")
        return inputs

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
            self.done = self.start_step
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
        self.phase = "training"
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
        self.lr = self.method.opt.param_groups[0]["lr"]  # this step's rate; scheduler.step() sets the next one
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
        self.done = done
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
        """The training row of step `done`: means since the previous row, the learning rate step `done`
        used, rates, memory, the method's skipped steps and (several ranks) the bytes it communicated
        per step."""
        return self.meter.row(done, self.lr, self.grad_norm, self.device,
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
        temp directory); the main process completes it. A failed write, on any rank, fails every rank
        and leaves the previous checkpoints as they were and no temp directory."""
        output = self.args.output
        path = os.path.join(output.output_dir, f"checkpoint-{done}")
        with writing(f"checkpoint-{done}"):
            tmp = begin_checkpoint(output.output_dir, done) if self.main_process else None
            if self.distributed:
                shared = [tmp]
                dist.broadcast_object_list(shared)  # one file system: every rank writes into the same directory
                tmp = shared[0]
            error = None
            try:
                self.method.save_payload(tmp, self.base_model, self.main_process)
            except BaseException as e:
                error = e
            try:
                self.agree(error)  # every rank's part is in tmp, or every rank fails
            except BaseException:
                if self.main_process:  # no rank writes into tmp any more
                    shutil.rmtree(tmp, ignore_errors=True)
                raise
            error = None
            if self.main_process:
                state = {"step": done, "run_id": self.run_id, "scheduler": self.scheduler.state_dict(),
                         "rng": torch.get_rng_state().tolist(), "before": self.before}
                try:
                    path = finish_checkpoint(output.output_dir, done, tmp, state, output.save_total_limit,
                                             args=self.run_args)
                except BaseException as e:
                    error = e
            self.agree(error)
        return path

    def agree(self, error: BaseException | None) -> None:
        """Raise `error` here, and fail every other rank too: each rank calls this at the same point with
        its own outcome, so none waits in a collective for a rank that gave up (the others raise an
        OSError naming the failed rank and its error)."""
        if self.distributed:
            outcomes = [None] * self.world
            dist.all_gather_object(outcomes, None if error is None else describe(error))
            failed = [(rank, what) for rank, what in enumerate(outcomes) if what]
            if error is None and failed:
                error = OSError(errno.EIO, f"on rank {failed[0][0]}: {failed[0][1]}")
        if error is not None:
            raise error

    def stop(self, status: str, done: int, message: str, code: int):
        """End the process: the message, and run.json gets `status` (interrupted: resumable; failed: no
        merged model) once the run has started."""
        self.cleanup()
        if self.main_process:
            print(message, file=sys.stderr, flush=True)
            if self.run_id is not None:
                try:
                    rundir.set_status(self.args.output.output_dir, self.run_id, status, done, message)
                except OSError as e:
                    print(f"warning: {rundir.RUN_FILE} not updated ({e.strerror})", file=sys.stderr)
        raise SystemExit(code)

    def cleanup(self) -> None:
        """The signal handlers back; the log flushed and closed (TensorBoard / W&B too), also on an error."""
        self.interrupts.restore()
        if self.log is not None:
            self.log.close()

    # ================================================================== save
    def save(self) -> None:
        """A finished run's files (refused when the loss is not finite); run.json "finished" last."""
        self.phase = "the final save"
        skipped = self.method.skipped_steps()
        if self.main_process and skipped is not None:
            print(f"skipped steps (non-finite gradients): {skipped} of {self.total_steps}")
        held, last = self.after["heldout_loss"], self.last_loss  # last: none when resumed at the end
        if not (math.isfinite(held) and (last is None or math.isfinite(last))):
            self.stop("failed", self.total_steps, f"train_sft.py: the loss is not finite at the end (held-out "
                      f"{held}, last step {last}): the run diverged (lower --learning_rate?); no merged model written", 1)
        output_dir = self.args.output.output_dir
        if self.main_process:
            print(f"after: {json.dumps(self.after, ensure_ascii=False)}")
        with writing("the final files"):  # every rank takes part in the method's gathers (ZeRO-3)
            error = None
            try:
                self.method.save_final(output_dir, self.tokenizer, self.base_model, self.main_process)
                if self.main_process:
                    write_json_atomic(os.path.join(output_dir, "results.json"),
                                      {"before": self.before, "after": self.after, "steps": self.total_steps})
                    plot_loss(output_dir)
                    report = self.method.memory_report()
                    if report:
                        print(f"memory: {json.dumps(report)}")
                    rundir.set_status(output_dir, self.run_id, "finished", self.total_steps)  # last: the completion marker
                    print(f"saved to {output_dir}")
            except BaseException as e:
                error = e
            self.agree(error)


def continue_schedule(scheduler) -> None:
    """Set the resumed step's learning rate from this run's schedule. A checkpoint holds the rate its
    own schedule gave next (0 at the end of a finished cosine run): right only while --max_steps is
    unchanged, where both are the same float (base_lr * lambda(step), as LambdaLR computes it)."""
    if isinstance(scheduler, LambdaLR):  # every transformers schedule but reduce_lr_on_plateau
        lrs = [base * f(scheduler.last_epoch) for f, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
        for group, lr in zip(scheduler.optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs


class WriteFailed(Exception):
    """A run's file could not be written (a full disk, a failing one): the message says which."""


@contextmanager
def writing(what: str):
    """Errors while writing `what` become WriteFailed naming it: torch.save reports a full disk as a
    RuntimeError from its zip writer (inline_container.cc), safetensors as its own error type."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as e:
        if os.environ.get("SIFT_TRACEBACK"):
            raise
        raise WriteFailed(f"writing {what} failed") from e


def describe(e: BaseException) -> str:
    """An error in one line: an OSError's message and file, else its type and last line."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror + (f": {e.filename}" if e.filename else "")
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[-1][:200]}"


def write_failure(e: BaseException, output_dir: str, phase: str) -> str:
    """One line for a failed write (`writing X failed: no space left on device (N MiB free in DIR once
    the partial files are removed; the error)`, the disk named when it is full) or another OSError
    (`the error, during <phase>`)."""
    cause = e.__cause__ if isinstance(e, WriteFailed) and e.__cause__ is not None else e
    detail = describe(cause)
    if not isinstance(e, WriteFailed):
        return f"{detail} (during {phase})"
    try:
        free = shutil.disk_usage(output_dir).free
    except OSError:
        free = None
    full = getattr(cause, "errno", None) == errno.ENOSPC or "No space left" in detail or (free is not None and free < 2**20)
    where = "" if free is None else f"{free / 2**20:.1f} MiB free in {output_dir} once the partial files are removed; "
    return f"{e}{': no space left on device' if full else ''} ({where}{detail})"
