"""QSIFT (SIFT on a 4-bit base) against float64 autograd on the dense effective weight."""
import copy
import json
import math
import weakref

import pytest
import torch

import train_sft
from conftest import batch, tiny_llama, train_args
from test_deepspeed import assert_increments_close, launch, log
from sift import SIFT, SIFTConfig
from sift import qlinear
from sift.quantize import (QuantizedIncrementError, apply_increment, apply_onto_full, attach, increment_tensors,
                           layers, quantization_info, quantize, restore, save_increment)


def quantized(seed=0, quant_type="nf4", rate=0.1, selection="grad", **kw):
    """(fp32 original, quantized copy with deltas attached)."""
    fp = tiny_llama(seed=seed, **kw)
    q = quantize(copy.deepcopy(fp), quant_type=quant_type)
    attach(q, rate, selection, seed=seed)
    return fp, q


def dense_reference(fp, q):
    """A float64 copy of the model whose target weights are q's effective weights."""
    ref = copy.deepcopy(fp).double()
    params = dict(ref.named_parameters())
    for name, layer in layers(q).items():
        with torch.no_grad():
            params[name].copy_(layer.effective_weight().double())
    return ref, params


def test_gathered_gradient_and_selection_match_float64_autograd():
    fp, q = quantized(rate=0.1)
    for layer in layers(q).values():
        layer.delta.requires_grad_(True)
    q(**batch(0)).loss.backward()
    ref, params = dense_reference(fp, q)
    ref(**batch(0)).loss.backward()
    for name, layer in layers(q).items():
        dw = params[name].grad.reshape(-1)
        k = math.ceil(0.1 * dw.numel())
        assert layer.indices().dtype == torch.int32 and layer.indices().numel() == k == layer.delta.numel()
        expected = torch.topk(dw.abs(), k).indices.sort().values
        assert torch.equal(layer.indices().long(), expected), f"{name}: not the top-k |dL/dW| of the first micro-batch"
        # fp32 matmuls vs float64: 1e-5 of the layer's largest gradient entry
        got, want = layer.delta.grad.double(), dw[expected]
        assert (got - want).abs().max() <= 1e-5 * dw.abs().max(), name


def test_steps_follow_float64_masked_adamw_and_unselected_entries_stay_deq():
    lr, wd, betas, eps, max_norm, accum, steps = 1e-2, 0.1, (0.9, 0.99), 1e-8, 0.05, 2, 4
    fp, q = quantized(rate=0.1)
    deq0 = {n: layer.dequantized().clone() for n, layer in layers(q).items()}
    opt = SIFT(q, SIFTConfig(rate=0.1, optimizer="adamw", lr=lr, betas=betas, eps=eps, weight_decay=wd,
                             max_grad_norm=max_norm))
    for step in range(steps):
        for micro in range(accum):
            q(**batch(100 * step + micro)).loss.div(accum).backward()
        opt.step()
        opt.zero_grad()

    # float64: W = deq(Q) + scatter(idx, delta), AdamW on delta (decoupled decay, global clipping)
    ref, params = dense_reference(fp, quantized(rate=0.1)[1])  # fresh: delta = 0, W = deq(Q)
    idx = {n: layer.indices().long() for n, layer in layers(q).items()}
    base = {n: params[n].detach().clone().reshape(-1) for n in idx}
    d64 = {n: torch.zeros(i.numel(), dtype=torch.float64) for n, i in idx.items()}
    m = {n: torch.zeros_like(v) for n, v in d64.items()}
    v = {n: torch.zeros_like(x) for n, x in d64.items()}
    for step in range(steps):
        g = {n: torch.zeros_like(x) for n, x in d64.items()}
        for micro in range(accum):
            ref(**batch(100 * step + micro)).loss.div(accum).backward()
            for n in g:
                g[n] += params[n].grad.reshape(-1)[idx[n]]
            ref.zero_grad()
        coef = min(1.0, max_norm / (torch.sqrt(sum((x ** 2).sum() for x in g.values())).item() + 1e-6))
        t = step + 1
        with torch.no_grad():
            for n in d64:
                gn = g[n] * coef
                d64[n] *= 1 - lr * wd
                m[n] = betas[0] * m[n] + (1 - betas[0]) * gn
                v[n] = betas[1] * v[n] + (1 - betas[1]) * gn * gn
                d64[n] -= lr / (1 - betas[0] ** t) * m[n] / ((v[n] / (1 - betas[1] ** t)).sqrt() + eps)
                flat = base[n].clone()
                flat[idx[n]] += d64[n]
                params[n].copy_(flat.view_as(params[n]))

    for name, layer in layers(q).items():
        ours, want = layer.delta.detach().double(), d64[name]
        assert want.norm() > 0
        assert (ours - want).norm() / want.norm() <= 2e-3, name
        w = layer.effective_weight().reshape(-1)
        mask = torch.zeros_like(w, dtype=torch.bool).index_fill_(0, idx[name], True)
        assert torch.equal(w[~mask], deq0[name].reshape(-1)[~mask]), f"unselected entries of {name} moved off deq(Q)"
        assert torch.equal(w[mask], (deq0[name].reshape(-1)[mask] + layer.delta.detach()))


def peak_transients(n_layers: int, checkpointing: bool) -> int:
    _, q = quantized(rate=0.05, layers=n_layers)
    opt = SIFT(q, SIFTConfig(rate=0.05))
    if checkpointing:
        q.activation_checkpointing_enable({"use_reentrant": False})
    q.train()
    alive, peak = [0], [0]

    def track(t):
        alive[0] += 1
        peak[0] = max(peak[0], alive[0])
        weakref.finalize(t, lambda: alive.__setitem__(0, alive[0] - 1))

    qlinear.TRANSIENT_OBSERVERS.append(track)
    try:
        for step in range(2):
            q(**batch(step)).loss.backward()
            assert alive[0] == 0, "a dequantized weight or dense weight gradient outlived backward"
            assert all(p.grad is None for p in q.parameters()), "a .grad survived SIFT's hooks"
            opt.step()
            opt.zero_grad()
    finally:
        qlinear.TRANSIENT_OBSERVERS.remove(track)
    return peak[0]


def test_one_dense_transient_at_a_time_with_and_without_checkpointing():
    peaks = {(n, ckpt): peak_transients(n, ckpt) for n in (2, 8) for ckpt in (False, True)}
    assert set(peaks.values()) == {1}, peaks


@pytest.mark.parametrize("selection", ["random", "magnitude"])
def test_selection_before_training(selection):
    _, q = quantized(rate=0.07, selection=selection, seed=3)
    again = quantized(rate=0.07, selection=selection, seed=3)[1]
    for name, layer in layers(q).items():
        idx = layer.indices().long()
        assert idx.numel() == math.ceil(0.07 * layer.shape.numel()) and torch.equal(idx, idx.unique())
        assert torch.equal(layer.indices(), layers(again)[name].indices())
        if selection == "magnitude":
            w = layer.dequantized().reshape(-1).abs()
            rest = torch.ones_like(w, dtype=torch.bool).index_fill_(0, idx, False)
            assert w[idx].min() >= w[rest].max()


def train(q, opt, steps, start=0):
    losses = []
    for step in range(start, start + steps):
        for micro in range(2):
            loss = q(**batch(100 * step + micro)).loss / 2
            loss.backward()
            losses.append(loss.item())
        opt.step()
        opt.zero_grad()
    return losses


def test_resume_is_bit_exact():
    cfg = SIFTConfig(rate=0.05, lr=1e-2, weight_decay=0.01)
    fp, q = quantized(rate=0.05)
    opt = SIFT(q, cfg)
    train(q, opt, 2)
    # delta is an increment itself (base 0): no host copy of a base, none in the checkpoint
    assert opt.host_tensors() == [] and opt.memory_report()["host_base"] == 0
    assert all("base" not in st for st in opt.state_dict()["slots"].values())
    assert all(torch.equal(b, torch.zeros(s.k)) for s, b in zip(opt.slots, opt.base_values().values()))
    saved_opt, saved_inc = copy.deepcopy(opt.state_dict()), increment_tensors(q)
    straight = train(q, opt, 3, start=2)

    fresh = quantize(copy.deepcopy(fp))
    attach(fresh, 0.05)
    opt2 = SIFT(fresh, cfg)
    restore(fresh, saved_inc, {"quantization": json.dumps(quantization_info(fresh))})
    opt2.load_state_dict(saved_opt)
    assert train(fresh, opt2, 3, start=2) == straight
    for name, layer in layers(q).items():
        other = layers(fresh)[name]
        assert torch.equal(layer.indices(), other.indices()) and torch.equal(layer.delta, other.delta), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_increment_onto_full_precision_and_quantized_bases(tmp_path, dtype):
    fp = tiny_llama(dtype=dtype)
    q = quantize(copy.deepcopy(fp))
    attach(q, 0.05)
    opt = SIFT(q, SIFTConfig(rate=0.05, lr=1e-2))
    train(q, opt, 3)
    path = str(tmp_path / "inc.safetensors")
    save_increment(q, path, base_model="tiny", rate=0.05, selection="grad")

    merged = copy.deepcopy(fp)
    meta = apply_increment(merged, path)
    assert '"type": "nf4"' in meta["quantization"] and '"block_size": 64' in meta["quantization"]
    base, new = dict(fp.named_parameters()), dict(merged.named_parameters())
    trained = layers(q)
    for name, p in new.items():
        if name not in trained:
            assert torch.equal(p, base[name]), name
            continue
        idx, delta = trained[name].indices().long(), trained[name].delta.detach()
        expected = base[name].detach().reshape(-1).double().clone()
        expected[idx] += delta.double()
        got = p.detach().reshape(-1)
        assert torch.equal(got, expected.to(dtype)) or dtype == torch.float32 and \
            (got.double() - expected).abs().max() <= 2 ** -23 * expected.abs().max(), name
        assert not torch.equal(got, base[name].reshape(-1))

    requant = quantize(copy.deepcopy(fp))
    apply_increment(requant, path)
    for name, layer in layers(requant).items():
        assert torch.equal(layer.effective_weight(), trained[name].effective_weight()), name
    with torch.no_grad():
        assert torch.equal(requant(**batch(7)).logits, q(**batch(7)).logits)


def test_malformed_increments_are_refused_clearly(tmp_path):
    fp, q = quantized(rate=0.05)
    opt = SIFT(q, SIFTConfig(rate=0.05))
    train(q, opt, 1)
    path = str(tmp_path / "inc.safetensors")
    save_increment(q, path)

    fp4 = quantize(copy.deepcopy(fp), quant_type="fp4")
    with pytest.raises(QuantizedIncrementError, match=r"inc.safetensors: trained on another quantized base: type 'nf4' \(model: 'fp4'\)"):
        apply_increment(fp4, path)
    wider = quantize(tiny_llama(hidden=64))
    with pytest.raises(QuantizedIncrementError, match=r"down_proj.weight: recorded shape \[32, 64\], this model.s is \[64, 128\]"):
        apply_increment(wider, path)
    with pytest.raises(QuantizedIncrementError, match="recorded shape"):
        apply_increment(tiny_llama(hidden=64), path)  # the full-precision route checks it too
    tensors = increment_tensors(q)
    name = next(iter(tensors)).rsplit(".", 1)[0]
    bad = dict(tensors)
    bad[f"{name}.indices"] = bad[f"{name}.indices"].flip(0)
    with pytest.raises(QuantizedIncrementError, match="not strictly increasing"):
        restore(copy.deepcopy(q), bad)
    bad[f"{name}.indices"] = tensors[f"{name}.indices"] + 10**6
    with pytest.raises(QuantizedIncrementError, match=r"out of range \[0, 1024\)"):
        apply_onto_full(copy.deepcopy(fp), bad)
    with pytest.raises(QuantizedIncrementError, match="no quantized layers"):
        restore(copy.deepcopy(fp), tensors)
    (tmp_path / "torn.safetensors").write_bytes(open(path, "rb").read()[:100])
    with pytest.raises(QuantizedIncrementError, match="torn.safetensors: not a readable safetensors"):
        apply_increment(copy.deepcopy(q), str(tmp_path / "torn.safetensors"))


def test_qsift_increments_carry_both_base_fingerprints_and_applying_checks_them(tmp_path):
    """The full-precision base's fingerprint (read through `base_values`, as the trainer reads the base's
    weights files) and deq(Q)'s: a model of the same shapes with other values is refused on both routes,
    naming both fingerprints, and --force applies anyway with a warning."""
    from sift.increment import IncrementError, apply_increment as apply_sift, model_fingerprint
    from sift.quantize import load_increment, quantized_fingerprint

    fp, q = quantized(rate=0.05)
    opt = SIFT(q, SIFTConfig(rate=0.05, lr=1e-2))
    train(q, opt, 2)
    params = dict(fp.named_parameters())
    path = str(tmp_path / "inc.safetensors")
    save_increment(q, path, base_model="tiny", base_values=lambda name, at: params[name].detach().view(-1)[at])
    tensors, meta = load_increment(path)
    assert meta["base_fingerprint"] == model_fingerprint(fp, tensors)
    assert meta["quantized_base_fingerprint"] == quantized_fingerprint(quantize(copy.deepcopy(fp)), tensors)
    assert meta["base_fingerprint"] != meta["quantized_base_fingerprint"]  # deq(Q) is not the base

    other = tiny_llama(seed=1)  # the same shapes, other weights
    found = model_fingerprint(other, tensors)
    for apply in (apply_increment, apply_sift):  # QSIFT's own route (eval) and SIFT's (the exports)
        with pytest.raises(IncrementError, match=rf"this model is not the base the increment was trained from "
                                                 rf"\(base fingerprint {found}, the file records {meta['base_fingerprint']}"):
            apply(copy.deepcopy(other), path)
    with pytest.raises(IncrementError, match=r"not the 4-bit base the increment was trained from \(quantized base "
                                             rf"fingerprint [0-9a-f]{{32}}, the file records {meta['quantized_base_fingerprint']}"):
        apply_increment(quantize(copy.deepcopy(other)), path)
    with pytest.warns(UserWarning, match="applying anyway"):
        forced = apply_increment(quantize(copy.deepcopy(other)), path, force=True)
    assert forced["base_model"] == "tiny"
    with pytest.warns(UserWarning, match="applying anyway"):
        apply_increment(copy.deepcopy(other), path, force=True)
    merged = copy.deepcopy(fp)
    apply_increment(merged, path)  # its own bases pass
    requant = quantize(copy.deepcopy(fp))
    apply_increment(requant, path)
    for name, layer in layers(requant).items():
        assert torch.equal(layer.effective_weight(), layers(q)[name].effective_weight()), name


# ---------------------------------------------------------------- train_sft.py --quantization
def test_train_sft_qsift_end_to_end_resume_and_merged(tiny_dir, alpaca_40, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM


    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    before, after = train_sft.main(train_args(tiny_dir, alpaca_40, straight, "--quantization", "nf4",
                                              "--save_steps", "2"))
    assert after["heldout_loss"] < before["heldout_loss"]
    inc = straight / "sift_increment.safetensors"
    from sift.increment import model_fingerprint
    from sift.quantize import load_increment, quantized_fingerprint

    tensors, meta = load_increment(str(inc))  # the base's fingerprint, read from its files, is the loaded base's
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert meta["base_fingerprint"] == model_fingerprint(base, tensors)
    assert meta["quantized_base_fingerprint"] == quantized_fingerprint(quantize(copy.deepcopy(base)), tensors)
    assert (straight / "checkpoint-2" / "sift_increment.safetensors").exists()
    merged = AutoModelForCausalLM.from_pretrained(straight / "merged")
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    apply_increment(base, str(inc))  # full-precision base + delta
    for (name, a), b in zip(base.named_parameters(), merged.parameters()):
        assert torch.equal(a, b), name

    # the eval tools: onto the 4-bit base (the BitsAndBytesConfig loader, as training) == quantize() + apply
    from eval.common import load_eval_model

    evaluated, _ = load_eval_model(tiny_dir, str(inc), device="cpu", dtype="float32", quantization="nf4")
    reference = quantize(AutoModelForCausalLM.from_pretrained(tiny_dir))
    apply_increment(reference, str(inc))
    ids = batch(3, vocab=reference.config.vocab_size)["input_ids"]
    with torch.no_grad():
        assert torch.equal(evaluated(input_ids=ids).logits, reference(input_ids=ids).logits)
    plain, _ = load_eval_model(tiny_dir, str(inc), device="cpu", dtype="float32")  # base + delta
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), merged.parameters()))

    train_sft.main(train_args(tiny_dir, alpaca_40, resumed, "--quantization", "nf4",
                              "--resume_from_checkpoint", str(straight / "checkpoint-2")))
    assert log(resumed) == log(straight)[2:]
    a, b = load_file(inc), load_file(resumed / "sift_increment.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_sft_qlora_runs_and_merges(tiny_dir, alpaca_40, tmp_path):
    from transformers import AutoModelForCausalLM


    out = tmp_path / "qlora"
    train_sft.main(train_args(tiny_dir, alpaca_40, out, "--quantization", "nf4", "--finetuning_type", "lora",
                              "--learning_rate", "1e-2"))
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    changed = {n for (n, a), b in zip(base.named_parameters(), merged.parameters()) if not torch.equal(a, b)}
    assert changed and all(n.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                   "up_proj", "down_proj") for n in changed)


@pytest.mark.parametrize("flags, message", [
    (["--quantization", "int8"], "--quantization int8: choose one of none, nf4, fp4"),
    (["--quantization", "nf4", "--finetuning_type", "full"], "--quantization needs --finetuning_type sift"),
    (["--quantization", "nf4", "--sift_dense", "norm"], "--sift_dense is not supported with --quantization"),
])
def test_train_sft_refuses_bad_quantization_options(tiny_dir, alpaca_40, tmp_path, flags, message):

    with pytest.raises(SystemExit) as err:
        train_sft.main(train_args(tiny_dir, alpaca_40, tmp_path / "x", *flags))
    assert message in str(err.value)


def test_compact_indices_round_trip_across_blocks():
    layer = qlinear.QSIFTLinear.from_linear(torch.nn.Linear(300, 700, bias=False))  # 210000 entries: 7 blocks
    layer.attach(0.3, "random", torch.Generator().manual_seed(0))
    idx = torch.randperm(210000, generator=torch.Generator().manual_seed(1))[:layer.k].sort().values
    layer.select(idx)
    assert torch.equal(layer.indices(), idx.int())
    stored = sum(t.nbytes for t in layer.index_tensors())
    assert stored == 2 * layer.k + 4 * 7  # 15-bit offsets + an int32 entry count per 2^15-entry block


@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: delta's gradients kept in bf16
def test_planner_matches_a_measured_cpu_step_for_qsift_and_qlora(ckpt, dtype):
    """The 4-bit base built on meta tensors and the real step, against the same step on CPU tensors."""
    from benchmarks import memory_plan, memory_speed
    from benchmarks.methods import Method

    cfg = tiny_llama(layers=2, hidden=64, vocab=128).config
    batches = [batch(i, size=2, length=96, vocab=128) for i in range(2)]
    qsift = Method("qsift", "sift", rate=0.05, quantization="nf4")
    for method, accumulation in ((qsift, 1), (qsift, 2),  # 2: delta's gradients turn fp32
                                 (Method("qsift-ib", "sift", rate=0.05, quantization="nf4", step_in_backward=True), 1),
                                 (Method("qlora", "lora", rank=4, quantization="nf4"), 1)):
        model = memory_plan.build(cfg, "cpu", dtype, ckpt)
        _, steps, _ = memory_speed.track_steps(method, model, batches, 2, accumulation=accumulation)
        plan = memory_plan.plan(cfg, method, batch_size=2, seq_len=96, dtype=dtype,
                                gradient_checkpointing=ckpt, steps=2, accumulation=accumulation)
        measured = steps[-1]["peak"]
        assert abs(plan["peak_with_host"] - measured) <= 0.10 * measured, (method.name, plan, measured)
        assert plan["peak_breakdown"]["params"] < 0.5 * sum(p.numel() * 4 for p in tiny_llama(
            layers=2, hidden=64, vocab=128).parameters())  # the 4-bit base is counted, and small


def test_planner_refuses_a_bad_accumulation_count(capsys):
    from benchmarks import memory_plan

    with pytest.raises(SystemExit) as err:
        memory_plan.main(["--model", "llama-7b", "--gradient_accumulation_steps", "0"])
    assert err.value.code == 2 and "--gradient_accumulation_steps 0: must be >= 1" in capsys.readouterr().err


def test_zero2_two_ranks_equal_one_process_with_twice_the_batch_on_a_4bit_base(tiny_dir, alpaca_40, tmp_path):
    
    single, ranks = str(tmp_path / "single"), str(tmp_path / "ranks")
    common = ("--generate_tokens", "0", "--quantization", "nf4")
    train_sft.main(train_args(tiny_dir, alpaca_40, single, *common, "--per_device_train_batch_size", "2"))
    launch(2, "zero2.json", train_args(tiny_dir, alpaca_40, ranks, *common, "--per_device_train_batch_size", "1"))
    assert log(ranks) == pytest.approx(log(single), rel=1e-5)
    assert_increments_close(single, ranks)  # the same indices (from the all-reduced first gradient), deltas close


@pytest.mark.parametrize("accum", [1, 2])
def test_bf16_deferred_gradient_equals_an_fp32_one_bit_for_bit(accum):
    """On a bf16 base delta's deferred gradient is kept in bf16 (2 B/entry: it is gathered from the
    bf16 dW, so exactly a bf16 value) until a second micro-batch accumulates (then fp32): the run
    equals the one that keeps it in fp32 throughout, bit for bit (clipping and decay on)."""
    runs = []
    for narrow in (True, False):
        _, q = quantized(rate=0.1, dtype=torch.bfloat16)
        opt = SIFT(q, SIFTConfig(rate=0.1, lr=1e-2, weight_decay=0.01, max_grad_norm=0.05))
        for s in opt.slots:
            s.grad_dtype = torch.bfloat16 if narrow else torch.float32
        for step in range(3):
            for micro in range(accum):
                q(**batch(10 * step + micro)).loss.div(accum).backward()
                want = torch.bfloat16 if narrow and micro == 0 else torch.float32
                assert {g.dtype for g in opt.grad_tensors()} == {want}
            opt.step()
            opt.zero_grad()
        runs.append([layer.delta.detach().clone() for layer in layers(q).values()])
    assert all(torch.equal(a, b) for a, b in zip(*runs)) and any(d.abs().sum() > 0 for d in runs[0])


def test_the_delta_gradient_is_narrowed_to_the_base_dtype():
    for dtype in (torch.float32, torch.bfloat16):
        _, q = quantized(rate=0.1, dtype=dtype)
        opt = SIFT(q, SIFTConfig(rate=0.1))
        assert {s.grad_dtype for s in opt.slots} == {dtype}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_in_backward_equals_deferred_and_non_finite_steps_are_skipped(dtype):
    deltas = []
    for in_backward in (False, True):
        _, q = quantized(rate=0.1, dtype=dtype)
        opt = SIFT(q, SIFTConfig(rate=0.1, lr=1e-3, weight_decay=0.01, max_grad_norm=None,
                                 step_in_backward=in_backward))
        for step in range(3):
            q(**batch(step)).loss.backward()
            opt.step()
            opt.zero_grad()
        deltas.append([layer.delta.detach().clone() for layer in layers(q).values()])
    assert all(torch.equal(a, b) for a, b in zip(*deltas)) and any(d.abs().sum() > 0 for d in deltas[0])

    _, q = quantized(rate=0.1)
    opt = SIFT(q, SIFTConfig(rate=0.1, lr=1e-2))
    train(q, opt, 1)
    before = [layer.delta.detach().clone() for layer in layers(q).values()]
    poisoned = layers(q)["model.layers.1.mlp.down_proj.weight"].delta
    handle = poisoned.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), float("nan")))
    train(q, opt, 1)
    handle.remove()
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, layer.delta) for a, layer in zip(before, layers(q).values()))


def test_zero3_is_refused_with_a_4bit_base():
    import os

    from trainer import methods
    from trainer.args import Arguments, ModelArguments, TrainArguments
    from trainer.ds import resolve_config

    zero3 = os.path.join(os.path.dirname(train_sft.__file__), "ds_configs", "zero3_offload.json")
    four_bit, plain = (Arguments(model=ModelArguments(quantization=q), train=TrainArguments(deepspeed=zero3))
                       for q in ("nf4", "none"))
    assert methods.method_class(four_bit).problems(four_bit, resolve_config(zero3, four_bit)[0]) == [
        "--quantization with ZeRO-3: 4-bit weights are not partitioned; use ZeRO-2 or one device"]
    assert methods.method_class(plain).problems(plain, resolve_config(zero3, plain)[0]) == []


def test_bytes_per_entry_at_7b_shapes():
    """Per trained entry at LLaMA-7B / 1 %, counted on meta tensors: delta 4 B, index 2 B + an int32
    count per 2^15 weight entries (sift.codec), 8-bit moments 2 B + absmax (SIFT's dense fp32 slots)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sift.quantize import memory_report

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=1, num_attention_heads=32,
                      vocab_size=32000)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    quantize(model, double_quant=False)  # on meta, double quantization would cache bitsandbytes' map there
    attach(model, 0.01, "magnitude")     # a top-k on meta: no memory, no time
    found = list(layers(model).values())
    k = [math.ceil(0.01 * layer.numel) for layer in found]
    blocks = [math.ceil(layer.numel / 2**15) for layer in found]
    report = memory_report(model)
    assert report["delta"] == 4 * sum(k) and report["indices"] == 2 * sum(k) + 4 * sum(blocks)
    assert report["delta_and_index_bytes_per_entry"] < 6.0123  # 6.01223 with the former 2^16-entry table
    assert SIFT(model, SIFTConfig(rate=0.01)).memory_report()["bytes_per_entry"] < 2.033
