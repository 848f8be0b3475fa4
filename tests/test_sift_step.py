"""SIFT's step against references: float64 masked AdamW, 8-bit vs fp32, bf16 masters, step modes."""
import copy
import io
import math

import pytest
import torch

from conftest import batch, tiny_llama
from sift import SIFT, SIFTConfig


def targets_of(model, opt):
    params = dict(model.named_parameters())
    return {s.name: params[s.name] for s in opt.slots}


def run(model, opt, steps, accum=1, start=0):
    losses = []
    for step in range(start, start + steps):
        for micro in range(accum):
            loss = model(**batch(100 * step + micro)).loss / accum
            loss.backward()
            losses.append(loss.item())
        opt.step()
        opt.zero_grad()
    return losses


def test_matches_float64_masked_adamw_with_accumulation_and_clipping():
    lr, wd, betas, eps, max_norm, accum, steps = 1e-2, 0.1, (0.9, 0.99), 1e-8, 0.05, 2, 4
    model = tiny_llama()
    ref_model = copy.deepcopy(model)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = SIFTConfig(rate=0.1, optimizer="adamw", lr=lr, betas=betas, eps=eps, weight_decay=wd,
                     max_grad_norm=max_norm)
    opt = SIFT(model, cfg)

    # first micro-batch's dense gradient, computed independently, defines the expected selection
    ref_model(**batch(0)).loss.div(accum).backward()
    first = {n: p.grad.clone() for n, p in ref_model.named_parameters() if n in targets_of(model, opt)}
    ref_model.zero_grad()

    run(model, opt, steps, accum)
    chosen = opt.selected_indices()
    assert set(chosen) == set(first)
    for name, g in first.items():
        k = math.ceil(0.1 * g.numel())
        expected = torch.topk(g.reshape(-1).abs(), k).indices.sort().values
        assert chosen[name].dtype == torch.int32
        assert torch.equal(chosen[name].long(), expected), name

    # float64 reference: masked AdamW, decoupled decay, global clipping, bias correction
    params = dict(ref_model.named_parameters())
    p64 = {n: params[n].detach().double().reshape(-1)[chosen[n].long()] for n in chosen}
    m = {n: torch.zeros_like(v) for n, v in p64.items()}
    v = {n: torch.zeros_like(x) for n, x in p64.items()}
    for step in range(steps):
        g = {n: torch.zeros_like(x) for n, x in p64.items()}
        for micro in range(accum):
            ref_model(**batch(100 * step + micro)).loss.div(accum).backward()
            for n in g:
                g[n] += params[n].grad.double().reshape(-1)[chosen[n].long()]
            ref_model.zero_grad()
        norm = torch.sqrt(sum((x ** 2).sum() for x in g.values()))
        coef = min(1.0, max_norm / (norm.item() + 1e-6))
        t = step + 1
        with torch.no_grad():
            for n in p64:
                gn = g[n] * coef
                p64[n] *= 1 - lr * wd
                m[n] = betas[0] * m[n] + (1 - betas[0]) * gn
                v[n] = betas[1] * v[n] + (1 - betas[1]) * gn * gn
                p64[n] -= lr / (1 - betas[0] ** t) * m[n] / ((v[n] / (1 - betas[1] ** t)).sqrt() + eps)
                params[n].view(-1)[chosen[n].long()] = p64[n].float()

    for name, p in model.named_parameters():
        if name not in chosen:
            assert torch.equal(p, w0[name]), f"{name} is not trained but changed"
            continue
        flat, base = p.detach().reshape(-1), w0[name].reshape(-1)
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[chosen[name].long()] = True
        assert torch.equal(flat[~mask], base[~mask]), f"unselected entries of {name} changed"
        ours = flat[mask].double() - base[mask].double()
        ref = p64[name] - base[mask].double()
        assert ref.norm() > 0
        assert (ours - ref).norm() / ref.norm() <= 2e-3, name


def test_adamw8bit_tracks_fp32_adamw():
    updates = {}
    for optimizer in ("adamw", "adamw8bit"):
        model = tiny_llama(hidden=64)
        w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = SIFT(model, SIFTConfig(rate=0.05, optimizer=optimizer, lr=1e-3, weight_decay=0.01))
        run(model, opt, steps=5)
        updates[optimizer] = torch.cat([(p.detach() - w0[n]).reshape(-1) for n, p in model.named_parameters()])
    a, b = updates["adamw"], updates["adamw8bit"]
    assert a.norm() > 0
    assert (a - b).norm() / a.norm() < 0.05


def test_bf16_updates_below_one_ulp_accumulate_in_the_fp32_master():
    model = tiny_llama(dtype=torch.bfloat16)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = SIFT(model, SIFTConfig(rate=0.05, optimizer="adamw", lr=2e-5, max_grad_norm=None))
    naive = None
    for step in range(40):
        before = {s.name: s.values() for s in opt.slots if s.ready()}
        model(**batch(0)).loss.backward()  # one batch: a steady direction, as fine-tuning mostly has
        opt.step()
        opt.zero_grad()
        if naive is None:  # a bf16 weight updated in place with the same fp32 deltas
            naive = {s.name: w0[s.name].reshape(-1)[s.indices()].clone() for s in opt.slots}
            before = {n: v.float() for n, v in naive.items()}
        for s in opt.slots:
            naive[s.name] = (naive[s.name].float() + (s.values() - before[s.name])).bfloat16()
    # |w| >= 2^-5: half a bf16 ulp is >= 2^-13 = 1.2e-4, far above any single step of lr 2e-5
    moved = total = big = big_moved = naive_big_moved = 0
    for s in opt.slots:
        assert s.values().dtype == torch.float32
        idx = s.indices()
        start = w0[s.name].reshape(-1)[idx]
        now = s.param.detach().reshape(-1)[idx]
        large = start.float().abs() >= 2 ** -5
        moved += int((now != start).sum())
        total += idx.numel()
        big += int(large.sum())
        big_moved += int((now != start)[large].sum())
        naive_big_moved += int((naive[s.name] != start)[large].sum())
    assert moved > 0.5 * total, f"only {moved}/{total} selected bf16 entries moved"
    assert big > 50 and big_moved > 0.5 * big, f"{big_moved}/{big} large entries moved"
    assert naive_big_moved == 0, f"a naive bf16 update kept {naive_big_moved}/{big} sub-ulp updates"


@pytest.mark.parametrize("group", [1, 4096, SIFT.IN_BACKWARD_GROUP])  # each tensor alone, a few, all at once
@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_step_in_backward_equals_deferred(optimizer, group, monkeypatch):
    monkeypatch.setattr(SIFT, "IN_BACKWARD_GROUP", group)
    weights = []
    for in_backward in (False, True):
        model = tiny_llama()
        opt = SIFT(model, SIFTConfig(rate=0.1, optimizer=optimizer, lr=1e-3, weight_decay=0.01,
                                     max_grad_norm=None, step_in_backward=in_backward))
        run(model, opt, steps=3)
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))


def test_step_in_backward_refuses_accumulation():
    model = tiny_llama()
    opt = SIFT(model, SIFTConfig(rate=0.1, max_grad_norm=None, step_in_backward=True))
    model(**batch(0)).loss.backward()
    with pytest.raises(RuntimeError, match="cannot accumulate"):
        model(**batch(1)).loss.backward()


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_resume_is_bit_exact(optimizer):
    cfg = dict(rate=0.1, optimizer=optimizer, lr=1e-3, weight_decay=0.01)
    model = tiny_llama()
    opt = SIFT(model, SIFTConfig(**cfg))
    straight = run(model, opt, steps=4, accum=2)
    final = [p.detach().clone() for p in model.parameters()]

    model = tiny_llama()
    opt = SIFT(model, SIFTConfig(**cfg))
    first = run(model, opt, steps=2, accum=2)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    model = tiny_llama()  # a fresh base model: the state carries the trained values
    opt = SIFT(model, SIFTConfig(**cfg))
    opt.load_state_dict(torch.load(buf, weights_only=True))
    second = run(model, opt, steps=2, accum=2, start=2)
    assert first + second == straight
    assert all(torch.equal(a, b) for a, b in zip(final, model.parameters()))


def test_non_finite_step_is_skipped_as_a_whole():
    model = tiny_llama()
    opt = SIFT(model, SIFTConfig(rate=0.1, lr=1e-2))
    run(model, opt, steps=1)
    weights = [p.detach().clone() for p in model.parameters()]
    states = {s.name: {k: v.clone() for k, v in s.state().items() if torch.is_tensor(v)} for s in opt.slots}
    poisoned = model.model.layers[1].mlp.down_proj.weight
    handle = poisoned.register_hook(lambda g: g.index_fill(1, torch.tensor([0]), float("nan")))
    run(model, opt, steps=1)
    handle.remove()
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    for s in opt.slots:
        assert s.grad is None
        for k, v in states[s.name].items():
            assert torch.equal(v, s.state()[k]), (s.name, k)
    run(model, opt, steps=1)  # training goes on afterwards
    assert opt.skipped_steps == 1
    assert not all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))


@pytest.mark.parametrize("host_branch", [("cpu",), ()])  # () forces the GPU's sync-free where-restore
@pytest.mark.parametrize("group", [1, 4096, SIFT.IN_BACKWARD_GROUP])
def test_step_in_backward_leaves_non_finite_tensors_untouched(group, host_branch, monkeypatch):
    monkeypatch.setattr(SIFT, "IN_BACKWARD_GROUP", group)
    monkeypatch.setattr(SIFT, "HOST_BRANCH", host_branch)
    model = tiny_llama()
    opt = SIFT(model, SIFTConfig(rate=0.1, lr=1e-2, max_grad_norm=None, step_in_backward=True))
    run(model, opt, steps=1)
    poisoned = model.model.layers[1].mlp.down_proj.weight
    before, others = poisoned.detach().clone(), model.model.layers[0].mlp.up_proj.weight.detach().clone()
    handle = poisoned.register_hook(lambda g: g.index_fill(1, torch.tensor([0]), float("inf")))
    with pytest.warns(UserWarning, match="non-finite"):
        run(model, opt, steps=1)
    handle.remove()
    assert opt.skipped_steps == 1
    assert torch.equal(poisoned, before)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, others)


def test_lr_schedulers_drive_the_step():
    from transformers import get_scheduler

    model = tiny_llama()
    opt = SIFT(model, SIFTConfig(rate=0.1, lr=1e-2, optimizer="adamw"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0 if step == 0 else 1.0)
    weights = [p.detach().clone() for p in model.parameters()]
    run(model, opt, steps=1)
    sched.step()
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    run(model, opt, steps=1)
    assert not all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))

    opt2 = SIFT(tiny_llama(), SIFTConfig(rate=0.1, lr=1e-2))
    sched2 = get_scheduler("linear", opt2, num_warmup_steps=2, num_training_steps=10)
    assert opt2.param_groups[0]["lr"] == 0.0
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(5e-3)


def test_dense_parameters_train_with_adamw():
    model = tiny_llama()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = SIFT(model, SIFTConfig(rate=0.1, dense=("norm",), optimizer="adamw", lr=1e-2))
    run(model, opt, steps=2)
    norms = [n for n in w0 if "norm" in n]
    assert norms and all((dict(model.named_parameters())[n] != w0[n]).all() for n in norms)
    assert not dict(model.named_parameters())["model.embed_tokens.weight"].requires_grad


def test_memory_report_counts_bytes_by_hand():
    """6 B per padded entry on bf16 (2 index + 2 remainder + 2 moments), 4 B on fp32, + tables."""
    for dtype, master in ((torch.bfloat16, 2), (torch.float32, 0)):
        model = tiny_llama(dtype=dtype, hidden=64)
        params = dict(model.named_parameters())
        opt = SIFT(model, SIFTConfig(rate=0.05))
        model(**batch(0)).loss.backward()
        report = opt.memory_report()
        targets = [n for n in params if n.rsplit(".", 2)[-2] in SIFTConfig().targets]
        k = {n: math.ceil(0.05 * params[n].numel()) for n in targets}
        kp = {n: math.ceil(k[n] / 256) * 256 for n in targets}
        blocks = {n: math.ceil(params[n].numel() / 2**15) for n in targets}
        tables = sum(4 * b for b in blocks.values()) + 8 * max(blocks.values())  # int32 counts, the bank's starts
        padded = sum(kp.values())
        assert report["entries"] == sum(k.values())
        assert report["indices"] == 2 * padded + tables
        assert report["master"] == master * padded
        flags = len(targets)  # one skip flag per tensor (step_in_backward), a byte each
        pad = 4 * 256  # one bank: its fp32 zeros between slots in a chunk
        assert report["optimizer_states"] == 2 * padded + 2 * 4 * padded // 256 + flags + pad  # no qmaps before step()
        assert report["sparse_grads"] == params[targets[0]].element_size() * sum(k.values())
        opt.step()
        # the step's table of the bank's one run: per slot its blocks' starts (int64) and counts
        # (int32), + one (0, padding) block
        run_table = 12 * (sum(blocks.values()) + len(targets))
        assert opt.memory_report()["indices"] == 2 * padded + tables + run_table
        assert opt.memory_report()["optimizer_states"] == 2 * padded + 8 * padded // 256 + flags + 2 * 256 * 4 + pad
        assert opt.memory_report()["sparse_grads"] == 0
        state = sum(t.nbytes for t in opt.state_tensors())
        assert state == opt.memory_report()["persistent"]  # the benchmarks' count agrees


def test_bytes_per_entry_at_7b_shapes():
    """The layout's figures at LLaMA-7B / 5 %, counted on meta tensors (no memory needed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=1, num_attention_heads=32,
                      vocab_size=32000)
    for dtype, limit in ((torch.bfloat16, 6.1), (torch.float32, 4.1)):
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg).to(dtype)
        report = SIFT(model, SIFTConfig(rate=0.05, selection="random")).memory_report()
        assert report["bytes_per_entry"] <= limit, report
