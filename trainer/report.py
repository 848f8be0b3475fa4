"""What a run leaves for people: the JSONL log (+ TensorBoard / W&B), memory figures, plot, model."""
from __future__ import annotations

import json
import os
import resource

import torch

from common.atomic import atomic_dir, atomic_write

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


class Logger:
    """train_log.jsonl, one object per logged step; on resume, rows past the checkpoint are dropped."""

    def __init__(self, output_dir: str, report_to: str, resume_step: int = 0):
        self.path = os.path.join(output_dir, LOG)
        rows = read_log(output_dir, resume_step) if resume_step else []
        atomic_write(self.path, (json.dumps(r) + "\n" for r in rows))  # a kill here keeps the old log
        self.sinks = []
        for backend in split_list(report_to):
            if backend == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(os.path.join(output_dir, "runs"))
                self.sinks.append(lambda row, w=writer: [w.add_scalar(f"train/{k}", v, row["step"])
                                                         for k, v in row.items() if isinstance(v, (int, float))])
            elif backend == "wandb":
                import wandb

                wandb.init(dir=output_dir)
                self.sinks.append(lambda row: wandb.log(row, step=row["step"]))

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for sink in self.sinks:
            sink(row)

    def close(self) -> None:
        self.sinks = []


def plot_loss(output_dir: str) -> str | None:
    """loss.png from train_log.jsonl (training loss and learning rate against step)."""
    rows = read_log(output_dir)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker=".", label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over label tokens)")
    lr_ax = ax.twinx()
    lr_ax.plot([r["step"] for r in rows], [r["lr"] for r in rows], color="gray", alpha=0.5, label="lr")
    lr_ax.set_ylabel("learning rate")
    ax.set_title(os.path.basename(os.path.abspath(output_dir)))
    fig.tight_layout()
    out = os.path.join(output_dir, "loss.png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def save_merged(model, tokenizer, target: str) -> None:
    """save_pretrained + tokenizer into a temp directory, then renamed into place (0644 files)."""
    with atomic_dir(target, prefix=".merged-") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
