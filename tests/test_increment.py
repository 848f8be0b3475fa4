"""Increment files: exact round trip, and a clear error for every malformed case."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import batch, tiny_llama
from sift import SIFT, SIFTConfig, IncrementError, apply_increment, load_increment, save_increment


@pytest.fixture
def trained(tmp_path):
    model = tiny_llama(dtype=torch.bfloat16)
    opt = SIFT(model, SIFTConfig(rate=0.05, dense=("norm",), lr=1e-3))
    for step in range(3):
        model(**batch(step)).loss.backward()
        opt.step()
        opt.zero_grad()
    path = tmp_path / "sift_increment.safetensors"
    save_increment(opt, str(path), base_model="tiny-random")
    return model, opt, path


def test_round_trip_is_bit_exact(trained):
    model, opt, path = trained
    base = tiny_llama(dtype=torch.bfloat16)
    assert not all(torch.equal(a, b) for a, b in zip(base.parameters(), model.parameters()))
    meta = apply_increment(base, str(path))
    assert meta["base_model"] == "tiny-random" and meta["selection"] == "grad"
    for (name, a), b in zip(base.named_parameters(), model.parameters()):
        assert torch.equal(a, b), name
    tensors, _ = load_increment(str(path))
    assert tensors["model.layers.0.self_attn.q_proj.weight.indices"].dtype == torch.int32
    assert tensors["model.layers.0.self_attn.q_proj.weight.values"].dtype == torch.float32
    assert "model.norm.weight.indices" not in tensors  # dense: values only


def rewrite(path, out, change_tensors=None, change_meta=None):
    tensors, meta = load_increment(str(path))
    if change_tensors:
        change_tensors(tensors)
    if change_meta:
        change_meta(meta)
    save_file(tensors, str(out), metadata=meta)
    return out


Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.mark.parametrize("change_tensors, change_meta, message", [
    (lambda t: t.__setitem__(f"{Q}.indices", t[f"{Q}.indices"] + 10_000), None, f"{Q}.indices: out of range"),
    (lambda t: t.__setitem__(f"{Q}.indices", t[f"{Q}.indices"].flip(0)), None, "not strictly increasing"),
    (lambda t: t.__setitem__(f"{Q}.values", t[f"{Q}.values"][:-1]), None, f"{Q}: .* indices but .* values"),
    (lambda t: t.__setitem__(f"{Q}.values", t[f"{Q}.values"].half()), None, "expected a 1-D float32"),
    (lambda t: t.__setitem__("model.nope.weight.values", torch.zeros(3)), None, "model.nope.weight is not a parameter"),
    (None, lambda m: m.__setitem__("format", "lora"), "metadata format is 'lora'"),
    (None, lambda m: m.__setitem__("version", "99"), "increment version '99'"),
    (None, lambda m: m.__setitem__("shapes", json.dumps({Q: [3, 3]})), f"{Q}: recorded shape \\[3, 3\\]"),
])
def test_malformed_files_name_the_problem(trained, tmp_path, change_tensors, change_meta, message):
    _, _, path = trained
    bad = rewrite(path, tmp_path / "bad.safetensors", change_tensors, change_meta)
    base = tiny_llama(dtype=torch.bfloat16)
    before = [p.clone() for p in base.parameters()]
    with pytest.raises(IncrementError, match=message):
        apply_increment(base, str(bad))
    assert all(torch.equal(a, b) for a, b in zip(before, base.parameters())), "a failed apply changed weights"


def test_wrong_model_shape_is_named(trained):
    _, _, path = trained
    with pytest.raises(IncrementError, match="recorded shape .* but the model's is"):
        apply_increment(tiny_llama(hidden=48, dtype=torch.bfloat16), str(path))


def test_truncated_and_missing_files(trained, tmp_path):
    _, _, path = trained
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(IncrementError, match="truncated or corrupt"):
        load_increment(str(cut))
    with pytest.raises(IncrementError, match="no such increment file"):
        load_increment(str(tmp_path / "absent.safetensors"))


def test_metadata_records_the_run(trained):
    _, opt, path = trained
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "sift-increment" and float(meta["rate"]) == 0.05
    assert json.loads(meta["targets"]) == list(opt.cfg.targets)
    assert not list(path.parent.glob(".*.tmp")), "temporary file left behind"
