"""The longest sequence (batch 1) a card trains, planned in seconds: a few layers planned, scaled to
the model's depth, and a search.

    python -m benchmarks.longest --model llama3.1-8b --gpu_gib 8,12,16,24,48,80 \\
        --rows qsift:0.01,qsift:0.05,sift:0.05 --offload_activations --embeddings_on_host
    python -m benchmarks.memory_plan --model llama3.1-8b --quantization nf4 --rate 0.01 \\
        --gradient_checkpointing --offload_activations --tile_tokens 0 --max_seq --gpu_gib 24
    python -m benchmarks.longest --device_step 32768 --rows qsift:0.01 --offload_activations \\
        --embeddings_on_host --json long_step.json     # on a GPU: measured peaks beside the plan

Scaling. A decoder's layers are identical, so within each window of a step (forward, the loss's
backward, each layer's backward from its recompute to the next layer's, the optimizer step) the
peak is affine in the layer count L: persistent state (weights, optimizer state: a + b L), what the
window holds (the sparse gradients of the layers already through backward), and its transients
(independent of L). `scaled_plan` plans 3 and 4 layers with the model's embeddings and head
(`WindowTracker` keeps each window's peak and what made it up), extrapolates each window to L (the
top layer, the lowest middle one and the bottom one stand for all layers) and takes the largest.
Tested against the full plan within 1 % (tests/test_longest.py).

Search. The peak grows with the sequence, close to linearly above one chunk of the tiled layers; a
secant search keeps a bracket [fits, does not fit] and stops when it is `granularity` tokens wide.
A sequence fits when the larger of the first step's peak (SIFT selects there) and the steady
step's, plus the CUDA context, is within the card.

Cards. `--gpu_gib 24` is a card's memory in GiB (2^30 bytes): NVIDIA counts VRAM in binary units (a
"24 GB" RTX 4090 reports 24,564 MiB). The CUDA context (`--context_gib`, 0.5) is taken from it; the
allocator's fragmentation is not modelled.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import sys
import time

import torch
from torch.utils._pytree import tree_leaves

from common.atomic import atomic_write
from common.cli import UsageError
from trainer import tiled_decoder

from . import meta_plan, stamp
from .constants import GIB
from .flash2 import FLASH2
from .memtrack import PHASE_CATEGORY, MemoryTracker
from .methods import Method, Trainee
from .models import FUSED_SDPA, SHAPES, load_config

PROBES = (3, 4)  # layer counts planned: a top, a middle and a bottom layer in each


class CachingMetaTracker(meta_plan.MetaTracker):
    """MetaTracker that runs each meta op's shape function once per (op, input shapes and strides,
    other arguments): meta kernels are Python (torch's decompositions, bitsandbytes' fake kernels)
    and a long plan repeats the same few hundred ops thousands of times (loss chunks, tiled chunks,
    identical layers). Only ops that return fresh tensors are cached (no view, no in-place or out=
    result: their schema's returns carry no alias); the outputs are new meta tensors of the recorded
    shapes, strides and dtypes, counted as the kernel's own would be."""

    def __init__(self):
        super().__init__()
        self._shapes: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        key = _op_key(func, args, kwargs)
        made = self._shapes.get(key) if key is not None else None
        if made is None:
            out = super().__torch_dispatch__(func, types, args, kwargs)
            if key is not None:
                self._shapes[key] = _described(out, args, kwargs)
                if self._shapes[key] is None and _shares_storage(out, args, kwargs):
                    _ALIASING[func] = True  # e.g. aten._unsafe_view: a view its schema does not declare
            return out
        self.ops += 1
        out = [None if m is None else torch.empty_strided(m[0], m[1], dtype=m[2], device="meta") for m in made[1]]
        for t in out:
            if t is not None:
                self._see(t, PHASE_CATEGORY[self._phase])
        return out[0] if made[0] == "tensor" else made[0](out)


def _arg_key(a):
    if isinstance(a, torch.Tensor):
        if not a.is_meta or a.layout != torch.strided:
            raise TypeError
        return (tuple(a.shape), a.stride(), a.dtype)
    if isinstance(a, (list, tuple)):
        return (type(a), tuple(_arg_key(x) for x in a))
    if isinstance(a, dict):
        return tuple((k, _arg_key(v)) for k, v in a.items())
    hash(a)  # TypeError for what cannot be a key
    return a


_ALIASING: dict = {}  # op -> whether a result may alias an input (views, in-place, out=)


def _op_key(func, args, kwargs):
    """A key for `func` on these arguments, or None when its result cannot be cached."""
    if func not in _ALIASING:
        _ALIASING[func] = not isinstance(func, torch._ops.OpOverload) or \
            any(r.alias_info is not None for r in func._schema.returns)
    if _ALIASING[func]:
        return None
    try:
        return func, _arg_key(args), _arg_key(kwargs or {})
    except TypeError:
        return None


def _described(out, args, kwargs):
    """("tensor" or the sequence type, [(shape, stride, dtype) or None]) of fresh dense outputs, or None."""
    many = isinstance(out, (list, tuple))
    items = list(out) if many else [out]
    if not items or not all(t is None or (isinstance(t, torch.Tensor) and t.is_meta and _fresh(t)) for t in items) \
            or _shares_storage(out, args, kwargs):
        return None
    return (type(out) if many else "tensor",
            [None if t is None else (tuple(t.shape), t.stride(), t.dtype) for t in items])


def _shares_storage(out, args, kwargs) -> bool:
    """Whether an output lies in an input's storage (or in another output's)."""
    ins = [t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    outs = [t.untyped_storage()._cdata for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    return len(set(outs)) < len(outs) or bool(set(outs) & set(ins))


def _fresh(t: torch.Tensor) -> bool:
    """Dense, at offset 0 of a storage of exactly its extent: what empty_strided remakes."""
    extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) if t.numel() else 0
    return t.layout == torch.strided and t.storage_offset() == 0 and \
        t.untyped_storage().nbytes() == extent * t.element_size()


class WindowTracker(CachingMetaTracker):
    """The caching tracker that also keeps, per step, the peak of each window and the live bytes then."""

    def __init__(self):
        super().__init__()
        self.steps: list[dict] = []  # per step: {window: [peak bytes, snapshot of the live storages]}
        self._window = None

    def watch(self, model):
        """Open window "layer i" when decoder layer i starts its backward (its recompute runs its
        input norm; so do the tiled layers' chunks, which stay in the same window)."""
        for i, layer in enumerate(model.model.layers):
            layer.input_layernorm.register_forward_pre_hook(
                lambda *_, i=i: self._open(f"layer {i}") if self._phase == "backward" else None)

    def reset_peak(self):  # a new step: its windows start with its forward
        super().reset_peak()
        self.steps.append({})
        self._open("forward")

    def phase(self, name):
        if self.steps:
            self._open({"backward": "loss"}.get(name, name))
        return super().phase(name)

    def _open(self, name):
        self._window = name
        if name not in self.steps[-1]:
            self.steps[-1][name] = [self.current, dict(self._live)]

    def _grow(self, nbytes):
        super()._grow(nbytes)
        if self.steps and self._window is not None:
            entry = self.steps[-1][self._window]
            if self.current > entry[0]:
                entry[0], entry[1] = self.current, dict(self._live)


def _roles(windows: dict, layers: int) -> dict:
    """The windows of a plan of `layers` layers by role; the layer windows as top / middle / bottom."""
    names = {f"layer {layers - 1}": "top layer", "layer 1": "middle layer", "layer 0": "bottom layer"}
    out = {}
    for name, (peak, live) in windows.items():
        if not name.startswith("layer ") or name in names:
            out[names.get(name, name)] = (peak, MemoryTracker._by_category(live))
    return out


def _affine(a: float, b: float, la: int, lb: int, at: int) -> float:
    return a + (b - a) * (at - la) / (lb - la)


def _probe(config, method, seq, layers, dtype, steps, attention):
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = layers
    tracker = WindowTracker()
    result = meta_plan.plan(cfg, method, 1, seq, dtype, gradient_checkpointing=True, steps=steps,
                              attention=attention, tracker=lambda: tracker, on_model=tracker.watch)
    return result, [_roles(w, layers) for w in tracker.steps]


def scaled_plan(config, method: Method, seq: int, dtype=torch.bfloat16, steps: int = 2,
                attention: str = FLASH2, probes=PROBES) -> dict:
    """The plan of `config` at `seq` tokens (batch 1, gradient checkpointing) from plans of `probes`
    layers (see the module doc): device peak of the steady step and of the first, their breakdown
    (bytes by category), the window the peak is in, and the host bytes (offloaded activations and
    state kept on the host)."""
    (ra, wa), (rb, wb) = (_probe(config, method, seq, n, dtype, steps, attention) for n in probes)
    layers, (la, lb) = config.num_hidden_layers, probes
    out = {"name": method.name, "seq": seq, "layers": layers, "probes": list(probes), "attention": attention}
    for key, a, b in (("first_step", wa[0], wb[0]), ("steady", wa[-1], wb[-1])):
        scaled = {role: {c: _affine(a[role][1][c], b[role][1][c], la, lb, layers) for c in a[role][1]}
                  for role in a}
        window = max(scaled, key=lambda r: sum(scaled[r].values()))
        breakdown = scaled[window]
        out[key] = {"peak": sum(breakdown.values()) - breakdown["host"], "with_host": sum(breakdown.values()),
                    "window": window, "breakdown": breakdown}
    offloaded = _affine(ra["offloaded_bytes"], rb["offloaded_bytes"], la, lb, layers)
    out["peak"], out["first_step_peak"] = out["steady"]["peak"], out["first_step"]["peak"]
    out["host_bytes"] = offloaded + out["steady"]["breakdown"]["host"]
    out["offloaded_bytes"] = offloaded
    return out


def needed(plan: dict) -> float:
    """Device bytes a run needs: the larger of the first and the steady step's peaks."""
    return max(plan["peak"], plan["first_step_peak"])


def longest(config, method: Method, budget: float, granularity: int = 256, start: int = 8192,
            limit: int = 2**21, plan_fn=scaled_plan, **plan_kw) -> dict:
    """The longest multiple of `granularity` tokens (up to `limit`) whose `needed` bytes are within
    `budget`: {"seq", "plan" (at seq, None when nothing fits), "plans" (how many were made), "seconds"}."""
    t0, made = time.perf_counter(), {}
    lo, hi, x = 0, None, start  # lo fits (0: nothing yet), hi does not (None: not found yet)
    while x is not None:
        made[x] = plan_fn(config, method, x, **plan_kw)
        lo, hi = (x, hi) if needed(made[x]) <= budget else (lo, x)
        x = _next(lo, hi, {s: needed(p) for s, p in made.items()}, budget, granularity, limit)
    return {"seq": lo, "plan": made.get(lo), "plans": len(made), "seconds": time.perf_counter() - t0}


def _next(lo: int, hi: int | None, seen: dict, budget: float, g: int, limit: int) -> int | None:
    """The next length to plan, None when the bracket [lo, hi] is `g` wide (or lo reached `limit`, or
    nothing fits at `g`). Inside a bracket: where the line through its ends meets the budget, moved
    one step inside (a plan that lands on the answer is then confirmed by the next), and the midpoint
    once six plans have not closed it."""
    def down(x):
        return max(g, int(x) // g * g)

    if hi is None:  # everything planned fits: extrapolate from the two longest, or double
        if lo >= limit:
            return None
        (x1, y1), (x2, y2) = sorted(seen.items())[-2:] if len(seen) > 1 else ((0, 0.0), (lo, seen[lo]))
        guess = x2 + (budget - y2) * (x2 - x1) / (y2 - y1) if y2 > y1 else 2 * x2
        return min(down(max(guess, x2 + g)), limit)
    if lo == 0:  # nothing fits yet: try the shortest length, then search between
        return None if hi <= g or g in seen else g
    if hi - lo <= g:
        return None
    if len(seen) >= 6:
        return down((lo + hi) / 2)
    guess = lo + (budget - seen[lo]) * (hi - lo) / (seen[hi] - seen[lo])
    return min(max(down(guess), lo + g), hi - g)


# ---------------------------------------------------------------------------- one long step on a device
def long_step(config, method: Method, seq: int, device: str = "cuda", steps: int = 2, seed: int = 0) -> dict:
    """One long-sequence training run (`steps` steps, batch 1, gradient checkpointing, random bf16
    weights) of `method` on `device`, its measured peaks beside the scaled plan: on CUDA
    torch.cuda.max_memory_allocated against the plan with FlashAttention-2's buffers (benchmarks.flash2),
    on the CPU (a dry run) the byte counter on real tensors against the plan with the CPU kernel's."""
    cuda = device.startswith("cuda")
    model = meta_plan.build(config, device, torch.bfloat16, True)
    g = torch.Generator().manual_seed(seed)
    batches = [{"input_ids": ids, "labels": ids} for ids in
               (torch.randint(0, config.vocab_size, (1, seq), generator=g).to(device) for _ in range(steps))]
    if cuda:
        trainee, peaks, seconds = Trainee(method, model), [], []
        for batch in batches:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            trainee.train_step(batch)
            torch.cuda.synchronize()
            seconds.append(time.perf_counter() - t0)
            peaks.append(torch.cuda.max_memory_allocated())
    else:
        from .memory_speed import track_steps

        trainee, out, _ = track_steps(method, model, batches, steps)
        peaks, seconds = [s["peak"] - s["breakdown"]["host"] for s in out], [s["seconds_tracked"] for s in out]
    trainee.close()
    plan = scaled_plan(config, method, seq, steps=steps, attention=FLASH2 if cuda else FUSED_SDPA)
    return {"name": method.name, "device": torch.cuda.get_device_name() if cuda else "cpu", "seq": seq,
            "measured_first_step_gib": peaks[0] / GIB, "measured_steady_gib": peaks[-1] / GIB,
            "planned_first_step_gib": plan["first_step_peak"] / GIB, "planned_steady_gib": plan["peak"] / GIB,
            "steady_over_plan": peaks[-1] / plan["peak"], "first_over_plan": peaks[0] / plan["first_step_peak"],
            "step_seconds": seconds}


# ---------------------------------------------------------------------------- rows and the CLI
def row_method(spec: str, offload_activations: bool, embeddings_on_host: bool, step_in_backward: bool,
               tile_tokens: int | None, quantization: str = "nf4") -> Method:
    """"qsift:0.01" (SIFT on a 4-bit base) or "sift:0.05" (bf16 weights) as a benchmarks Method."""
    kind, _, rate = spec.partition(":")
    if kind not in ("sift", "qsift") or not rate:
        raise ValueError(f"--rows {spec!r}: kind:rate with kind sift or qsift, e.g. qsift:0.01")
    rate = float(rate)
    name = f"{'QSIFT' if kind == 'qsift' else 'SIFT'} {rate:.0%}" + (" in-backward" if step_in_backward else "")
    return Method(name, "sift", rate=rate, step_in_backward=step_in_backward,
                  quantization=quantization if kind == "qsift" else None,
                  offload_activations=offload_activations, embeddings_on_host=embeddings_on_host,
                  tile_tokens=tile_tokens)


def search_rows(config, methods, cards_gib, context_gib: float, log=print, **plan_kw) -> list[dict]:
    """For each method and card: the longest sequence and its plan (each search starts from the
    previous answer)."""
    rows = []
    for method in methods:
        start = 8192
        for card in cards_gib:
            found = longest(config, method, (card - context_gib) * GIB, start=start, **plan_kw)
            start = max(found["seq"], 8192)
            rows.append({"method": method.name, "card_gib": card, "context_gib": context_gib, **found})
            log(render([rows[-1]], header=False))
    return rows


def render(rows: list[dict], header: bool = True) -> str:
    """Markdown: the longest sequence per card and method, the peak's parts there (GiB) and the host memory."""
    lines = ["| method | card (GiB) | longest seq | peak + context | weights | optimizer + grads | "
             "activations & temporaries | peak in | host RAM | plans, s |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"] if header else []
    for r in rows:
        p = r["plan"]
        if p is None:
            lines.append(f"| {r['method']} | {r['card_gib']:g} | does not fit | | | | | | | {r['plans']}, "
                         f"{r['seconds']:.0f} |")
            continue
        run = max((p["steady"], p["first_step"]), key=lambda s: s["peak"])
        bd = run["breakdown"]
        temps = bd["activations"] + bd["backward"] + bd["step"] + bd["other"]
        lines.append(f"| {r['method']} | {r['card_gib']:g} | {r['seq']:,} | {(run['peak']) / GIB + r['context_gib']:.2f} | "
                     f"{bd['params'] / GIB:.2f} | {(bd['optimizer'] + bd['grads']) / GIB:.2f} | {temps / GIB:.2f} | "
                     f"{'first step, ' if run is p['first_step'] else ''}{run['window']} | "
                     f"{p['host_bytes'] / GIB:.1f} | {r['plans']}, {r['seconds']:.0f} |")
    return "\n".join(lines)


SEARCH = ("max_seq", "gpu_gib", "context_gib", "granularity")  # benchmarks.memory_plan's options of the search


def add_arguments(ap: argparse.ArgumentParser):
    """The search's options, for this module's CLI and benchmarks.memory_plan's."""
    ap.add_argument("--max_seq", action="store_true",
                    help="print the longest sequence (batch 1) that fits each --gpu_gib card instead: for the "
                         "sift rows (QSIFT ones with --quantization), see benchmarks.longest")
    ap.add_argument("--gpu_gib", default="24", help="card memory in GiB, comma-separated for several cards")
    ap.add_argument("--context_gib", type=float, default=0.5, help="CUDA context taken from each card")
    ap.add_argument("--granularity", type=int, default=256, help="the answer's resolution in tokens")


def cards(gpu_gib, context_gib: float) -> list[float]:
    """--gpu_gib as numbers; ValueError names the option."""
    try:
        out = [float(c) for c in str(gpu_gib).split(",")]
    except ValueError:
        out = []
    if not out or any(not c > context_gib for c in out):
        raise ValueError(f"--gpu_gib {gpu_gib}: card sizes in GiB above --context_gib {context_gib}")
    return out


def search_problems(setting: dict, search: dict) -> list[str]:
    """benchmarks.memory_plan --max_seq's misuses (each one line), before anything is planned."""
    out = []
    if setting["batch"] != 1 or not setting["gradient_checkpointing"] or setting["gradient_accumulation_steps"] != 1:
        out.append("--max_seq searches batch 1, --gradient_checkpointing, one micro-batch per step")
    if setting["method"] not in ("all", "sift") and not setting["quantization"]:
        out.append(f"--max_seq searches the sift rows: --method {setting['method']} has none")
    if search["granularity"] < 1:
        out.append(f"--granularity {search['granularity']}: must be >= 1 token")
    try:
        cards(search["gpu_gib"], search["context_gib"])
    except ValueError as e:
        out.append(str(e))
    return out


def write_rows(path: str | None, setting: dict, rows: list[dict]):
    """--json: the rows, stamped with the command, commit, device and date that made them."""
    if path:
        module = os.path.splitext(os.path.relpath(sys.argv[0]))[0].replace(os.sep, ".")
        commit, dirty = stamp.git_state()
        doc = {"stamp": {"command": shlex.join(["python", "-m", module, *sys.argv[1:]]), "commit": commit,
                         "dirty": bool(dirty), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                         "device": "meta (planned)", "host": stamp.device()},
               "setting": setting, "rows": rows}
        atomic_write(path, [json.dumps(doc, indent=1, default=str)])


def chunk_of(config, tile_tokens: int | None) -> int | None:
    return None if tile_tokens is None else tile_tokens or tiled_decoder.chunk_tokens(config)


def stage(model: str = "llama3.1-8b", rows: tuple = ("qsift:0.01",), gpu_gib: tuple = (8, 12, 16, 24),
          context_gib: float = 0.5, offload_activations: bool = True, embeddings_on_host: bool = True,
          step_in_backward: bool = False, tile_tokens: int | None = 0, granularity: int = 256,
          device_step: int | None = None, device: str = "cuda", log=print) -> dict:
    """The longest sequence per card of each row (`python -m benchmarks.run longest/NAME`), or with
    `device_step` one run of that many tokens per row on `device`, its peaks beside the plan."""
    try:
        methods = [row_method(r, offload_activations, embeddings_on_host, step_in_backward, tile_tokens) for r in rows]
        budgets = cards(",".join(str(c) for c in gpu_gib), context_gib)
    except ValueError as e:
        raise UsageError(f"longest: {e}") from None
    problems = [f"{k} {v}: must be >= 1" for k, v in (("granularity", granularity), ("device_step", device_step))
                if v is not None and v < 1]
    if tile_tokens is not None and tile_tokens < 0:
        problems.append(f"tile_tokens {tile_tokens}: 0 (the chunk_tokens rule), a chunk in tokens, or null (untiled)")
    if device_step and device.startswith("cuda") and not torch.cuda.is_available():
        problems.append("device_step on cuda: no CUDA device here (device cpu runs the dry run)")
    if problems:
        raise UsageError("longest: " + "; ".join(problems))
    config = load_config(model)
    if device_step:
        return {"rows": [long_step(config, m, device_step, device) for m in methods]}
    chunk = chunk_of(config, tile_tokens)
    log(f"Longest sequence per card: {model}, batch 1, bf16, gradient checkpointing, tiled layers "
        f"{f'in chunks of {chunk} tokens' if chunk else 'off'}, offload_activations "
        f"{'on' if offload_activations else 'off'}, embeddings_on_host {'on' if embeddings_on_host else 'off'}\n")
    log(render([], header=True))
    return {"model": model, "chunk_tokens": chunk,
            "rows": search_rows(config, methods, budgets, context_gib, log=log, granularity=granularity)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.longest", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    ap.add_argument("--model", default="llama3.1-8b", help=f"{', '.join(SHAPES)}, a config.json or a HF model dir / id")
    ap.add_argument("--rows", default="qsift:0.01", help="comma-separated kind:rate (kind sift or qsift)")
    ap.add_argument("--offload_activations", action="store_true", help="saved activations in host memory")
    ap.add_argument("--embeddings_on_host", action="store_true", help="the frozen input embeddings in host memory")
    ap.add_argument("--step_in_backward", action="store_true", help="SIFT's in-backward step for every row")
    ap.add_argument("--tile_tokens", type=int, default=0,
                    help="chunk in tokens of the tiled decoder layers (trainer.tiled_decoder): 0 its chunk_tokens "
                         "rule (the default), -1 untiled")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--device_step", type=int, default=None, metavar="SEQ",
                    help="instead of searching: one run of SEQ tokens per row on --device, its peaks beside the plan")
    ap.add_argument("--device", default="cuda", help="for --device_step: cuda, or cpu for a dry run")
    add_arguments(ap)
    args = ap.parse_args(argv)
    try:
        gpu_gib = tuple(cards(args.gpu_gib, args.context_gib))
        problem = args.json and meta_plan.json_problem(args.json)
        if problem:
            raise UsageError(problem)
        result = stage(args.model, tuple(args.rows.split(",")), gpu_gib, args.context_gib, args.offload_activations,
                       args.embeddings_on_host, args.step_in_backward, None if args.tile_tokens == -1 else args.tile_tokens,
                       args.granularity, args.device_step, args.device)
    except (UsageError, ValueError) as e:
        ap.exit(2, f"{ap.prog}: error: {e}\n")
    for row in result["rows"] if args.device_step else []:
        print(json.dumps(row), flush=True)
    write_rows(args.json, vars(args), result["rows"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
