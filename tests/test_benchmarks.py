"""benchmarks/: the byte counter against hand-counted tensors, the planner against a measured step,
and the memory / speed machinery on a tiny model. No timing assertions: this machine is shared."""
import copy
import gc

import pytest
import torch

from benchmarks import memory_plan, memory_speed, quality
from benchmarks.memtrack import MemoryTracker, nbytes_of
from benchmarks.methods import Method, Trainee, compared_methods, lora_rank_for_rate, sift_rate_for_rank, targets_of
from benchmarks.sparsity import mean_pairwise_overlap
from conftest import batch, tiny_llama


def test_tracker_counts_hand_counted_tensors():
    with MemoryTracker() as mt:
        a = torch.empty(1000)                              # 4000 B
        b = torch.zeros(10, 10, dtype=torch.float64)       # 800 B
        view = a[10:].view(-1)                             # a view: no new storage
        a.add_(1)                                          # in place: nothing new
        c = a * 2                                          # 4000 B
        assert mt.current == 8800
        del a
        assert mt.current == 8800, "the view keeps a's storage alive"
        del view
        assert mt.current == 4800
        i = torch.tensor([[0, 1], [2, 0]])                 # int64 (2, 2): 32 B
        v = torch.ones(2)                                  # 8 B
        s = torch.sparse_coo_tensor(i, v, (3, 3)).coalesce()  # its own indices (32 B) and values (8 B)
        assert mt.current == 4800 + 40 + nbytes_of(s)
        assert nbytes_of(s) == 40
        del c, s, i, v
        gc.collect()
        assert mt.current == 800
    assert mt.peak == 8800
    del b


def test_tracker_categories_and_peak_snapshot():
    w = torch.randn(256, 256)                              # existed before the tracker: added by hand
    with MemoryTracker() as mt:
        mt.add([w], "params")
        with mt.phase("forward"):
            act = torch.randn(64, 256)                     # 64 KiB
        with mt.phase("backward"):
            tmp = torch.randn(128, 256)                    # 128 KiB, dies before the end
            g = torch.randn(256, 256)                      # 256 KiB, named a gradient later
            del tmp
        mt.tag([g], "grads")                               # renames it in the peak snapshot too
    bd = mt.peak_breakdown()
    assert bd["params"] == bd["grads"] == 256 * 256 * 4
    assert bd["activations"] == 64 * 256 * 4 and bd["backward"] == 128 * 256 * 4
    assert mt.peak == sum(bd.values())
    del act, g


def test_tracker_sees_sift_state_exactly_as_sift_reports_it():
    model = tiny_llama(layers=2, hidden=64, vocab=128)
    method = Method("s", "sift", rate=0.05)
    trainee, steps, after = memory_speed.track_steps(method, model, [batch(i, vocab=128) for i in range(2)], 2)
    report = trainee.sift_report()
    assert after["breakdown"]["optimizer"] == report["persistent"]  # quantile maps and tables included
    assert after["breakdown"]["params"] == nbytes_of(list(model.parameters()) + list(model.buffers()))
    trainee.close()


def test_full_adamw_end_of_step_is_params_plus_states():
    model = tiny_llama(layers=1, hidden=64, vocab=128)
    trainee, steps, after = memory_speed.track_steps(Method("f", "full"), model, [batch(0, vocab=128)], 2)
    n = sum(p.numel() for p in model.parameters())
    step_counters = 4 * len(list(model.parameters()))      # one fp32 scalar per parameter
    assert after["breakdown"]["optimizer"] == 8 * n + step_counters
    # peak of a full step holds at least weights, gradients and both moments
    assert steps[-1]["peak"] >= 16 * n


def test_rank_and_rate_matching():
    model = tiny_llama(layers=2, hidden=64, vocab=128)
    rank = lora_rank_for_rate(model, 0.05)
    rate = sift_rate_for_rank(model, rank)
    lora = Trainee(Method("l", "lora", rank=rank), copy.deepcopy(model))
    sift = Trainee(Method("s", "sift", rate=rate), copy.deepcopy(model))
    assert abs(lora.entries - sift.entries) <= len(targets_of(model))  # ceil per tensor
    sift.close()


@pytest.mark.parametrize("ckpt", [False, True])
def test_planner_matches_a_measured_cpu_step_within_10_percent(ckpt):
    """The planner runs the real step on meta tensors; the measurement runs it on CPU tensors."""
    cfg = tiny_llama(layers=2, hidden=64, vocab=128).config
    methods = [Method("floor", "floor"), Method("lora", "lora", rank=4), Method("original", "original", rate=0.05),
               Method("sift", "sift", rate=0.05), Method("sift-ib", "sift", rate=0.05, step_in_backward=True)]
    if not ckpt:
        methods.insert(1, Method("full", "full"))
    # 96 tokens: an S x S attention matrix (what meta's math-path SDPA would keep) would be visible
    batches = [batch(i, size=2, length=96, vocab=128) for i in range(2)]
    for method in methods:  # step 2: every optimizer's state exists (the original profile's from step 3)
        model = memory_plan.build(cfg, "cpu", torch.float32, ckpt)
        _, steps, _ = memory_speed.track_steps(method, model, batches, 2)
        plan = memory_plan.plan(cfg, method, batch_size=2, seq_len=96, dtype=torch.float32,
                                gradient_checkpointing=ckpt, steps=2)
        measured = steps[-1]["peak"]  # on CPU, host-resident state is resident: compare like with like
        assert abs(plan["peak_with_host"] - measured) <= 0.10 * measured, (method.name, plan, measured)


def test_compared_methods_machinery_on_a_tiny_model():
    model = tiny_llama(layers=2, hidden=64, vocab=128)
    batches = [batch(i, vocab=128) for i in range(3)]
    methods = compared_methods(model)
    assert [m.kind for m in methods] == ["floor", "full", "full", "lora", "original"] + ["sift"] * 4
    # the full-model optimizers are covered above; the 1 % rows take the same paths as the 5 % ones
    methods = [m for m in methods if m.kind != "full" and m.rate != 0.01]
    results = memory_speed.run(model, batches, methods, tracked_steps=2, timed_steps=1, log=lambda *_: None)
    assert [r["name"] for r in results] == [m.name for m in methods]
    sift = [r for r in results if r["method"]["kind"] == "sift"]
    for r in results:
        assert r["peak_vs_floor"] >= 1.0 - 1e-9 and r["median_step_s"] > 0
    for r in sift:  # SIFT's peak is the floor plus its sparse state, nothing more
        assert r["goals"]["peak_le_floor_plus_sparse_state"], r["goals"]


@pytest.mark.parametrize("dtype, grad_bytes", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_sparse_state_counts_the_deferred_gradients_in_the_weights_dtype(dtype, grad_bytes):
    """The deferred step's sparse gradients stay in the weight's dtype until a second micro-batch
    accumulates (none does here): 4 B per entry on fp32 weights, 2 on bf16; in-backward keeps none."""
    model = tiny_llama(layers=1, hidden=64, vocab=128, dtype=dtype)
    methods = [Method("floor", "floor"), Method("deferred", "sift", rate=0.05),
               Method("in-backward", "sift", rate=0.05, step_in_backward=True)]
    results = memory_speed.run(model, [batch(i, vocab=128) for i in range(2)], methods, tracked_steps=2,
                               timed_steps=1, log=lambda *_: None)
    deferred, in_backward = results[1], results[2]
    entries = deferred["trainable_entries"]
    assert entries == deferred["sift"]["entries"] > 0
    assert deferred["goals"]["sparse_state_bytes"] == deferred["state_bytes"] + grad_bytes * entries
    assert in_backward["goals"]["sparse_state_bytes"] == in_backward["state_bytes"]


def test_mean_pairwise_overlap_matches_set_intersections():
    g = torch.Generator().manual_seed(0)
    sets = [torch.randperm(1000, generator=g)[:50].sort().values.int() for _ in range(4)]
    pairs = [(a, b) for i, a in enumerate(sets) for b in sets[i + 1:]]
    expected = sum(torch.isin(a, b).sum().item() / 50 for a, b in pairs) / len(pairs)
    assert mean_pairwise_overlap(sets, 1000) == pytest.approx(expected)
    assert mean_pairwise_overlap([sets[0], sets[0]], 1000) == 1.0


def test_heldout_loss_is_a_token_mean_not_a_mean_of_batch_means():
    model = tiny_llama(layers=1, hidden=32, vocab=64)
    a, b = batch(0, size=1, length=12), batch(1, size=2, length=12)
    b["labels"][:, :6] = -100  # fewer label tokens in the second batch
    na, nb = 11, 2 * 6  # labels are shifted by one inside the loss: positions 6..11 of each row
    expected = (model(**a).loss.item() * na + model(**b).loss.item() * nb) / (na + nb)
    assert quality.heldout_loss(model, [a, b]) == pytest.approx(expected, rel=1e-6)
