"""Drop and regrow (sift.regrow) against references: one regrow against float64 (which entries go, which
come, their values and moments) for both holders, bit-exact resume inside a window and right after a
regrow, the memory between and during windows, and the skip of a non-finite step."""
import io
import math

import pytest
import torch

import sift.regrow as regrow
from conftest import batch, tiny_llama
from sift import SIFT, SIFTConfig
from sift.codec import num_blocks
from test_sift_step import run

EVERY, WIDTH, TOTAL = 3, 2, 8  # a regrow after steps 3 and 6; windows: steps 2-3 and 5-6


def regrow_cfg(**kw) -> SIFTConfig:
    base = dict(rate=0.1, lr=1e-2, weight_decay=0.01, max_grad_norm=0.05, regrow_steps=EVERY, regrow_window=WIDTH,
                regrow_fraction=0.5)
    return SIFTConfig(**{**base, **kw})


def qsift_model():
    from sift.quantize import attach, quantize

    model = tiny_llama()
    quantize(model, "nf4")
    attach(model, rate=0.1, selection="grad", seed=0)
    return model


class Recorder:
    """Each window's observed dense gradients per tensor (through the window's own hook point), and
    each regrow's inputs just before it runs."""

    def __init__(self, monkeypatch):
        self.dense, self.before = {}, {}
        observe, replace = regrow.Window.observe, regrow.replace

        def observing(window, dense, flat, selected):
            self.dense.setdefault(window.slot.name, []).append(dense.detach().double().reshape(-1).clone())
            return observe(window, dense, flat, selected)

        def replacing(slot, window, betas, qmaps):
            base = torch.zeros(slot.k, dtype=torch.float64) if slot.zero_base else slot.base.double()
            self.before[slot.name] = dict(idx=slot.entries.indices().long().clone(), vals=slot.values().clone(),
                                          base=base, moments=regrow.read_moments(slot, qmaps), step=slot.step, n=window.n,
                                          c=window.c, samples=window.samples, sum=window.sum.clone(),
                                          cand=window.indices().long())
            return replace(slot, window, betas, qmaps)

        monkeypatch.setattr(regrow.Window, "observe", observing)
        monkeypatch.setattr(regrow, "replace", replacing)


def reference(rec: Recorder, cfg: SIFTConfig, accum: int) -> dict:
    """Float64: the candidates from the window's first gradient, the clipped step gradients summed at
    them, the entries to drop and grow, and the new entries' moments."""
    names = sorted(rec.before)
    steps = {n: [sum(rec.dense[n][i:i + accum]) for i in range(0, len(rec.dense[n]), accum)] for n in names}
    out = {}
    scales = []
    for s in range(WIDTH):  # the global norm of the selected entries' step gradients (SIFT's clipping)
        norm = math.sqrt(sum(float((steps[n][s][rec.before[n]["idx"]] ** 2).sum()) for n in names))
        scales.append(min(1.0, cfg.max_grad_norm / (norm + 1e-6)))
    for n in names:
        b = rec.before[n]
        score = rec.dense[n][0].abs()
        score[b["idx"]] = -1
        cand = torch.topk(score, b["c"]).indices.sort().values
        grads = torch.stack([steps[n][s][cand] * scales[s] for s in range(WIDTH)])
        total, squares = grads.sum(0), (grads ** 2).sum(0)
        pick = torch.topk(total.abs(), b["n"]).indices
        drop = torch.topk((b["vals"].double() - b["base"]).abs(), b["n"], largest=False).indices
        t, (b1, b2) = b["step"], cfg.betas
        seeds = torch.stack([total[pick] / WIDTH * (1 - b1 ** t), squares[pick] / WIDTH * (1 - b2 ** t)])
        out[n] = dict(grow=cand[pick], drop=b["idx"][drop], seeds=seeds)
    return out


@pytest.mark.parametrize("holder, optimizer", [("weight", "adamw"), ("weight", "adamw8bit"), ("qsift", "adamw")])
def test_one_regrow_against_float64(holder, optimizer, monkeypatch):
    accum = 2
    model = qsift_model() if holder == "qsift" else tiny_llama()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = regrow_cfg(optimizer=optimizer)
    opt = SIFT(model, cfg)
    opt.plan_regrow(TOTAL)
    rec = Recorder(monkeypatch)
    run(model, opt, EVERY, accum)
    ref = reference(rec, cfg, accum)
    slots = {s.name: s for s in opt.slots}
    params = dict(model.named_parameters())
    for name, want in ref.items():
        s, b = slots[name], rec.before[name]
        now = s.entries.indices().long()
        expected = torch.cat([b["idx"][~torch.isin(b["idx"], want["drop"])], want["grow"]]).sort().values
        assert b["n"] > 0 and torch.equal(now, expected), name
        kept, grown = torch.isin(now, b["idx"]), torch.isin(now, want["grow"])
        vals = s.values()
        assert torch.equal(vals[kept], b["vals"][torch.isin(b["idx"], now)]), name  # kept: trained value, exactly
        assert torch.equal(vals[grown].double(), b["base"].new_zeros(b["n"]) if s.zero_base else
                           w0[name].reshape(-1)[now[grown]].double()), name  # grown: the base value
        if not s.zero_base:  # every unselected weight entry is its base again, bit for bit
            free = torch.ones(params[name].numel(), dtype=torch.bool)
            free[now] = False
            assert torch.equal(params[name].detach().reshape(-1)[free], w0[name].reshape(-1)[free]), name
            assert torch.equal(s.base, w0[name].reshape(-1)[now]), name
        moments = regrow.read_moments(s, opt._qmap_pair(s.device) if s.bank.eightbit else None)[:, :s.k]
        old = b["moments"][:, :s.k][:, torch.isin(b["idx"], now)]
        if optimizer == "adamw":  # fp32 moments move exactly; the seeds are the window's statistics
            assert torch.equal(moments[:, kept], old), name
            torch.testing.assert_close(moments[:, grown].double(), want["seeds"][:, torch.argsort(want["grow"])],
                                       rtol=1e-5, atol=1e-12)
        else:  # 8-bit: quantized again, within half the widest code step of the block's absmax
            _, absmax = s.moment_rows()
            gap = [float(torch.diff(q.sort().values).max()) / 2 for q in opt._qmap_pair(s.device)]
            bound = torch.stack([absmax[i].repeat_interleave(256)[:s.k] * gap[i] for i in (0, 1)]) * 1.001
            assert ((moments[:, kept] - old).abs() <= bound[:, kept]).all(), name
            err = (moments[:, grown].double() - want["seeds"][:, torch.argsort(want["grow"])]).abs()
            assert (err <= bound[:, grown].double()).all(), name
    assert not opt.regrow.windows and opt.memory_report()["regrow_candidates"] == 0


@pytest.mark.parametrize("in_backward", [False, True])
def test_bf16_regrow_drops_the_smallest_changes_grows_the_largest_sums_and_restores_the_base(in_backward, monkeypatch):
    """On bf16 weights (ties in bf16 gradients make an independent top-k ambiguous, so the rules are
    checked as orders): the dropped entries changed least, the grown candidates have the largest
    |sum|, kept master values move exactly, and every unselected weight entry is its base bit for bit."""
    model = tiny_llama(dtype=torch.bfloat16)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = regrow_cfg(step_in_backward=in_backward, max_grad_norm=None if in_backward else 0.05)
    opt = SIFT(model, cfg)
    opt.plan_regrow(TOTAL)
    rec = Recorder(monkeypatch)
    run(model, opt, EVERY, 1 if in_backward else 2)
    params = dict(model.named_parameters())
    for s in opt.slots:
        b = rec.before[s.name]
        cand, total = b["cand"], b["sum"]
        now = s.entries.indices().long()
        change = (b["vals"].double() - b["base"]).abs()
        gone = ~torch.isin(b["idx"], now)
        assert int(gone.sum()) == b["n"] and change[gone].max() <= change[~gone].min(), s.name
        grown = torch.isin(cand, now)
        assert int(grown.sum()) == b["n"] and total[grown].abs().min() >= total[~grown].abs().max(), s.name
        assert torch.equal(s.values()[torch.isin(now, b["idx"])], b["vals"][~gone]), s.name
        free = torch.ones(params[s.name].numel(), dtype=torch.bool)
        free[now] = False
        assert torch.equal(params[s.name].detach().reshape(-1)[free], w0[s.name].reshape(-1)[free]), s.name
        assert torch.equal(s.base, w0[s.name].reshape(-1)[now]), s.name


def test_qsift_dropped_entries_leave_the_delta_and_the_effective_weight_is_the_4bit_base(monkeypatch):
    model = qsift_model()
    opt = SIFT(model, regrow_cfg(optimizer="adamw"))
    opt.plan_regrow(TOTAL)
    rec = Recorder(monkeypatch)
    run(model, opt, EVERY)
    from sift.quantize import layers

    for name, layer in layers(model).items():
        b = rec.before[f"{name.removesuffix('.weight')}.delta"]
        gone = b["idx"][~torch.isin(b["idx"], layer.indices().long())]
        assert gone.numel() == b["n"]
        w = layer.effective_weight().detach().reshape(-1)
        assert torch.equal(w[gone], layer.dequantized().reshape(-1)[gone]), name


def straight_and_resumed(make, cfg, at: int, steps: int = TOTAL, accum: int = 1):
    model = make()
    opt = SIFT(model, cfg)
    opt.plan_regrow(steps)
    straight = run(model, opt, steps, accum)
    final = [p.detach().clone() for p in model.parameters()]
    model = make()
    opt = SIFT(model, cfg)
    opt.plan_regrow(steps)
    first = run(model, opt, at, accum)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    model = make()
    opt = SIFT(model, cfg)
    opt.plan_regrow(steps)
    opt.load_state_dict(torch.load(buf, weights_only=True))
    second = run(model, opt, steps - at, accum, start=at)
    return straight, first + second, final, list(model.parameters()), opt


@pytest.mark.parametrize("at", [2, EVERY])  # inside a window (its candidates chosen), right after a regrow
@pytest.mark.parametrize("dtype, mode", [(torch.float32, "deferred"), (torch.bfloat16, "deferred"),
                                         (torch.bfloat16, "in_backward")])
def test_resume_inside_a_window_or_after_a_regrow_is_bit_exact(at, dtype, mode):
    in_backward = mode == "in_backward"
    cfg = regrow_cfg(optimizer="adamw8bit", step_in_backward=in_backward, max_grad_norm=None if in_backward else 0.05)
    straight, resumed, a, b, opt = straight_and_resumed(lambda: tiny_llama(dtype=dtype), cfg, at,
                                                        accum=1 if in_backward else 2)
    assert straight == resumed
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert opt.regrow.steps == TOTAL


def test_a_saved_window_travels_in_the_state_dict():
    model = tiny_llama()
    opt = SIFT(model, regrow_cfg())
    opt.plan_regrow(TOTAL)
    run(model, opt, 2)
    st = opt.state_dict()["regrow"]
    assert st["steps"] == 2 and st["windows"]
    w = next(iter(st["windows"].values()))
    assert w["samples"] == 1 and w["candidates"].numel() == w["c"] == w["sum"].numel() > 0


def test_memory_between_windows_is_the_static_runs_and_bounded_during_one():
    fraction = 0.5
    static_model, model = tiny_llama(dtype=torch.bfloat16), tiny_llama(dtype=torch.bfloat16)
    static = SIFT(static_model, SIFTConfig(rate=0.1, lr=1e-2))
    opt = SIFT(model, SIFTConfig(rate=0.1, lr=1e-2, regrow_steps=EVERY, regrow_window=WIDTH, regrow_fraction=fraction))
    opt.plan_regrow(TOTAL)
    seen = set()
    for step in range(TOTAL):
        for m, o in ((static_model, static), (model, opt)):
            run(m, o, 1, start=step)
        mine, theirs = opt.memory_report(), static.memory_report()
        held = mine.pop("regrow_candidates")
        if not any(w.chosen() for w in opt.regrow.windows.values()):
            if opt.regrow.steps % EVERY:
                assert mine == theirs and held == 0
                seen.add("between")
            else:  # a regrow re-encoded the entries: the step's index tables come back with the next step
                assert mine["persistent"] < theirs["persistent"] and held == 0
            continue
        # during a window: 14 B per candidate + an int32 per index block, c <= 2 x fraction x k per tensor
        bound = sum(14 * regrow.CANDIDATES * fraction * s.k + 4 * num_blocks(0, s.numel) for s in opt.regrow.slots)
        assert 0 < held <= bound and held == sum(w.bound() for w in opt.regrow.windows.values())
        assert mine["total"] == theirs["total"] + held
        seen.add("during")
    assert seen == {"between", "during"}


def test_a_non_finite_step_in_a_window_adds_nothing(monkeypatch):
    model = tiny_llama()
    opt = SIFT(model, regrow_cfg())
    opt.plan_regrow(TOTAL)
    run(model, opt, 2)  # the window's first step
    sums = {n: w.sum.clone() for n, w in opt.regrow.windows.items()}
    rec = Recorder(monkeypatch)
    poisoned = model.model.layers[1].mlp.down_proj.weight
    handle = poisoned.register_hook(lambda g: g.index_fill(1, torch.tensor([0]), float("nan")))
    run(model, opt, 1, start=2)  # skipped as a whole, then the regrow at its step count
    handle.remove()
    assert opt.skipped_steps == 1
    assert not opt.regrow.windows and set(rec.before) == set(sums)  # the regrow ran on the good step alone
    for name, total in sums.items():
        assert rec.before[name]["samples"] == 1 and torch.equal(rec.before[name]["sum"], total), name
    for s in opt.slots:
        assert torch.isfinite(s.values()).all()


def test_step_in_backward_equals_deferred_with_regrow():
    weights = []
    for in_backward in (False, True):
        model = tiny_llama()
        opt = SIFT(model, regrow_cfg(optimizer="adamw8bit", max_grad_norm=None, step_in_backward=in_backward))
        opt.plan_regrow(TOTAL)
        run(model, opt, TOTAL)
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))


def test_regrow_needs_the_run_length_and_resume_refuses_other_regrow_options():
    model = tiny_llama()
    opt = SIFT(model, regrow_cfg())
    with pytest.raises(RuntimeError, match="plan_regrow"):
        run(model, opt, 1)
    opt = SIFT(tiny_llama(), regrow_cfg())
    opt.plan_regrow(TOTAL)
    saved = opt.state_dict()
    other = SIFT(tiny_llama(), regrow_cfg(regrow_window=1))
    assert any("regrow_window" in p for p in other.resume_problems(saved))
    static = SIFT(tiny_llama(), SIFTConfig(rate=0.1, lr=1e-2, weight_decay=0.01, max_grad_norm=0.05))
    assert any("regrow_steps: saved 3, this run 0" in p for p in static.resume_problems(saved))
    assert not any("regrow" in p for p in static.resume_problems(static.state_dict()))


@pytest.mark.parametrize("kwargs, message", [
    (dict(regrow_steps=-1), "regrow_steps=-1: an integer >= 0"),
    (dict(regrow_steps=5, regrow_window=6), "regrow_window=6: an integer in [1, regrow_steps = 5]"),
    (dict(regrow_steps=5, regrow_fraction=0.0), "regrow_fraction=0.0: must be in (0, 1]"),
    (dict(regrow_steps=5, rate=1.0), "regrow needs unselected entries"),
])
def test_regrow_config_errors_say_what_to_change(kwargs, message):
    with pytest.raises(ValueError) as e:
        SIFTConfig(**kwargs)
    assert message in str(e.value)


# -------------------------------------------------------------------- through train_sft.py
REGROW_FLAGS = ("--sift_regrow_steps", "3", "--sift_regrow_window", "2", "--sift_regrow_fraction", "0.5",
                "--max_steps", "6", "--generate_tokens", "0")


@pytest.mark.parametrize("quantized", [False, True])
def test_train_sft_resumed_inside_a_window_and_after_a_regrow_equals_the_straight_run(quantized, tiny_dir, alpaca_40,
                                                                                       tmp_path):
    import json

    from safetensors.torch import load_file

    import train_sft
    from conftest import train_args

    extra = REGROW_FLAGS + (("--quantization", "nf4") if quantized else ())

    def log(out):
        with open(out / "train_log.jsonl") as f:
            return [json.loads(line)["loss"] for line in f]

    straight = tmp_path / "straight"
    train_sft.main(train_args(tiny_dir, alpaca_40, straight, *extra, "--save_steps", "1", "--save_total_limit", "0"))
    final = load_file(straight / "sift_increment.safetensors")
    first = load_file(straight / "checkpoint-2" / "sift_increment.safetensors")  # before the first regrow
    assert any(not torch.equal(first[k], final[k]) for k in final if k.endswith(".indices"))
    for at in (2, 3):  # inside the first window; right after the first regrow
        out = tmp_path / f"from-{at}"
        train_sft.main(train_args(tiny_dir, alpaca_40, out, *extra, "--resume_from_checkpoint",
                                  str(straight / f"checkpoint-{at}")))
        assert log(out) == log(straight)[at:]
        mine = load_file(out / "sift_increment.safetensors")
        assert mine.keys() == final.keys() and all(torch.equal(mine[k], final[k]) for k in final), at
    if not quantized:  # format 2 after regrows: base + increment is merged/, bit for bit
        from transformers import AutoModelForCausalLM

        from sift import apply_increment

        base = AutoModelForCausalLM.from_pretrained(tiny_dir)
        apply_increment(base, str(straight / "sift_increment.safetensors"))
        merged = AutoModelForCausalLM.from_pretrained(straight / "merged")
        assert all(torch.equal(a, b) for a, b in zip(base.parameters(), merged.parameters()))


def test_zero2_two_ranks_choose_alike_and_equal_one_process_with_twice_the_batch(tiny_dir, alpaca_40, tmp_path):
    import os
    import subprocess

    from safetensors.torch import load_file

    import train_sft
    from conftest import train_args
    from test_deepspeed import LAUNCHER, REPO, assert_increments_close, free_port

    single, ranks = tmp_path / "single", tmp_path / "ranks"
    train_sft.main(train_args(tiny_dir, alpaca_40, single, *REGROW_FLAGS, "--per_device_train_batch_size", "2"))
    cmd = [LAUNCHER, "--num_gpus", "2", "--master_port", str(free_port()), "tests/ds_regrow_ranks.py",
           *train_args(tiny_dir, alpaca_40, ranks, *REGROW_FLAGS, "--per_device_train_batch_size", "1"),
           "--deepspeed", os.path.join("ds_configs", "zero2.json")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    a, b = (torch.load(ranks / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert a["regrow_steps"] == b["regrow_steps"] == 6
    for key in ("indices", "values"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][n], b[key][n]) for n in a[key]), key
    assert_increments_close(single, ranks)  # the same entries as one process with twice the batch, close values
    first = {n: t for n, t in load_file(single / "sift_increment.safetensors").items() if n.endswith(".indices")}
    assert first and all(torch.equal(a["indices"][n.removesuffix(".indices")], t) for n, t in first.items())
