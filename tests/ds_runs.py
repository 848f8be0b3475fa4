"""Several runs in one `deepspeed --num_gpus N tests/ds_runs.py PLAN.json` launch (each launch costs
~20 s of start-up here): PLAN is a JSON list of jobs, run in order on every rank,

    {"train": [train_sft.py flags], "out": file}    the trainer; `out` gets its exit code and message
                                                    (and "full_disk": one rank's writes fail, see train)
    {"core": {spec}, "out": prefix}                 `core(spec)` under ZeRO-3; each rank writes prefix.rank<r>.pt

`core` is also the one-process reference (tests/test_zero3.py calls it without DeepSpeed).
"""
import json
import os
import sys

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from conftest import batch, tiny_llama  # noqa: E402

REDUCING = ("all_reduce", "reduce_scatter_tensor", "reduce_scatter", "reduce")
MOVING = ("all_to_all_single", "all_gather_into_tensor", "all_gather", "broadcast")


def window(step: int, accum: int) -> list[dict]:
    """The micro-batches of optimizer step `step`: 4 rows each (each of 2 ranks takes every other row)."""
    return [dict(batch(100 * step + j, size=4), attention_mask=torch.ones(4, 12, dtype=torch.long))
            for j in range(accum)]


def zero3(hidden: int, accum: int, world: int) -> dict:
    return {"train_micro_batch_size_per_gpu": 4 // world, "gradient_accumulation_steps": accum,
            "train_batch_size": 4 * accum, "gradient_clipping": 0.0, "bf16": {"enabled": False},
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 10 * hidden},
            "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}


class Calls:
    """Records every torch.distributed collective while on: (name, elements of its input)."""

    def __init__(self):
        self.on, self.seen = False, []
        for name in REDUCING + MOVING:
            original = getattr(dist, name)

            def wrapped(*args, _name=name, _original=original, **kw):
                if self.on:
                    t = (list(args) + list(kw.values()))[0 if _name in ("all_reduce", "reduce", "broadcast") else 1]
                    self.seen.append((_name, sum(x.numel() for x in t) if isinstance(t, list) else t.numel()))
                return _original(*args, **kw)

            setattr(dist, name, wrapped)


def nan_hook(grad: torch.Tensor) -> torch.Tensor:
    """A gradient whose first half of rows (rank 0's partition under 2 ranks) is NaN."""
    grad = grad.clone()
    grad[: grad.shape[0] // 2] = float("nan")
    return grad


def build(spec: dict):
    from sift.quantize import attach, quantize

    model = tiny_llama(hidden=spec.get("hidden", 32))
    if spec.get("crowd"):  # every large |weight| of one tensor in rank 0's half: rank 1 keeps none of it
        with torch.no_grad():
            model.model.layers[0].self_attn.q_proj.weight[:16] *= 100
    if spec.get("quant"):
        quantize(model, "nf4")
        attach(model, spec["rate"], spec.get("selection", "grad"), 0)
    return model


def core(spec: dict, distributed: bool) -> dict:
    """A SIFT (QSIFT with spec["quant"]) run of a few steps on a tiny model: under ZeRO-3 on this
    launch's ranks, each taking its rows of every window, or in one process on the whole windows."""
    from sift import SIFT, SIFTConfig
    from trainer import ds
    from trainer.loss import train_window

    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    accum, steps, inb = spec.get("accum", 2), spec.get("steps", 2), spec.get("in_backward", False)
    model = build(spec)
    engine = ds.initialize(model, zero3(spec.get("hidden", 32), accum, world)) if distributed else None
    opt = SIFT(model, SIFTConfig(rate=spec["rate"], lr=1e-2, optimizer=spec.get("optim", "adamw"),
                                 selection=spec.get("selection", "grad"), step_in_backward=inb,
                                 max_grad_norm=None if inb else 1.0))
    calls = Calls() if distributed and spec.get("monitor") else None
    for step in range(steps):
        if calls is not None:
            calls.on = step == steps - 1  # after the selection step
        if spec.get("nan") and step == 1 and rank == world - 1:  # only the last rank's gradient is bad
            handle = dict(model.named_parameters())[spec["nan"]].register_hook(nan_hook)
        micro = [{k: v[rank::world] for k, v in b.items()} for b in window(step, accum)]
        train_window(model, micro, "cpu", engine, boundary=False)
        opt.step()
        opt.zero_grad()
        ds.finish_step(engine)
        if spec.get("nan") and step == 1 and rank == world - 1:
            handle.remove()
    if calls is not None:
        calls.on = False
    whole = opt.gathered(keep=rank == 0)
    ds_params = [(n, p) for n, p in model.named_parameters() if hasattr(p, "ds_tensor")]
    out = {"memory": opt.memory_report(), "skipped": opt.skipped_steps, "calls": calls.seen if calls else [],
           "ks": {s.name: s.k for s in opt.slots if s.ready()}, "sent": opt.comm_bytes,
           "parts": {n: [p.ds_tensor.numel(), p.ds_numel] for n, p in ds_params},
           "partitioned": sum(p.ds_tensor.nbytes for _, p in ds_params if not p.ds_persist),
           "persistent": sum(p.ds_numel * p.element_size() for _, p in ds_params if p.ds_persist)}
    if not distributed:  # what the memory planner takes ZeRO-3 to partition of this model
        from benchmarks.zero_plan import weight_split

        out["split"] = weight_split(model, zero3(spec.get("hidden", 32), accum, 2)["zero_optimization"]
                                    ["stage3_param_persistence_threshold"])
    if rank == 0:
        out.update(indices=whole.selected_indices(), values=whole.trained_values())
    return out


def train(argv: list[str], full_disk: dict | None = None) -> dict:
    """train_sft.main; `full_disk` ({"rank": r, "at": s}): on rank r, torch.save into a path holding s
    fails as on a full disk (torch's zip writer error)."""
    import train_sft
    from common.cli import UsageError

    save = torch.save

    def failing_save(obj, f, *args, **kw):
        if full_disk["at"] in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return save(obj, f, *args, **kw)

    if full_disk and dist.get_rank() == full_disk["rank"]:
        torch.save = failing_save
    try:
        train_sft.main(argv)
    except UsageError as e:
        return {"code": 2, "message": e.message}
    except SystemExit as e:
        return {"code": e.code if isinstance(e.code, int) else 1, "message": "" if isinstance(e.code, int) else e.code}
    finally:
        torch.save = save
    return {"code": 0, "message": ""}


def main(plan_path: str) -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    with open(plan_path) as f:
        plan = json.load(f)
    for job in plan:
        if "train" in job:
            result = train(job["train"], job.get("full_disk"))
            if rank == 0:
                with open(job["out"], "w") as f:
                    json.dump(result, f)
        else:
            torch.save(core(job["core"], distributed=True), f"{job['out']}.rank{rank}.pt")
        dist.barrier()


if __name__ == "__main__":
    main([a for a in sys.argv[1:] if not a.startswith("--local_rank")][0])
