"""SIFT v2 state: the exact bf16 master, compact indices, batched step, skips, resume refusals, devices."""
import io
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import batch, tiny_llama
from sift import SIFT, SIFTConfig
from sift.state import decode_master, encode_master


def fp32_patterns() -> torch.Tensor:
    """Random finite fp32 values plus every edge of the bf16 rounding: ties both ways, binade edges
    (just below / above powers of two), the overflow to inf, subnormals, zeros."""
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31 - 1, (200_000,), generator=g, dtype=torch.int64)
    edges = []
    for hi in list(range(0, 0x7F80, 97)) + [0x7F7F, 0x3F7F, 0x3F80, 0x0000, 0x0001, 0x007F, 0x0080]:
        for lo in (0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF):
            edges.append((hi << 16) | lo)
    edges = torch.tensor(edges, dtype=torch.int64)
    bits = torch.cat([bits, edges, edges | (1 << 31)]) & 0xFFFFFFFF
    bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)
    m = bits.view(torch.float32)
    return m[torch.isfinite(m)]


def test_bf16_master_round_trips_every_edge_bit_for_bit():
    m = fp32_patterns()
    rem = torch.zeros(m.numel(), dtype=torch.int16)
    aux = torch.full((m.numel(),), 0x1234, dtype=torch.int16)  # offsets must survive the tie bit
    w = encode_master(m.clone(), rem, aux)
    assert torch.equal(w.view(torch.int16), m.bfloat16().view(torch.int16))  # the weight is RNE of the master
    back = decode_master(w, rem, aux)
    assert torch.equal(back.view(torch.int32), m.view(torch.int32))
    assert torch.equal(aux & 0x7FFF, torch.full_like(aux, 0x1234))
    ties = (m.view(torch.int32) & 0xFFFF) == 0x8000
    assert ties.sum() > 100 and (aux < 0).sum() > 0  # both tie directions were exercised
    assert torch.isinf(w).any()  # finite masters that round to inf decode exactly too


@pytest.mark.parametrize("optimizer", ["adamw8bit", "adamw"])
def test_bf16_master_equals_an_fp32_master_over_40_steps(optimizer):
    runs = []
    for fp32_master in (False, True):
        model = tiny_llama(dtype=torch.bfloat16)
        opt = SIFT(model, SIFTConfig(rate=0.2, optimizer=optimizer, lr=3e-4, weight_decay=0.01, dense=("norm",)),
                   _fp32_master=fp32_master)
        assert {b.kind for b in opt.banks} == {"fp32" if fp32_master else "rem"}
        for step in range(40):
            model(**batch(step % 3)).loss.backward()
            opt.step()
            opt.zero_grad()
        runs.append((opt.trained_values(), [p.detach().clone() for p in model.parameters()]))
    (va, wa), (vb, wb) = runs
    assert va.keys() == vb.keys()
    assert all(torch.equal(va[n].view(torch.int32), vb[n].view(torch.int32)) for n in va)
    assert all(torch.equal(a, b) for a, b in zip(wa, wb))
    assert any((va[n] != va[n].bfloat16().float()).any() for n in va)  # masters below one bf16 ulp exist


@pytest.mark.parametrize("host_branch", [("cpu",), ()], ids=["host-branch", "device-where"])
@pytest.mark.parametrize("optimizer", ["adamw8bit", "adamw"])
def test_in_backward_nan_batch_then_normal_steps_equals_the_run_without_it(optimizer, host_branch, monkeypatch):
    """Both guards: the CPU's host branch, and the GPU's sync-free where-restore (forced here);
    groups of a few tensors stepping inside backward."""
    monkeypatch.setattr(SIFT, "HOST_BRANCH", host_branch)
    monkeypatch.setattr(SIFT, "IN_BACKWARD_GROUP", 4096)

    def train(schedule):
        model = tiny_llama(dtype=torch.bfloat16)
        opt = SIFT(model, SIFTConfig(rate=0.1, optimizer=optimizer, lr=1e-3, max_grad_norm=None,
                                     step_in_backward=True))
        for b in schedule:
            loss = model(**batch(abs(b))).loss
            (loss * float("nan") if b < 0 else loss).backward()
            with pytest.warns(UserWarning, match="non-finite") if b < 0 else _nothing():
                opt.step()
            opt.zero_grad()
        return model, opt

    clean, c_opt = train([0, 1, 2, 3])
    skipped, s_opt = train([0, -1, 1, 2, 3])
    assert s_opt.skipped_steps == 1 and c_opt.skipped_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(clean.parameters(), skipped.parameters()))
    assert [s.step for s in c_opt.slots] == [s.step for s in s_opt.slots] == [4] * len(c_opt.slots)
    ca, sa = c_opt.state_dict()["slots"], s_opt.state_dict()["slots"]
    for name in ca:
        for key, v in ca[name].items():
            if torch.is_tensor(v):
                assert torch.equal(v, sa[name][key]), (name, key)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def bf16_model_with_an_fp32_delta():
    """bf16 LLaMA plus a dense fp32 parameter in the graph (the QSIFT delta's situation)."""
    model = tiny_llama(dtype=torch.bfloat16)
    norm = model.model.norm
    norm.delta = torch.nn.Parameter(torch.zeros(norm.weight.shape[0]))
    norm.register_forward_hook(lambda mod, args, out: out + mod.delta.to(out.dtype))
    return model


def test_step_is_one_bitsandbytes_call_per_bank(monkeypatch):
    from bitsandbytes import functional as bnbf

    calls = []
    real = bnbf.optimizer_update_8bit_blockwise
    monkeypatch.setattr(bnbf, "optimizer_update_8bit_blockwise", lambda *a, **k: (calls.append(k["g"].numel()), real(*a, **k)))
    model = bf16_model_with_an_fp32_delta()  # a second bank: an fp32 dense parameter
    opt = SIFT(model, SIFTConfig(rate=0.05, dense=("norm.delta",)))
    for step in range(2):
        model(**batch(step)).loss.backward()
        opt.step()
        opt.zero_grad()
    assert len(opt.banks) == 2
    assert len(calls) == 2 * 2  # two steps, one call per bank (each well below CHUNK)
    assert sorted(calls[:2]) == sorted(int(b.moments.shape[1]) for b in opt.banks)
    assert [b.side is None for b in opt.banks].count(True) == 1  # the fp32 dense bank keeps no offsets


def test_mixed_dtype_banks_step_in_backward_equals_deferred():
    weights = []
    for in_backward in (False, True):
        model = bf16_model_with_an_fp32_delta()
        opt = SIFT(model, SIFTConfig(rate=0.1, dense=("norm.delta",), lr=1e-3, max_grad_norm=None,
                                     step_in_backward=in_backward))
        for step in range(3):
            model(**batch(step)).loss.backward()
            opt.step()
            opt.zero_grad()
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))
    delta = dict(model.named_parameters())["model.norm.delta"]
    assert delta.dtype == torch.float32 and delta.abs().min() > 0  # trained densely, in fp32


RESUME = textwrap.dedent("""
    import io, sys, torch
    sys.path.insert(0, "tests")
    from conftest import batch, tiny_llama
    from sift import SIFT, SIFTConfig
    model = tiny_llama()
    opt = SIFT(model, SIFTConfig(rate=0.1, optimizer="adamw"))
    model(**batch(0)).loss.backward(); opt.step(); opt.zero_grad()
    saved = opt.state_dict()
    model = tiny_llama(**{model_kw})
    opt = SIFT(model, SIFTConfig(**{cfg_kw}))
    before = [p.detach().clone() for p in model.parameters()]
    try:
        opt.load_state_dict(saved)
    except ValueError as e:
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "touched before refusing"
        print(e)
        sys.exit(3)
    print("accepted")
""")


@pytest.mark.parametrize("model_kw, cfg_kw, needles", [
    ({}, dict(rate=0.1, optimizer="adamw8bit"), ["config optimizer: saved 'adamw', this run 'adamw8bit'",
                                                 "saved moments are torch.float32"]),
    ({}, dict(rate=0.1, optimizer="adamw", dense=("norm",)), ["config dense: saved [], this run ['norm']",
                                                              "5 trained tensors have no saved state"]),
    ({}, dict(rate=0.2, optimizer="adamw"), ["config rate: saved 0.1, this run 0.2", "saved entries, this configuration trains"]),
    (dict(hidden=48), dict(rate=0.1, optimizer="adamw"), ["saved shape [32, 32], this model's is [48, 48]"]),
    ({}, dict(rate=0.1, optimizer="adamw", targets=("q_proj",), selection="random"),
     ["config targets", "config selection", "12 saved tensors this model does not train"]),
    ({}, dict(rate=0.1, optimizer="adamw", max_grad_norm=None, step_in_backward=True), ["config step_in_backward"]),
])
def test_resume_refuses_every_mismatch_in_a_subprocess(model_kw, cfg_kw, needles):
    code = RESUME.replace("{model_kw}", repr(model_kw)).replace("{cfg_kw}", repr(cfg_kw))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, (done.returncode, done.stdout, done.stderr[-2000:])  # not a crash, not accepted
    for needle in needles:
        assert needle in done.stdout, (needle, done.stdout)


def test_resume_accepts_a_changed_learning_rate():
    model = tiny_llama()
    opt = SIFT(model, SIFTConfig(rate=0.1))
    model(**batch(0)).loss.backward()
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    SIFT(tiny_llama(), SIFTConfig(rate=0.1, lr=1e-3)).load_state_dict(torch.load(buf, weights_only=True))


@pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")
@pytest.mark.parametrize("in_backward", [False, True])
def test_zero3_gathers_and_scatters_are_device_correct(in_backward):
    """ZeRO-3 offload keeps each weight's partition `ds_tensor` on the host while the gradient, the
    indices and SIFT's state live on the GPU. Without a GPU, FakeTensorMode plays both devices:
    "meta" stands for the GPU, "cpu" for the host, and every aten op refuses mixed devices exactly
    as CUDA would (FakeTensorDeviceMismatchError), so a missing `.to()` fails here."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        model = torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False, device="meta"),
                                    torch.nn.Linear(64, 8, bias=False, device="meta"))
        for p in model.parameters():
            p.ds_tensor = torch.zeros(p.numel(), device="cpu")  # the host partition (one rank holds all)
            p.ds_numel, p.ds_shape = p.numel(), p.shape
        cfg = SIFTConfig(rate=0.1, targets=("0",), dense=("1.weight",), max_grad_norm=None,
                         step_in_backward=in_backward)
        opt = SIFT(model, cfg)
        assert {str(b.device) for b in opt.banks} == {"meta"}
        # bitsandbytes builds its quantile maps with host reads, which fake tensors cannot answer
        opt._qmaps["meta"] = (torch.zeros(256, device="meta"), torch.zeros(256, device="meta"))
        model(torch.zeros(4, 64, device="meta")).sum().backward()  # hooks: select, gather, (step, write back)
        if not in_backward:  # step() itself needs the norm on the host, which fake tensors lack
            pending = [s for s in opt.slots if s.grad is not None]
            assert len(pending) == 2
            for s in pending:
                s.step += 1
            opt.banks[0].step(pending, [s.grad for s in pending], opt.param_groups[0], opt._qmap_pair("meta"))
        values = opt.trained_values()
        assert {v.device.type for v in values.values()} == {"meta"}
        assert {t.device.type for t in opt.state_dict()["slots"]["0.weight"].values() if torch.is_tensor(t)} \
            <= {"meta", "cpu"}


def test_compact_indices_decode_exactly_with_empty_and_full_blocks():
    from sift.state import Bank, SparseState

    p = torch.nn.Parameter(torch.zeros(5 * 2**15 + 7))
    cases = [torch.tensor([0, 5, 2**15 - 1, 2**15, 3 * 2**15 + 1, 3 * 2**15 + 2]),  # blocks 2 and 4 empty
             torch.tensor([5 * 2**15 + 6]),                                          # only the last block
             torch.arange(2**15, 2 * 2**15),                                         # one full block
             torch.randperm(p.numel(), generator=torch.Generator().manual_seed(0))[:5000].sort().values]
    for idx in cases:
        s = SparseState("w", p, idx.numel())
        s.bank = Bank("cpu", torch.float32, True, False, s.kp)
        s.select(idx)
        assert torch.equal(s.indices(), idx)
        assert s.bank.aux.dtype == torch.int16 and s.counts.shape == (6,)  # 6 blocks: an entry count each
        assert torch.equal(s.bank.chunk_indices([s], 0, s.kp)[:s.k], idx)  # the step's one-pass decode
