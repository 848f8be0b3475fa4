"""The one sparse core (sift/codec.py, sift/selection.py, sift/entries.py) against references: the index
codec against integer arithmetic, every selection rule against an independent (float64) top-k, for
SIFT's hooks and QSIFT's layers alike, and the slice a rank holds."""
import copy

import pytest
import torch
import torch.nn as nn

from conftest import batch, tiny_llama
from sift import SIFT, SIFTConfig
from sift.codec import FLAG, INDEX_BLOCK, block_starts, decode, encode, index_dtype
from sift.entries import Entries, sparse_grad
from sift.qlinear import QSIFTLinear
from sift.quantize import layers
from sift.selection import RULES, Rule, register
from sift.state import Bank, SparseState
from test_qsift import dense_reference, quantized


def sorted_sample(lo: int, hi: int, k: int, seed: int = 0, must=()) -> torch.Tensor:
    """k distinct sorted indices in [lo, hi), including `must`."""
    drawn = lo + torch.randperm(hi - lo, generator=torch.Generator().manual_seed(seed))[:k]
    return torch.cat([drawn, torch.tensor(must, dtype=torch.int64)]).unique()


# ---------------------------------------------------------------- the codec
@pytest.mark.parametrize("case", ["edges", "last-block-only", "one-full-block", "random", "empty"])
def test_codec_round_trips_across_block_edges(case):
    n = 5 * 2**15 + 7  # six blocks, the last one short
    idx = {"edges": torch.tensor([0, 5, 2**15 - 1, 2**15, 3 * 2**15 + 1, 3 * 2**15 + 2, n - 1]),  # blocks 2, 4 empty
           "last-block-only": torch.tensor([5 * 2**15, n - 1]),
           "one-full-block": torch.arange(2**15, 2 * 2**15),
           "random": sorted_sample(0, n, 5000),
           "empty": torch.zeros(0, dtype=torch.int64)}[case]
    offsets, counts = encode(idx, 0, n)
    assert offsets.dtype == torch.int16 and counts.dtype == torch.int32
    assert torch.equal(offsets.long(), idx % INDEX_BLOCK)
    assert counts.tolist() == [int(((idx // INDEX_BLOCK) == b).sum()) for b in range(6)]
    for dtype in (torch.int64, torch.int32):
        out = decode(offsets, counts, block_starts(0, n, "cpu", dtype))
        assert out.dtype == dtype and torch.equal(out.long(), idx)
    # the owner's flag in the top bit (SIFT's tie bit) is masked off by a flagged decode
    flags = torch.rand(idx.numel(), generator=torch.Generator().manual_seed(1)) < 0.5
    marked = torch.where(flags, offsets | FLAG, offsets)
    assert torch.equal(decode(marked, counts, block_starts(0, n, "cpu"), flagged=True), idx)
    # written into a given buffer (SIFT's bank row), whatever it held
    row = torch.full_like(offsets, -1)
    assert encode(idx, 0, n, out=row)[0] is row and torch.equal(row, offsets)


def test_codec_encodes_relative_to_a_slice_start():
    lo = 3 * 2**15 + 123  # a slice that is not block-aligned: blocks start at lo
    hi = lo + 4 * 2**15 + 9
    idx = sorted_sample(lo, hi, 3000, must=[lo, lo + 2**15 - 1, lo + 2**15, hi - 1])
    offsets, counts = encode(idx, lo, hi)
    rel = idx - lo
    assert torch.equal(offsets.long(), rel % INDEX_BLOCK)
    assert torch.equal(counts.long(), torch.bincount(rel // INDEX_BLOCK, minlength=5))
    assert torch.equal(decode(offsets, counts, block_starts(lo, hi, "cpu")), idx)           # the whole weight's
    assert torch.equal(decode(offsets, counts, block_starts(0, hi - lo, "cpu")), rel)       # the slice's own


def test_codec_tables_of_consecutive_slices_decode_in_one_pass():
    """Ranks' slices end to end (tables concatenated, as the step concatenates tensors'): one decode."""
    n = 7 * 2**15 + 3
    cuts = [0, 40_000, 70_001, 150_000, n]
    idx = sorted_sample(0, n, 20_000, seed=2)
    parts = [encode(idx[(idx >= a) & (idx < b)], a, b) for a, b in zip(cuts, cuts[1:])]
    starts = torch.cat([block_starts(a, b, "cpu") for a, b in zip(cuts, cuts[1:])])
    merged = decode(torch.cat([o for o, _ in parts]), torch.cat([c for _, c in parts]), starts)
    assert torch.equal(merged, idx)


def test_index_dtype_turns_int64_at_2_31_entries():
    assert index_dtype(2**31 - 1) == torch.int32 and index_dtype(2**31) == torch.int64
    lo, hi = 2**31 - 3 * 2**15 - 5, 2**31 + 2 * 2**15  # flat indices on both sides of 2^31, on the CPU
    idx = torch.tensor([lo, 2**31 - 1, 2**31, 2**31 + 2**15, hi - 1])
    assert torch.equal(decode(*encode(idx, lo, hi), block_starts(lo, hi, "cpu", index_dtype(hi))), idx)
    # both holders, on meta tensors (no memory): 2^31 entries decode to int64, fewer to int32
    for rows, want in ((65536, torch.int64), (65535, torch.int32)):
        # no double quantization: it would cache bitsandbytes' dynamic map on meta for the whole process
        layer = QSIFTLinear.from_linear(nn.Linear(32768, rows, bias=False, device="meta"), double_quant=False)
        layer.k = 1000
        layer.select(torch.empty(1000, dtype=torch.int64, device="meta"))
        assert layer.indices().dtype == want and layer.indices().shape == (1000,)
        state = SparseState("w", nn.Parameter(torch.empty(32768 * rows, device="meta", dtype=torch.bfloat16)), 1000)
        state.bank = Bank("meta", torch.bfloat16, True, False, state.kp)
        state.select(torch.empty(1000, dtype=torch.int64, device="meta"))
        assert state.indices().dtype == torch.int64 and state.flat_indices().dtype == want


# ---------------------------------------------------------------- the selection registry
def sift_targets(model, opt) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {s.name: params[s.name] for s in opt.slots if s.sparse}


def grads64(model, seed: int = 0) -> dict[str, torch.Tensor]:
    """The first micro-batch's gradient of every weight, in float64 (an independent copy)."""
    ref = copy.deepcopy(model).double()
    ref(**batch(seed)).loss.backward()
    return {n: p.grad.reshape(-1) for n, p in ref.named_parameters()}


def top(score: torch.Tensor, k: int) -> torch.Tensor:
    """The reference top-k: a full stable sort, not torch.topk."""
    return torch.argsort(score, descending=True, stable=True)[:k].sort().values


def same_values(chosen: torch.Tensor, score: torch.Tensor, k: int) -> bool:
    """Ties allowed (a 4-bit base has 16 levels per block): the chosen scores are the k largest."""
    return torch.equal(score[chosen].sort().values, score.sort().values[-k:])


def test_random_draws_the_seeded_stream_in_model_order():
    opt = SIFT(tiny_llama(), SIFTConfig(rate=0.07, selection="random", seed=3))
    g = torch.Generator().manual_seed(3)
    for s in opt.slots:
        assert torch.equal(opt.selected_indices()[s.name].long(), torch.randperm(s.numel, generator=g)[:s.k].sort().values)
    _, q = quantized(rate=0.07, selection="random", seed=3)
    g = torch.Generator().manual_seed(3)
    for layer in layers(q).values():
        assert torch.equal(layer.indices().long(), torch.randperm(layer.numel, generator=g)[:layer.k].sort().values)


def test_magnitude_and_grad_equal_a_float64_top_k_for_sift_and_qsift():
    model = tiny_llama()
    opt = SIFT(copy.deepcopy(model), SIFTConfig(rate=0.07, selection="magnitude"))
    for name, p in sift_targets(model, opt).items():
        k = opt.selected_indices()[name].numel()
        assert torch.equal(opt.selected_indices()[name].long(), top(p.detach().double().reshape(-1).abs(), k)), name
    _, q = quantized(rate=0.07, selection="magnitude")
    for name, layer in layers(q).items():
        assert same_values(layer.indices().long(), layer.dequantized().double().reshape(-1).abs(), layer.k), name

    g64 = grads64(model)
    trained = copy.deepcopy(model)
    opt = SIFT(trained, SIFTConfig(rate=0.07))
    trained(**batch(0)).loss.backward()
    for name, idx in opt.selected_indices().items():
        assert torch.equal(idx.long(), top(g64[name].abs(), idx.numel())), name
    # QSIFT's grad rule is checked against float64 autograd in test_qsift


@pytest.fixture
def new_rules():
    """Two rules registered by this test, gone afterwards: one before training, one from the gradient."""
    saved = dict(RULES)

    @register("smallest")
    def smallest(k, numel, *, grad, weight, generator):
        """the k smallest |weight|"""
        return torch.topk(weight().reshape(-1).abs(), k, largest=False).indices

    @register("signed_grad", needs_grad=True)
    def signed_grad(k, numel, *, grad, weight, generator):
        """the k most positive gradient entries"""
        return torch.topk(grad.reshape(-1), k).indices

    yield
    RULES.clear()
    RULES.update(saved)


def test_a_rule_registered_once_serves_sift_and_qsift(new_rules):
    assert isinstance(RULES["smallest"], Rule) and RULES["smallest"].help == "the k smallest |weight|"
    with pytest.raises(ValueError, match="choose one of grad, random, magnitude, smallest, signed_grad"):
        SIFTConfig(selection="largest")
    model = tiny_llama()
    opt = SIFT(copy.deepcopy(model), SIFTConfig(rate=0.1, selection="smallest"))  # at construction
    for name, p in sift_targets(model, opt).items():
        k = opt.selected_indices()[name].numel()
        assert torch.equal(opt.selected_indices()[name].long(), top(-p.detach().double().reshape(-1).abs(), k))
    _, q = quantized(rate=0.1, selection="smallest")  # at attach
    for layer in layers(q).values():
        assert same_values(layer.indices().long(), -layer.dequantized().double().reshape(-1).abs(), layer.k)

    g64 = grads64(model)
    trained = copy.deepcopy(model)
    opt = SIFT(trained, SIFTConfig(rate=0.1, selection="signed_grad"))
    assert opt.selected_indices() == {}  # nothing chosen before the first backward
    trained(**batch(0)).loss.backward()  # SIFT's hooks
    for name, idx in opt.selected_indices().items():
        assert torch.equal(idx.long(), top(g64[name], idx.numel())), name
    fp, q = quantized(rate=0.1, selection="signed_grad")
    assert not any(layer.ready() for layer in layers(q).values())
    for layer in layers(q).values():
        layer.delta.requires_grad_(True)
    q(**batch(0)).loss.backward()  # QSIFTLinear's backward
    ref, params = dense_reference(fp, quantized(rate=0.1, selection="signed_grad")[1])
    ref(**batch(0)).loss.backward()
    for name, layer in layers(q).items():
        assert torch.equal(layer.indices().long(), top(params[name].grad.reshape(-1), layer.k)), name


# ---------------------------------------------------------------- the holders
def test_both_holders_are_entries_and_each_slot_knows_its_holder():
    model = tiny_llama()
    opt = SIFT(model, SIFTConfig(rate=0.1, dense=("norm",)))
    assert all((s.entries is s) == s.sparse and isinstance(s, Entries) for s in opt.slots)
    assert all(s.entries is None for s in opt.slots if not s.sparse)  # plain dense parameters
    _, q = quantized(rate=0.1)
    opt = SIFT(q, SIFTConfig(rate=0.1))
    found = layers(q)
    assert len(opt.slots) == len(found)
    for s in opt.slots:  # the delta's slot points at the layer whose entries it holds the values of
        layer = found[s.name.removesuffix(".delta") + ".weight"]
        assert s.entries is layer and isinstance(layer, Entries) and s.zero_base


def test_a_state_holding_a_slice_keeps_its_indices_relative_to_the_slice_start():
    """A rank holding [lo, hi) of a flat weight (ZeRO-3's ds_tensor partition): indices kept and
    written relative to lo, reported and selected as flat indices of the whole weight."""
    full = torch.randn(5 * 2**15 + 7, generator=torch.Generator().manual_seed(0))
    lo, hi = 2**15 + 100, 4 * 2**15 + 3
    p = nn.Parameter(torch.empty(0))
    p.ds_tensor, p.ds_numel, p.ds_shape = full[lo:hi].clone(), full.numel(), full.shape
    idx = sorted_sample(lo, hi, 3000, must=[lo, hi - 1])
    s = SparseState("w", p, idx.numel(), lo=lo, hi=hi)
    s.bank = Bank("cpu", torch.float32, True, False, s.kp)
    s.select(idx)
    assert torch.equal(s.indices(), idx - lo) and torch.equal(s.flat_indices(), idx.int())
    assert torch.equal(s.values(), full[idx]) and torch.equal(s.base, full[idx])
    dense = torch.randn(full.numel())  # the hook's gathered gradient of the whole weight
    assert torch.equal(sparse_grad(s, dense)[1], dense[idx])
    s.set_values(full[idx] + 1)
    want = full[lo:hi].clone()
    want[idx - lo] += 1
    assert torch.equal(p.ds_tensor, want)
