"""The CUDA paths on one GPU, in one command of at most 8 minutes: `python -m benchmarks.run gpu/check`.

Parts (the experiment's "parts" names which run; each is a function below):

- kernel_parity: bitsandbytes' CUDA kernels against its CPU kernels. The same SIFT run (tiny
  LLaMA, fp32 weights, 3 steps, adamw8bit and adamw) on both devices, trained values compared; and
  the 8-bit kernel alone fed identical tensors on both devices.
- rows: each row of the experiment (a model shape and a benchmarks.methods.Method) built on the
  GPU with random bf16 weights, gradient checkpointing, `seq` tokens x `batch` rows (a row may
  override them), run through the `Trainee.train_step` the planner counts:
  torch.cuda.max_memory_allocated of the first step (SIFT selects there) and of the later ones,
  the median step time, the CUDA kernels one steady step launches (torch.profiler), and the
  planned peak of the same row from the plan experiment the row names (results/plan--NAME.json,
  whose stamp says which commit planned it). The training loss is the trainer's: chunked, or
  Liger's fused linear cross-entropy where liger-kernel is installed (recorded per row).
- long_step: the experiment's "long_step" ({"model", "seq", "method"}: Llama-3.1-8B QSIFT 1 % with
  tiled layers and offloaded activations at 32,768 tokens) for two steps (benchmarks.longest.long_step):
  torch.cuda.max_memory_allocated of the first and the steady step against the scaled plan with
  FlashAttention-2's backward buffers (goal: within 3 %), and the step times.
- zero3: train_sft.py under `deepspeed --num_gpus G ... ds_configs/zero3.json` (G: the GPUs, at most
  2), SIFT and QSIFT nf4, against the plain run with G times the batch (indices equal, the largest
  delta difference), and the one-rank zero3_offload.json run; tiny model, 4 steps, bf16, where
  deepspeed's launcher is installed.

Dry run (`python -m benchmarks.run gpu/check --dry-run`, no GPU needed, in CI): every row runs at
the llama-tiny shape on the CPU, its peak counted by the MemoryTracker and planned live on meta
tensors; long_step runs llama-tiny at 256 tokens in 4 chunks, counted against its plan;
kernel_parity runs its CPU half; zero3 builds its model directory and commands and launches none.
Nothing is written.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from common.cli import UsageError

from . import memory_plan
from .constants import GIB
from .memtrack import MemoryTracker
from .methods import Method, Trainee
from .models import build_model, enable_checkpointing, load_config

DRY_RUN_SHAPE, DRY_RUN_SEQ = "llama-tiny", 64
PARTS = ("kernel_parity", "rows", "long_step", "zero3")
DRY_RUN_LONG = 256  # tokens of the dry run's long step: 4 chunks of 64
RESULTS = Path(__file__).resolve().parent / "results"
EXPERIMENTS = Path(__file__).resolve().parent / "experiments"


def run(parts: list[str], rows: list[dict], seq: int, batch: int, steps: int, dry_run: bool, log=print,
        long: dict | None = None) -> dict:
    """Every part named in `parts` (see the module doc); a dry run builds all on the CPU."""
    problems = [f"unknown part {p!r}: choose among {', '.join(PARTS)}" for p in parts if p not in PARTS]
    problems += row_problems(rows + ([long] if "long_step" in parts else []))
    if problems:
        raise UsageError("gpu: " + "; ".join(problems))
    if not dry_run and not torch.cuda.is_available():
        raise UsageError("gpu: needs a CUDA device (torch.cuda.is_available() is False); "
                         "--dry-run builds every part on the CPU instead")
    device = "cpu" if dry_run else "cuda"
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
           "liger_kernel": importlib.util.find_spec("liger_kernel") is not None}
    for part in parts:
        t0 = time.perf_counter()
        if part == "kernel_parity":
            out["kernel_same_inputs"] = kernel_parity_same_inputs(device)
            out["parity"] = [kernel_parity(o, device) for o in ("adamw8bit", "adamw")]
        elif part == "rows":
            out["rows"] = [measure_row(r, seq, batch, steps, device)
                           for r in tqdm(rows, desc="gpu rows", unit="row", leave=False, disable=None)]
        elif part == "long_step":
            out["long_step"] = long_step(long, device)
        else:
            out["zero3"] = zero3(dry_run)
        log(f"  {part}: {time.perf_counter() - t0:.0f} s")
    return out


def row_problems(rows: list[dict]) -> list[str]:
    """What keeps a row from being built or compared: its Method, its shape, its plan experiment."""
    out = []
    for i, row in enumerate(rows):
        try:
            if not isinstance(row, dict):
                raise TypeError(f"{row!r}: expected {{\"model\", \"method\", ...}}")
            Method(**row["method"])
            load_config(row["model"])
        except (KeyError, TypeError, ValueError) as e:
            out.append(f"row {i}: {type(e).__name__}: {str(e).splitlines()[0]}")
        if row.get("plan") and not (EXPERIMENTS / f"{row['plan']}.json").is_file():
            out.append(f"row {i}: no plan experiment {row['plan']} (experiments/{row['plan']}.json)")
    return out


def long_step(spec: dict, device: str) -> dict:
    """The long-sequence step (benchmarks.longest.long_step) of `spec` on the GPU; in a dry run the
    same method at llama-tiny's shape, DRY_RUN_LONG tokens in 4 chunks, on the CPU (nothing offloaded)."""
    from . import longest

    method = Method(**spec["method"])
    if device == "cuda":
        return longest.long_step(load_config(spec["model"]), method, spec["seq"], "cuda")
    method = dataclasses.replace(method, tile_tokens=DRY_RUN_LONG // 4, offload_activations=False)
    return longest.long_step(load_config(DRY_RUN_SHAPE), method, DRY_RUN_LONG, "cpu")


def parity_devices(device: str) -> tuple[str, ...]:
    return ("cpu", "cuda") if device == "cuda" else ("cpu",)


def kernel_parity(optimizer: str, device: str) -> dict:
    """Trained values after 3 SIFT steps on CPU and on CUDA from the same weights and batches."""
    from sift import SIFT, SIFTConfig

    cfg = load_config(DRY_RUN_SHAPE)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (2, 16), generator=g) for _ in range(3)]
    values, moved = {}, 0.0
    for dev in parity_devices(device):
        model = build_model(cfg).to(dev)  # initialised on the CPU: both devices start from the same weights
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = SIFT(model, SIFTConfig(rate=0.1, optimizer=optimizer, lr=1e-3, selection="magnitude"))
        for ids in batches:
            ids = ids.to(dev)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        values[dev] = {n: v.cpu() for n, v in opt.trained_values().items()}
        moved = max((p.detach() - start[n]).abs().max().item() for n, p in model.named_parameters())
    diff = None
    if "cuda" in values:
        diff = max((values["cpu"][n] - values["cuda"][n]).abs().max().item() for n in values["cpu"])
    return {"optimizer": optimizer, "max_abs_diff_cpu_vs_cuda": diff, "max_abs_update": moved}


def kernel_parity_same_inputs(device: str, steps: int = 3, k: int = 100_000) -> dict:
    """bitsandbytes' 8-bit blockwise AdamW kernel on CPU and CUDA, fed identical tensors."""
    from bitsandbytes import functional as bnbf

    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(k, generator=g) * 1e-3 for _ in range(steps)]
    out = {}
    for dev in parity_devices(device):
        p = torch.linspace(-0.05, 0.05, k, device=dev)
        s1, s2 = (torch.zeros(k, dtype=torch.uint8, device=dev) for _ in range(2))
        a1, a2 = (torch.zeros((k + 255) // 256, device=dev) for _ in range(2))
        q1, q2 = (bnbf.create_dynamic_map(signed=sg).to(dev) for sg in (True, False))
        for i, grad in enumerate(grads, 1):
            bnbf.optimizer_update_8bit_blockwise("adam", grad.to(dev), p, s1, s2, 0.9, 0.999, 0.0, 0.0,
                                                 1e-8, i, 1e-3, q1, q2, a1, a2, weight_decay=0.0)
        out[dev] = (p.cpu(), s1.cpu(), s2.cpu())
    result = {"max_abs_update": (out["cpu"][0] - torch.linspace(-0.05, 0.05, k)).abs().max().item(), "entries": k}
    if "cuda" in out:
        result["max_abs_diff_weights"] = (out["cpu"][0] - out["cuda"][0]).abs().max().item()
        result["state_codes_differing"] = [int((a != b).sum()) for a, b in zip(out["cpu"][1:], out["cuda"][1:])]
    return result


class _Meter:
    """Peak bytes per step: the CUDA allocator's, or on the CPU the MemoryTracker's (entered by
    `counting` around the whole row, so the optimizer's state is seen as it is allocated)."""

    def __init__(self, device: str):
        self.device, self.tracker = device, None

    @contextlib.contextmanager
    def counting(self, model):
        if self.device == "cuda":
            yield
            return
        with MemoryTracker() as self.tracker:
            self.tracker.add(list(model.parameters()) + list(model.buffers()), "params")
            yield

    def reset(self):
        if self.tracker is not None:
            self.tracker.reset_peak()
        else:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int:
        if self.tracker is not None:
            return self.tracker.peak
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()


def measure_row(row: dict, seq: int, batch: int, steps: int, device: str) -> dict:
    """One row: peaks, step times and kernel launches of `steps` steps, beside its plan."""
    method = Method(**row["method"])
    shape = row["model"] if device == "cuda" else DRY_RUN_SHAPE
    seq, batch = (row.get("seq", seq), row.get("batch", batch)) if device == "cuda" else (DRY_RUN_SEQ, 1)
    config = load_config(shape)
    model = build_model(config, device, torch.bfloat16, "sdpa")
    model.config.use_cache = False
    enable_checkpointing(model)
    model.train()
    meter, g = _Meter(device), torch.Generator().manual_seed(0)
    peaks, times = [], []
    with meter.counting(model):
        trainee = Trainee(method, model)
        for _ in range(steps):
            ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g).to(device)
            meter.reset()
            t0 = time.perf_counter()
            trainee.train_step({"input_ids": ids, "labels": ids})
            peaks.append(meter.peak())
            times.append(time.perf_counter() - t0)
    out = {"model": shape, "seq": seq, "batch": batch, "method": method.name,
           "loss": "liger" if device == "cuda" and importlib.util.find_spec("liger_kernel") else "chunked",
           "peak_first_step_gib": peaks[0] / GIB, "peak_later_steps_gib": max(peaks[1:]) / GIB,
           "step_s": sorted(times[1:])[len(times[1:]) // 2], "first_step_s": times[0],
           "kernel_launches_per_step": kernel_launches(trainee, ids) if device == "cuda" else None}
    report = trainee.sift_report()
    if report:
        out.update(sift_state_gib=report["persistent"] / GIB, bytes_per_entry=report["bytes_per_entry"])
    trainee.close()
    del trainee, model
    if device == "cuda":
        torch.cuda.empty_cache()
    out.update(planned(row, method, config, seq, batch, steps, device))
    if out["planned_peak_gib"]:
        out["measured_vs_plan"] = out["peak_later_steps_gib"] / out["planned_peak_gib"] - 1
    return out


def planned(row: dict, method: Method, config, seq: int, batch: int, steps: int, device: str) -> dict:
    """The row's planned peak: from its plan experiment's result on a GPU (device bytes), planned
    live on the CPU in a dry run (device + host bytes: on the CPU both are resident)."""
    if device != "cuda":
        plan = memory_plan.plan(config, method, batch, seq, torch.bfloat16, True, steps=steps)
        return {"planned_peak_gib": plan["peak_with_host"] / GIB, "plan": "planned live (dry run)"}
    if not row.get("plan"):
        return {"planned_peak_gib": None, "plan": None}
    path = RESULTS / f"{row['plan'].replace('/', '--')}.json"
    if not path.is_file():
        return {"planned_peak_gib": None, "plan": f"{path.name}: not found"}
    doc = json.loads(path.read_text())
    peak = next((r["peak"] for r in doc["result"]["rows"] if r["name"] == method.name), None)
    return {"planned_peak_gib": peak / GIB if peak else None, "plan": row["plan"],
            "plan_commit": doc["stamp"].get("commit")}


def kernel_launches(trainee: Trainee, ids: torch.Tensor) -> int:
    """CUDA kernels launched by one steady-state training step (host-bound steps launch many)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        trainee.train_step({"input_ids": ids, "labels": ids})
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")


def zero3(dry_run: bool) -> dict:
    """ZeRO-3 on the CUDA path: SIFT and QSIFT (nf4) under `deepspeed --num_gpus G ... zero3.json`
    (G = the GPUs, at most 2: NCCL from 2) against the plain run with G times the batch, bf16, 4
    steps, fp32 moments: exit codes, equal indices, the largest delta difference; then the one-rank
    zero3_offload.json smoke run. A dry run builds the model directory and every command."""
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    if not os.path.exists(launcher) and not dry_run:
        return {"skipped": "no deepspeed launcher in this environment"}
    gpus = 1 if dry_run else min(torch.cuda.device_count(), 2)
    with tempfile.TemporaryDirectory() as tmp:
        commands = zero3_commands(tmp, launcher, gpus)
        if dry_run:
            return {"skipped": "dry run", "commands": {k: c[1:] for k, c in commands.items()}}
        out = {"gpus": gpus}
        for name, cmd in commands.items():
            t0 = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
            out[name] = {"returncode": done.returncode, "seconds": time.perf_counter() - t0,
                         "tail": (done.stdout + done.stderr)[-1500:] if done.returncode else ""}
        for kind in ("sift", "qsift"):
            out[f"{kind}_vs_plain"] = compare_increments(os.path.join(tmp, f"{kind}_plain"), os.path.join(tmp, kind))
        out["ok"] = all(v["returncode"] == 0 for k, v in out.items() if k in commands) and all(
            out[f"{k}_vs_plain"].get("indices_equal") for k in ("sift", "qsift"))
        return out


def zero3_commands(tmp: str, launcher: str, gpus: int) -> dict[str, list[str]]:
    """The tiny model in `tmp` and the check's commands: {name: argv}, its output directory tmp/name."""
    from common.modeling import load_tokenizer
    from data_prep import BUNDLED_ALPACA

    tok = load_tokenizer(None)
    config = load_config(DRY_RUN_SHAPE)
    config.vocab_size = len(tok)
    model = os.path.join(tmp, "model")
    build_model(config).save_pretrained(model)
    tok.save_pretrained(model)
    flags = ["--model_name_or_path", model, "--data_path", BUNDLED_ALPACA, "--max_steps", "4", "--model_max_length",
             "96", "--eval_samples", "4", "--generate_tokens", "0", "--bf16", "--optim", "adamw", "--sift_rate", "0.05"]
    ds = [launcher, "--num_gpus", str(gpus), "train_sft.py"]
    plain = [sys.executable, "train_sft.py"]
    commands = {}
    for kind, extra in (("sift", []), ("qsift", ["--quantization", "nf4"])):
        commands[f"{kind}_plain"] = plain + flags + extra + ["--per_device_train_batch_size", str(2 * gpus)]
        commands[kind] = ds + flags + extra + ["--per_device_train_batch_size", "2", "--deepspeed",
                                               "ds_configs/zero3.json"]
    commands["offload"] = [launcher, "--num_gpus", "1", "train_sft.py", *flags, "--per_device_train_batch_size",
                           "2", "--deepspeed", "ds_configs/zero3_offload.json"]
    for name, cmd in commands.items():
        cmd += ["--output_dir", os.path.join(tmp, name)]
    return commands


def compare_increments(one: str, other: str) -> dict:
    """Whether two runs' increments hold the same indices, and their largest delta difference."""
    from safetensors.torch import load_file

    try:
        a, b = (load_file(os.path.join(d, "sift_increment.safetensors")) for d in (one, other))
    except OSError as e:
        return {"error": str(e)}
    keys = sorted(k for k in a if ".exact_" not in k)
    same = keys == sorted(k for k in b if ".exact_" not in k)
    return {"indices_equal": same and all(torch.equal(a[k], b[k]) for k in keys if k.endswith(".indices")),
            "max_abs_delta_diff": max((a[k] - b[k]).abs().max().item() for k in keys if k.endswith(".delta"))
            if same else None}
