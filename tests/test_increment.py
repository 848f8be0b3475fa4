"""Increment files: exact round trip, and a clear error for every malformed case."""
import json
import math

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
    assert tensors["model.layers.0.self_attn.q_proj.weight.delta"].dtype == torch.float32
    assert "model.norm.weight.indices" not in tensors  # dense: deltas only


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
    (lambda t: t.__setitem__(f"{Q}.delta", t[f"{Q}.delta"][:-1]), None, f"{Q}.delta: .* values for .* indices"),
    (lambda t: t.__setitem__(f"{Q}.delta", t[f"{Q}.delta"].half()), None, "expected a 1-D float32"),
    (lambda t: t[f"{Q}.delta"].__setitem__(3, float("nan")), None, f"{Q}.delta: 1 non-finite"),
    (lambda t: t.pop(f"{Q}.delta"), None, f"no {Q}.delta"),
    (lambda t: t.__setitem__(f"{Q}.exact_indices", t[f"{Q}.indices"][:2].clone()), None, "come together"),
    (lambda t: t.__setitem__("model.nope.weight.delta", torch.zeros(3)), None, "model.nope.weight is not a parameter"),
    (None, lambda m: m.__setitem__("format", "lora"), "metadata format is 'lora'"),
    (None, lambda m: m.__setitem__("version", "99"), "increment version '99', this SIFT reads 1 and 2"),
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


# ---------------------------------------------------------------- format 2: exact deltas, fingerprint, v1
from sift.config import SIFTConfig as _Cfg  # noqa: E402
from sift.increment import Tables, exact_deltas  # noqa: E402


class ArrayOpt(Tables):
    """The public surface save_increment reads, over hand-made trained / base values."""

    def __init__(self, model, trained: dict, indices: dict):
        params = dict(model.named_parameters())
        base = {n: params[n].detach().view(-1)[indices[n].long()].clone() if n in indices
                else params[n].detach().view(-1).clone() for n in trained}
        super().__init__(_Cfg(rate=0.5, selection="random"), indices, trained, base,
                         {n: params[n].shape for n in trained})


def adversarial(base: torch.Tensor, seed: int) -> torch.Tensor:
    """fp32 'trained' values for `base` (any dtype): small steps, sign changes, large changes, values
    near zero and subnormal, zeros of both signs, unchanged entries."""
    g = torch.Generator().manual_seed(seed)
    b = base.float()
    n = b.numel()
    tiny = torch.finfo(torch.float32).tiny
    kinds = [
        b * (1 + 1e-3 * torch.randn(n, generator=g)),        # what training does
        -b * torch.rand(n, generator=g),                      # sign change
        b * 10 ** (4 * torch.rand(n, generator=g)),           # large change (up to 10^4 x)
        b * 1e-6 * torch.randn(n, generator=g),               # passing near zero
        tiny * torch.randn(n, generator=g),                   # subnormal / tiniest normals
        torch.full((n,), -0.0), torch.zeros(n), b.clone(),
    ]
    pick = torch.randint(0, len(kinds), (n,), generator=g)
    return torch.stack(kinds).gather(0, pick[None]).squeeze(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_exact_deltas_on_adversarial_values(dtype):
    """fl32(base + delta) in the weight dtype IS the trained weight, except where the mask says no
    fp32 delta can reach it; those are provably out of reach of every nearby delta."""
    g = torch.Generator().manual_seed(1)
    base = (torch.randn(20_000, generator=g) * 0.02).to(dtype)
    base[:4] = torch.tensor([0.0, -0.0, 1e-40, -3e-39]).to(dtype)  # zeros and subnormal bases
    trained = adversarial(base, 2)
    want = trained.to(dtype)
    delta, unreachable = exact_deltas(trained, base)
    assert delta.dtype == torch.float32 and torch.isfinite(delta).all()
    got = (base.float() + delta).to(dtype)
    bits = {2: torch.int16, 4: torch.int32}[want.element_size()]
    same = got.view(bits) == want.view(bits)
    assert torch.equal(same, ~unreachable)
    # Out of reach means it: 64 fp32 neighbours of the delta either side miss too (float64 search).
    for i in unreachable.nonzero().flatten()[:50].tolist():
        d = torch.tensor([delta[i].item()])
        for direction in (math.inf, -math.inf):
            step = d.clone()
            for _ in range(64):
                step = torch.nextafter(step, torch.tensor([direction]))
                assert not torch.equal((base[i:i + 1].float() + step).to(dtype).view(bits), want[i:i + 1].view(bits))
    # Ordinary training changes (relative <= 1 %) are always reachable; in 16 bits so is everything
    # that does not end within 2^-8 of zero relative to its base (large changes, sign changes).
    small = (trained - base.float()).abs() <= 1e-2 * base.float().abs()
    assert small.sum() > 2000 and not unreachable[small].any()
    if dtype != torch.float32:
        assert not unreachable[want.float().abs() >= 2**-8 * base.float().abs()].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adversarial_increment_applies_bit_exactly(tmp_path, dtype):
    model = tiny_llama(dtype=dtype)
    params = dict(model.named_parameters())
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    g = torch.Generator().manual_seed(0)
    indices = {n: torch.randperm(params[n].numel(), generator=g)[: params[n].numel() // 2].sort().values.int()
               for n in names}
    trained = {n: adversarial(params[n].detach().view(-1)[indices[n].long()], i) for i, n in enumerate(names)}
    trained["model.norm.weight"] = adversarial(params["model.norm.weight"].detach().view(-1), 5)  # dense
    path = tmp_path / "adv.safetensors"
    save_increment(ArrayOpt(model, trained, indices), str(path), base_model="tiny-random")
    tensors, meta = load_increment(str(path))
    assert meta["version"] == "2" and meta["dtype"] == str(dtype).removeprefix("torch.")
    assert any(k.endswith(".exact_indices") for k in tensors), "adversarial values need exact entries"
    apply_increment(model, str(path))
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    for n, values in trained.items():
        flat = params[n].detach().view(-1)
        got = flat if n not in indices else flat[indices[n].long()]
        assert torch.equal(got.view(bits), values.to(dtype).view(bits)), n


def test_fp32_and_bf16_runs_apply_bit_exactly_with_metadata(tmp_path):
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_llama(dtype=dtype)
        opt = SIFT(model, SIFTConfig(rate=0.05, dense=("norm",), lr=1e-2))
        for step in range(3):
            model(**batch(step)).loss.backward()
            opt.step()
            opt.zero_grad()
        path = tmp_path / f"{dtype}.safetensors"
        save_increment(opt, str(path), base_model="org/tiny", quantization="nf4")
        base = tiny_llama(dtype=dtype)
        meta = apply_increment(base, str(path))
        assert (meta["base_model"], meta["quantization"], len(meta["base_fingerprint"])) == ("org/tiny", "nf4", 32)
        for (name, a), b in zip(base.named_parameters(), model.parameters()):
            assert torch.equal(a, b), (dtype, name)


def test_wrong_base_is_refused_unless_forced(trained):
    model, _, path = trained
    other = tiny_llama(seed=1, dtype=torch.bfloat16)  # same shapes, other weights
    before = [p.clone() for p in other.parameters()]
    with pytest.raises(IncrementError, match="not the base the increment was trained from.*--force"):
        apply_increment(other, str(path))
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters()))
    with pytest.warns(UserWarning, match="applying anyway"):
        apply_increment(other, str(path), force=True)
    assert not all(torch.equal(a, b) for a, b in zip(before, other.parameters()))
    same = tiny_llama(dtype=torch.bfloat16)
    apply_increment(same, str(path))
    with pytest.raises(IncrementError, match="not the base"):  # twice: the model is no longer the base
        apply_increment(same, str(path))


def test_fingerprint_accepts_the_same_base_in_another_dtype(trained):
    _, _, path = trained  # trained on a bf16 copy of tiny_llama(seed=0)
    fp32 = tiny_llama(dtype=torch.float32)
    apply_increment(fp32, str(path))  # no error: its values round to the same bf16 base


def test_scaled_apply_moves_part_of_the_way(trained):
    model, _, path = trained
    tensors, _ = load_increment(str(path))
    half = tiny_llama(dtype=torch.float32)
    base = {n: p.detach().clone() for n, p in half.named_parameters()}
    apply_increment(half, str(path), scale=0.5)
    name = "model.layers.0.self_attn.q_proj.weight"
    idx, delta = tensors[f"{name}.indices"].long(), tensors[f"{name}.delta"]
    got = dict(half.named_parameters())[name].detach().view(-1)
    assert torch.equal(got[idx], base[name].view(-1)[idx] + 0.5 * delta)


def test_non_finite_trained_values_are_not_saved(tmp_path):
    model = tiny_llama()
    n = "model.layers.0.self_attn.q_proj.weight"
    idx = {n: torch.arange(4, dtype=torch.int32)}
    opt = ArrayOpt(model, {n: torch.tensor([0.1, float("nan"), 0.2, float("inf")])}, idx)
    with pytest.raises(IncrementError, match=f"{n}: 2 of 4 trained values are not finite"):
        save_increment(opt, str(tmp_path / "x.safetensors"))
    assert not (tmp_path / "x.safetensors").exists()


def test_version_1_files_still_load_and_apply(tmp_path):
    model = tiny_llama()
    name = "model.layers.1.mlp.down_proj.weight"
    g = torch.Generator().manual_seed(3)
    numel = dict(model.named_parameters())[name].numel()
    indices = torch.randperm(numel, generator=g)[:100].sort().values.int()
    values = torch.randn(100, generator=g)
    path = tmp_path / "v1.safetensors"
    save_file({f"{name}.indices": indices, f"{name}.values": values, "model.norm.weight.values": torch.ones(32) * 2},
              str(path), metadata={"format": "sift-increment", "version": "1", "base_model": "x", "rate": "0.5",
                                   "targets": '["down_proj"]', "selection": "random"})
    apply_increment(model, str(path))
    params = dict(model.named_parameters())
    assert torch.equal(params[name].detach().view(-1)[indices.long()], values)
    assert torch.equal(params["model.norm.weight"].detach(), torch.full((32,), 2.0))
    with pytest.raises(IncrementError, match="cannot be scaled"):
        apply_increment(tiny_llama(), str(path), scale=0.5)


def test_eval_cli_checks_the_base_and_says_so_in_one_line(tiny_dir, tmp_path, capsys):
    """eval/mmlu.py --increment: a wrong base (or a broken file) is one line and exit 2, before any
    scoring; --force applies it anyway."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common import cli
    from eval import mmlu

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    opt = SIFT(model, SIFTConfig(rate=0.05, lr=1e-2))
    model(**batch(0, vocab=model.config.vocab_size)).loss.backward()
    opt.step()
    inc = tmp_path / "run" / "sift_increment.safetensors"
    save_increment(opt, str(inc), base_model=tiny_dir)
    other = tmp_path / "other"
    AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).apply(
        lambda m: [p.data.add_(0.01) for p in m.parameters(recurse=False)]).save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(other)
    (tmp_path / "cut.safetensors").write_bytes(inc.read_bytes()[:100])

    def run(*argv):  # as `python eval/mmlu.py` runs it
        out = tmp_path / "o"
        status = cli.run(mmlu.main, ["--subjects", "management", "--limit", "2", "--output_dir", str(out), *argv],
                         errors=(ValueError, OSError), prog="mmlu.py")
        return status, out / "mmlu_results.json"

    for model_dir, path, message in ((other, inc, "not the base the increment was trained from"),
                                     (tiny_dir, tmp_path / "cut.safetensors", "truncated or corrupt")):
        status, _ = run("--model", str(model_dir), "--increment", str(path))
        err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert status == 2 and len(err) == 1 and message in err[0] and err[0].startswith("mmlu.py: error: --increment")
    status, results = run("--model", str(other), "--increment", str(inc), "--force")
    assert status == 0 and json.loads(results.read_text())["subjects"]["management"]["num_questions"] == 2
    status, results = run("--model", tiny_dir, "--increment", str(inc))
    assert status == 0 and json.loads(results.read_text())["increment"] == str(inc)


_WRITE = """
import sys, torch
from sift.increment import write_increment
g = torch.Generator().manual_seed(0)
tensors = {f"model.layers.{i}.mlp.up_proj.weight.{kind}": torch.randn(16, generator=g) if kind == "delta" else
           torch.arange(16, dtype=torch.int32) * 3 for i in range(4) for kind in ("indices", "delta")}
meta = {k: k.upper() * 3 for k in ("base_model", "base_fingerprint", "dtype", "rate", "targets", "dense",
                                   "selection", "shapes")}
reverse = sys.argv[2] == "reversed"
write_increment(sys.argv[1], dict(sorted(tensors.items(), reverse=reverse)), dict(sorted(meta.items(), reverse=reverse)))
"""


def test_identical_runs_write_byte_identical_increments(tmp_path):
    """safetensors writes its metadata from a Rust HashMap, whose order changes from process to
    process: two processes, one giving metadata and tensors in the other order, must write the same
    bytes; the header is sorted and the file loads as before."""
    import hashlib
    import os
    import subprocess
    import sys
    from pathlib import Path

    paths = [tmp_path / f"{order}.safetensors" for order in ("sorted", "reversed")]
    for path in paths:
        subprocess.run([sys.executable, "-c", _WRITE, str(path), path.stem], cwd=Path(__file__).parents[1], check=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert hashlib.sha256(paths[0].read_bytes()).digest() == hashlib.sha256(paths[1].read_bytes()).digest()
    data = paths[0].read_bytes()
    header = json.loads(data[8: 8 + int.from_bytes(data[:8], "little")])
    assert list(header) == sorted(header) and list(header["__metadata__"]) == sorted(header["__metadata__"])
    tensors, meta = load_increment(str(paths[0]))
    assert meta["base_model"] == "BASE_MODELBASE_MODELBASE_MODEL" and meta["version"] == "2" and len(tensors) == 8
