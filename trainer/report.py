"""What a run leaves for people: the JSONL log (+ TensorBoard / W&B) and what its rows sum, memory
figures, the sample generation, the plot."""
from __future__ import annotations

import json
import os
import resource
import time
from collections import Counter

import torch

from common.atomic import atomic_path, atomic_write

from .args import split_list
from .rundir import LOG, read_log


def write_json_atomic(path: str, obj) -> None:
    atomic_write(path, [json.dumps(obj, indent=1, default=str, ensure_ascii=False)])


def memory_stats(device: str) -> dict:
    """Peak memory since the last call: allocator figures on CUDA, process peak RSS on the CPU."""
    if device.startswith("cuda"):
        stats = {"peak_allocated_mb": torch.cuda.max_memory_allocated() / 2**20,
                 "peak_reserved_mb": torch.cuda.max_memory_reserved() / 2**20}
        torch.cuda.reset_peak_memory_stats()
        return stats
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


class Meter:
    """What a training row of the log sums since the previous row: the steps' losses, their tokens
    (real and padded, summed over ranks; label tokens), the wall and CPU time (evaluations left out),
    the bytes the method communicated."""

    def __init__(self, sent: int = 0):
        self.sent = sent  # the method's communicated bytes at the previous row
        self.reset()

    def reset(self) -> None:
        self.steps, self.loss, self.counts = 0, 0.0, Counter()
        self.restart_clock()

    def restart_clock(self) -> None:
        """After an evaluation: throughput leaves it out."""
        self.start, self.cpu = time.perf_counter(), time.process_time()

    def add(self, loss: float, seen: dict, world: int) -> None:
        """One optimizer step: its loss and trainer.loss.train_window's counts of this rank."""
        self.steps += 1
        self.loss += loss
        self.counts.update(tokens=seen["tokens"] * world, grid=seen["grid"] * world, labels=seen["label_tokens"])

    def row(self, step: int, lr: float, grad_norm: float, device: str, skipped: int | None = None,
            sent: int | None = None) -> dict:
        """The row of `step` (means over the steps since the previous row, whose sums it restarts);
        `skipped`: the method's skipped steps so far, `sent`: its communicated bytes so far."""
        elapsed, n, counts = time.perf_counter() - self.start, max(self.steps, 1), self.counts
        row = {"step": step, "loss": self.loss / n, "lr": lr, "grad_norm": grad_norm,
               "tokens_per_s": counts["tokens"] / elapsed, "label_tokens": counts["labels"],
               "label_tokens_per_s": counts["labels"] / elapsed, "padding_share": 1 - counts["tokens"] / counts["grid"],
               "seconds": elapsed,
               # CPU seconds of this process: steadier than wall time on a shared machine
               "cpu_seconds": time.process_time() - self.cpu, **memory_stats(device)}
        if skipped is not None:
            row["skipped_steps"] = skipped
        if sent is not None:
            row["allreduce_bytes_per_step"] = (sent - self.sent) / n
            self.sent = sent
        self.reset()
        return row


@torch.no_grad()
def sample_generation(model, tokenizer, prompt_ids, max_new_tokens, device) -> str:
    """The greedy continuation of `prompt_ids` (the before / after sample of results.json)."""
    model.eval()
    ids = torch.tensor([prompt_ids], device=device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id)
    model.train()
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


class Logger:
    """train_log.jsonl, one object per logged row (train rows, and `eval_loss` rows); on resume, rows
    past the checkpoint are dropped. TensorBoard / W&B get the same numbers: train rows under
    `train/<key>`, held-out ones under `eval/loss`."""

    def __init__(self, output_dir: str, report_to: str, resume_step: int = 0, run_name: str | None = None,
                 config: dict | None = None):
        self.path = os.path.join(output_dir, LOG)
        rows = read_log(output_dir, resume_step) if resume_step else []
        atomic_write(self.path, (json.dumps(r) + "\n" for r in rows))  # a kill here keeps the old log
        run_name = run_name or os.path.basename(os.path.abspath(output_dir))
        self.tensorboard = self.wandb = None
        for backend in split_list(report_to):
            if backend == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: a resumed run replaces the events past its checkpoint, as in the JSONL
                self.tensorboard = SummaryWriter(os.path.join(output_dir, "runs", run_name),
                                                 purge_step=resume_step + 1 if resume_step else None)
            elif backend == "wandb":
                import wandb

                self.wandb = wandb.init(dir=output_dir, name=run_name, config=config, resume="allow",
                                        id=_wandb_id(output_dir, run_name))

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        scalars = {_tag(k): v for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tensorboard is not None:
            for tag, value in scalars.items():
                self.tensorboard.add_scalar(tag, value, row["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=row["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.flush()
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.tensorboard = self.wandb = None


def _tag(key: str) -> str:
    return "eval/loss" if key == "eval_loss" else f"train/{key}"


def _wandb_id(output_dir: str, run_name: str) -> str:
    """One W&B run per output directory, so a resumed run continues its curves."""
    import hashlib

    return hashlib.sha1(f"{os.path.abspath(output_dir)}:{run_name}".encode()).hexdigest()[:16]


def plot_loss(output_dir: str) -> str | None:
    """loss.png from train_log.jsonl (see `loss_figure`)."""
    rows = read_log(output_dir)
    if not any("loss" in r or "eval_loss" in r for r in rows):
        return None
    import matplotlib.pyplot as plt

    fig = loss_figure(rows, os.path.basename(os.path.abspath(output_dir)))
    out = os.path.join(output_dir, "loss.png")
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return out


def loss_figure(rows: list[dict], title: str):
    """Training and held-out loss against the optimizer step (integer ticks), the learning rate on
    a second axis, one legend for the three."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    train = [r for r in rows if "loss" in r]
    held = [r for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    lines = ax.plot([r["step"] for r in train], [r["loss"] for r in train], marker=".", label="train loss")
    if held:
        lines += ax.plot([r["step"] for r in held], [r["eval_loss"] for r in held], marker="o",
                         label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over label tokens)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if train:
        lr_ax = ax.twinx()
        lines += lr_ax.plot([r["step"] for r in train], [r["lr"] for r in train], color="gray", alpha=0.5,
                            label="learning rate")
        lr_ax.set_ylabel("learning rate")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))  # 2.0 and "1e-4" above, not 0.000200
    # under the axes: inside, it would hide a curve whichever corner it took
    ax.legend(lines, [line.get_label() for line in lines], loc="upper center", bbox_to_anchor=(0.5, -0.2),
              ncol=len(lines), fontsize="small", frameon=False)
    ax.set_title(title)
    fig.tight_layout()
    return fig
