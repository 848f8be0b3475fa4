"""Peak tensor memory and step time of every method, as ratios to the floor, in one process.

Per method, on a fresh copy of the same weights and the same batches:
  1. `tracked_steps` steps inside a MemoryTracker (step 1 includes SIFT's selection and every
     optimizer's lazy state allocation; the last one is the steady state the tables report);
  2. `timed_steps` steps without the tracker, timed with perf_counter; the median is reported.
With `interleave=True` every method's model stays alive and the timed steps go round-robin (one
step of each method, then the next), so load from other processes on a shared machine hits all
methods alike instead of whichever ran at the wrong minute.
"""
from __future__ import annotations

import copy
import statistics
import time

import torch

from .constants import MIB
from .memtrack import MemoryTracker
from .methods import Method, Trainee
from .models import enable_checkpointing


def track_steps(method: Method, model: torch.nn.Module, batches: list[dict], steps: int,
                tracker=MemoryTracker, accumulation: int = 1) -> tuple[Trainee, list[dict], dict]:
    """Build `method` on `model` and run `steps` steps inside a tracker (so the optimizer's own
    allocations are seen); per-step peak and breakdown, and what is alive after the last step."""
    out = []
    with tracker() as mt:
        mt.add(list(model.parameters()) + list(model.buffers()), "params")
        trainee = Trainee(method, model)
        for step in range(steps):
            mt.reset_peak()
            start, t0 = mt.current, time.perf_counter()
            trainee.train_step(batches[step % len(batches)], mt, accumulation)
            out.append({"peak": mt.peak, "start": start, "breakdown": mt.peak_breakdown(),
                        "seconds_tracked": time.perf_counter() - t0})  # dispatch-mode overhead included
        after = {"bytes": mt.current, "breakdown": mt.breakdown()}
    return trainee, out, after


def run(pristine: torch.nn.Module, batches: list[dict], methods: list[Method], tracked_steps: int = 3,
        timed_steps: int = 3, gradient_checkpointing: bool = False, interleave: bool = True,
        log=print) -> list[dict]:
    """Measure every method (see module doc); returns one result dict per method, floor first."""
    if methods[0].kind != "floor":
        raise ValueError("the first method must be the floor: every ratio is taken against it")
    tokens = batches[0]["input_ids"].numel()
    results, alive = [], []
    for method in methods:
        model = copy.deepcopy(pristine)
        if gradient_checkpointing:
            enable_checkpointing(model)
        model.train()
        trainee, steps, after = track_steps(method, model, batches, tracked_steps)
        for st in steps:  # device bytes: host-resident state (tagged "host") is reported apart, as in the planner
            st["peak_with_host"], st["peak"] = st["peak"], st["peak"] - st["breakdown"]["host"]
        result = {"name": method.name, "method": method.__dict__.copy(), "trainable_entries": trainee.entries,
                  "memory": {"steps": steps, "first_step_peak": steps[0]["peak"],
                             "peak": steps[-1]["peak"], "peak_breakdown": steps[-1]["breakdown"],
                             "max_peak": max(s["peak"] for s in steps), "after_step": after},
                  "sift": trainee.sift_report(),
                  "step_times": [], "step_cpu_times": [], "phase_times": []}
        log(f"  {method.name:34s} peak {steps[-1]['peak'] / MIB:9.1f} MiB "
            f"(first step {steps[0]['peak'] / MIB:9.1f})")
        results.append(result)
        if interleave:
            alive.append((trainee, result))
        else:
            _time(trainee, result, batches, tracked_steps, timed_steps)
            trainee.close()
            del trainee, model
    for i in range(timed_steps if interleave else 0):
        for trainee, result in alive:
            _time(trainee, result, batches, tracked_steps + i, 1)
    for trainee, _ in alive:
        trainee.close()
    for r in results:
        t = r["step_times"]
        r["median_step_s"] = statistics.median(t) if t else None
        r["median_step_cpu_s"] = statistics.median(r["step_cpu_times"]) if t else None
        r["median_phase_s"] = {k: statistics.median(p[k] for p in r["phase_times"])
                               for k in ("forward", "backward", "step")} if t else None
        r["tokens_per_s"] = tokens / r["median_step_s"] if t else None
    add_ratios(results)
    return results


def _time(trainee: Trainee, result: dict, batches: list[dict], first: int, steps: int):
    for step in range(first, first + steps):
        batch = batches[step % len(batches)]
        t0, c0 = time.perf_counter(), time.process_time()
        trainee.train_step(batch)
        result["step_times"].append(time.perf_counter() - t0)
        # CPU seconds of all our threads: less sensitive than wall time to other processes
        # taking the cores, though OpenMP threads spinning at barriers still count
        result["step_cpu_times"].append(time.process_time() - c0)
        result["phase_times"].append(trainee.phase_times)


def add_ratios(results: list[dict]):
    """Ratios to the floor (results[0]) and, for SIFT, its goals: step time <= 1.05 x the floor, peak
    <= the floor + its sparse state, <= 10 B of state per trained entry."""
    floor = results[0]
    fpeak, ftime = floor["memory"]["peak"], floor["median_step_s"]
    for r in results:
        entries = r["trainable_entries"]
        r["peak_vs_floor"] = r["memory"]["peak"] / fpeak
        r["time_vs_floor"] = r["median_step_s"] / ftime if ftime and r["median_step_s"] else None
        fcpu = floor["median_step_cpu_s"]
        r["cpu_time_vs_floor"] = r["median_step_cpu_s"] / fcpu if fcpu and r["median_step_cpu_s"] else None
        state = r["memory"]["after_step"]["breakdown"]["optimizer"]  # incl. SIFT's 2 KiB quantile maps
        r["state_bytes"] = state
        r["state_bytes_per_entry"] = state / entries if entries else None
        r["extra_peak_bytes_per_entry"] = (r["memory"]["peak"] - fpeak) / entries if entries else None
        if r["sift"] is not None:
            rep = r["sift"]
            # persistent state as counted by the tracker + the deferred step's sparse gradients, as SIFT
            # reports them (kept in the weight's dtype until a second micro-batch accumulates: 2 B per
            # entry on bf16 weights, 4 on fp32); in-backward mode holds none past its hook
            grads = 0 if r["method"]["step_in_backward"] else deferred_grad_bytes(rep)
            sparse_state = state + grads
            r["goals"] = {
                "time_le_1.05_floor": r["time_vs_floor"] <= 1.05 if r["time_vs_floor"] else None,
                "sparse_state_bytes": sparse_state,
                "peak_minus_floor_bytes": r["memory"]["peak"] - fpeak,
                "peak_le_floor_plus_sparse_state": r["memory"]["peak"] <= fpeak + sparse_state,
                "bytes_per_entry": rep["bytes_per_entry"],
                "bytes_per_entry_with_grad": rep["bytes_per_entry_with_grad"],
                "bytes_per_entry_le_10": rep["bytes_per_entry"] <= 10,
            }


def deferred_grad_bytes(report: dict) -> int:
    """The deferred step's sparse gradients at the end of backward (no accumulation), from SIFT's
    `memory_report()`: its per-entry figure with them minus the one without."""
    return round((report["bytes_per_entry_with_grad"] - report["bytes_per_entry"]) * report["entries"])
