"""Hooks free dense gradients at once; selection modes; constructor errors; target matching."""
import math
import weakref

import pytest
import torch

from conftest import batch, tiny_llama
from sift import SIFT, SIFTConfig
from sift.config import LLAMA_LINEARS
from sift.targets import matches_module


def peak_dense_grads(layers: int, checkpointing: bool) -> int:
    model = tiny_llama(layers=layers)
    alive, peak = [0], [0]

    def track(p):  # registered before SIFT's hook, so it sees each dense grad as it is born
        alive[0] += 1
        peak[0] = max(peak[0], alive[0])
        weakref.finalize(p.grad, lambda: alive.__setitem__(0, alive[0] - 1))

    for name, p in model.named_parameters():
        if any(matches_module(name, t) for t in LLAMA_LINEARS):
            p.register_post_accumulate_grad_hook(track)
    opt = SIFT(model, SIFTConfig(rate=0.05))
    if checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    for step in range(2):
        model(**batch(step)).loss.backward()
        assert alive[0] == 0
        assert all(p.grad is None for p in model.parameters()), "a dense .grad survived backward"
        opt.step()
        opt.zero_grad()
    return peak[0]


def test_dense_gradient_peak_does_not_grow_with_depth():
    peaks = {(layers, ckpt): peak_dense_grads(layers, ckpt) for layers in (2, 8) for ckpt in (False, True)}
    assert set(peaks.values()) == {1}, peaks


@pytest.mark.parametrize("selection", ["random", "magnitude"])
def test_selection_at_construction(selection):
    model = tiny_llama()
    opt = SIFT(model, SIFTConfig(rate=0.07, selection=selection, seed=3))
    idx = opt.selected_indices()
    assert len(idx) == 2 * len(LLAMA_LINEARS)
    for s in opt.slots:
        i = idx[s.name]
        assert i.numel() == math.ceil(0.07 * s.param.numel()) and i.dtype == torch.int32
        assert torch.equal(i, i.unique())  # sorted, no repeats
        if selection == "magnitude":
            w = s.param.detach().reshape(-1).abs()
            assert w[i.long()].min() >= w.max() if i.numel() == w.numel() else \
                w[i.long()].min() >= w[torch.ones_like(w, dtype=torch.bool).index_fill(0, i.long(), False)].max()
    again = SIFT(tiny_llama(), SIFTConfig(rate=0.07, selection=selection, seed=3)).selected_indices()
    assert all(torch.equal(idx[n], again[n]) for n in idx)
    if selection == "random":
        other = SIFT(tiny_llama(), SIFTConfig(rate=0.07, selection="random", seed=4)).selected_indices()
        assert not all(torch.equal(idx[n], other[n]) for n in idx)


def test_grad_selection_is_fixed_after_the_first_micro_batch():
    model = tiny_llama()
    opt = SIFT(model, SIFTConfig(rate=0.05))
    model(**batch(0)).loss.backward()
    first = {n: i.clone() for n, i in opt.selected_indices().items()}
    opt.step()
    model(**batch(1)).loss.backward()
    opt.step()
    assert all(torch.equal(first[n], i) for n, i in opt.selected_indices().items())


def test_targets_match_whole_module_names():
    assert matches_module("model.layers.0.self_attn.q_proj.weight", "q_proj")
    assert matches_module("model.layers.0.self_attn.q_proj.weight", "self_attn.q_proj")
    assert not matches_module("model.my_q_proj_extra.weight", "q_proj")
    assert not matches_module("model.layers.0.self_attn.q_proj.weight", "weight")
    model = tiny_llama()
    opt = SIFT(model, SIFTConfig(targets=("self_attn.q_proj",)))
    assert [s.name for s in opt.slots] == [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)]


@pytest.mark.parametrize("kwargs, message", [
    (dict(rate=0.0), "rate=0.0: must be in \\(0, 1\\]"),
    (dict(rate=1.5), "rate=1.5"),
    (dict(selection="topk"), "selection='topk': choose one of grad, random, magnitude"),
    (dict(optimizer="sgd"), "optimizer='sgd': choose one of adamw8bit, adamw"),
    (dict(step_in_backward=True), "set max_grad_norm=None"),
])
def test_config_errors_say_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SIFTConfig(**kwargs)


def test_config_lists_every_problem_at_once():
    with pytest.raises(ValueError) as err:
        SIFTConfig(rate=2, selection="x", optimizer="y")
    assert all(s in str(err.value) for s in ("rate=2", "selection='x'", "optimizer='y'"))


def test_unmatched_targets_are_an_error():
    with pytest.raises(ValueError, match="target 'qproj' matches no module.*\n.*dense 'nrm'"):
        SIFT(tiny_llama(), SIFTConfig(targets=("q_proj", "qproj"), dense=("nrm",)))
