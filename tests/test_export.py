"""python -m sift.export: merged directory and PEFT adapter against the trained model itself."""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import batch
from sift import SIFT, SIFTConfig, load_increment, save_increment
from sift.export import main as export_main, peft_sparsity

REPO = Path(__file__).resolve().parents[1]


def train_from(model_dir, dtype=torch.float32, steps=3, lr=1e-2, **cfg):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    opt = SIFT(model, SIFTConfig(rate=0.05, lr=lr, **cfg))
    vocab = model.config.vocab_size
    for step in range(steps):
        model(**batch(step, vocab=vocab)).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.fixture(scope="module")
def run(tiny_dir, tmp_path_factory):
    """A tiny fp32 SIFT run (norms trained densely) and its increment."""
    out = tmp_path_factory.mktemp("run")
    model, opt = train_from(tiny_dir, dense=("norm",))
    path = out / "sift_increment.safetensors"
    save_increment(opt, str(path), base_model=tiny_dir)
    return model, str(path)


def logits(model, vocab):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch(7, vocab=vocab)["input_ids"]).logits


def test_merged_is_the_trained_model(run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, inc = run
    out = tmp_path / "merged"
    assert export_main(["merged", "--increment", inc, "--output_dir", str(out), "--max_shard_size", "200KB"]) == 0
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").exists(), shards  # sharded
    assert all(stat.S_IMODE(p.stat().st_mode) & 0o044 == 0o044 for p in out.iterdir()), "files not world-readable"
    merged = AutoModelForCausalLM.from_pretrained(out)
    for (name, a), b in zip(merged.named_parameters(), model.parameters()):
        assert torch.equal(a, b), name
    assert AutoTokenizer.from_pretrained(out) is not None
    bf16 = tmp_path / "bf16"
    assert export_main(["merged", "--increment", inc, "--output_dir", str(bf16), "--dtype", "bfloat16"]) == 0
    half = AutoModelForCausalLM.from_pretrained(bf16, dtype="auto")
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    assert torch.equal(half.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight.bfloat16())


def test_peft_adapter_equals_merged(run, tiny_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, inc = run
    out = tmp_path / "peft"
    assert export_main(["peft", "--increment", inc, "--output_dir", str(out)]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "SUPERTUNING" and config["base_model_name_or_path"] == tiny_dir
    tensors, _ = load_increment(inc)
    exact = {k.rsplit(".", 1)[0]: v.long() for k, v in tensors.items() if k.endswith(".exact_indices")}

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), str(out))
    vocab = model.config.vocab_size
    want = logits(model, vocab)
    got = logits(peft_model, vocab)
    assert (got - want).abs().max() <= 1e-6, (got - want).abs().max()
    merged = peft_model.merge_and_unload()
    assert type(merged).__name__ == "LlamaForCausalLM"
    for (name, a), b in zip(merged.named_parameters(), model.parameters()):
        a, b = a.detach().view(-1).clone(), b.detach().view(-1).clone()
        if name in exact:  # no fp32 delta reaches these (sign changes); peft adds the nearest one
            spacing = torch.nextafter(b[exact[name]].abs(), torch.tensor(float("inf"))) - b[exact[name]].abs()
            base = AutoModelForCausalLM.from_pretrained(tiny_dir).state_dict()[name].view(-1)[exact[name]]
            ulp = torch.nextafter(base.abs(), torch.tensor(float("inf"))) - base.abs()
            assert ((a[exact[name]] - b[exact[name]]).abs() <= 4 * torch.maximum(ulp, spacing)).all(), name
            a[exact[name]] = b[exact[name]]
        assert torch.equal(a, b), name
    assert torch.equal(logits(merged, vocab), got)


@pytest.mark.parametrize("rate", [0.05, 0.01, 0.3, 1.0])
def test_peft_count_rule_covers_every_layer_with_little_padding(rate):
    """int(numel * (1 - sparsity)) >= ceil(rate * numel) for LLaMA-7B and tiny shapes at once."""
    import math

    from peft.tuners.supertuning.layer import SupertuningLayer

    def check(shapes):
        counts = {n: math.ceil(rate * n) for n in shapes}
        s = peft_sparsity(counts)
        assert 0.0 <= s < 1.0
        got = {n: SupertuningLayer._num_trainable(None, n, s) for n in shapes}
        assert all(got[n] >= k for n, k in counts.items()), (s, got, counts)
        return {n: got[n] - counts[n] for n in shapes}

    llama7b = check([4096 * 4096, 4096 * 11008])  # q/k/v/o and gate/up/down of LLaMA-7B
    assert max(llama7b.values()) <= 1, llama7b
    surplus = check([4096 * 4096, 4096 * 11008, 32 * 32, 32 * 64, 16 * 32, 1000 * 7])
    assert all(extra <= n / (16 * 32) for n, extra in surplus.items()), surplus  # < numel / smallest numel
    if rate == 0.05:  # 52/1024 == 104/2048: no single sparsity gives both counts exactly
        assert check([32 * 32, 32 * 64])[32 * 64] == 1


def test_wrong_base_is_refused_and_forced(run, tiny_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, inc = run
    other = tmp_path / "other"  # same shapes and tokenizer, other weights
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    model.save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(other)
    for kind in ("merged", "peft"):
        out = tmp_path / f"x-{kind}"
        assert export_main([kind, "--increment", inc, "--output_dir", str(out), "--model", str(other)]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(errors) == 1 and "not the base the increment was trained from" in errors[0], errors
        assert "--force" in errors[0] and not out.exists()
    with pytest.warns(UserWarning, match="applying anyway"):
        assert export_main(["merged", "--increment", inc, "--output_dir", str(tmp_path / "f"), "--model", str(other),
                            "--force"]) == 0


def test_v1_file_exports(tiny_dir, tmp_path):
    """A version-1 increment (absolute values) still exports, both ways."""
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    name = "model.layers.1.mlp.down_proj.weight"
    weight = dict(model.named_parameters())[name]
    g = torch.Generator().manual_seed(3)
    indices = torch.randperm(weight.numel(), generator=g)[:205].sort().values.to(torch.int32)
    values = weight.detach().view(-1)[indices.long()] + 0.01 * torch.randn(205, generator=g)
    inc = tmp_path / "v1.safetensors"
    save_file({f"{name}.indices": indices, f"{name}.values": values}, inc,
              metadata={"format": "sift-increment", "version": "1", "base_model": tiny_dir, "rate": "0.05",
                        "targets": '["down_proj"]', "selection": "random"})
    with torch.no_grad():
        weight.view(-1)[indices.long()] = values
    assert export_main(["merged", "--increment", str(inc), "--output_dir", str(tmp_path / "m")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert all(torch.equal(a, b) for a, b in zip(merged.parameters(), model.parameters()))
    assert export_main(["peft", "--increment", str(inc), "--output_dir", str(tmp_path / "p")]) == 0
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), str(tmp_path / "p"))
    assert all(torch.equal(a, b) for a, b in zip(peft.merge_and_unload().parameters(), model.parameters()))


def test_bad_inputs_are_one_line_with_exit_2(run, tmp_path, capsys):
    import re

    _, inc = run
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    tensors, meta = load_increment(inc)
    from safetensors.torch import save_file
    save_file({k: v for k, v in tensors.items() if "norm" in k}, str(tmp_path / "dense.safetensors"), metadata=meta)
    cases = [
        (["peft", "--increment", str(tmp_path / "dense.safetensors"), "--output_dir", str(tmp_path / "o")],
         "no sparsely trained tensor"),
        (["merged", "--increment", str(tmp_path / "none.safetensors"), "--output_dir", str(tmp_path / "o")],
         "--increment .*none.safetensors: no such file"),
        (["merged", "--increment", inc, "--output_dir", str(full)], "not empty; pass --overwrite"),
        (["peft", "--increment", inc, "--output_dir", str(tmp_path / "a-file")], "a-file: is a file, expected a directory"),
        (["merged", "--increment", inc, "--output_dir", os.path.dirname(inc)], "holds --increment"),
        (["merged", "--increment", str(tmp_path / "junk.safetensors"), "--output_dir", str(tmp_path / "o")],
         "not a readable safetensors file"),
        (["merged", "--increment", inc, "--output_dir", str(tmp_path / "o"), "--model", str(tmp_path / "no-model")],
         "--model .*no-model: no such directory"),
        (["merged", "--increment", inc, "--output_dir", str(tmp_path / "o"), "--dtype", "int8"], "invalid choice"),
    ]
    for argv, message in cases:
        try:
            status = export_main(argv)
        except SystemExit as e:  # argparse's own usage errors
            status = e.code
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert status == 2 and len(errors) == 1 and re.search(message, errors[0]), (argv, status, errors)
    assert (full / "keep.txt").read_text() == "mine" and (tmp_path / "a-file").read_text() == "x"
    assert os.path.exists(inc) and not (tmp_path / "o").exists()
    # As a program: the same one line, no traceback.
    done = subprocess.run([sys.executable, "-m", "sift.export", *cases[5][0]], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("python -m sift.export: error: ")


def test_bf16_adapter_is_exact_except_the_entries_it_reports(tiny_dir, tmp_path):
    """peft rounds its values to bf16 before adding: deltas are chosen for that, and the entries no
    bf16 delta reaches are counted (Adam moves every entry by ~lr, so a few tiny weights cross zero
    even at a fine-tuning-sized step)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sift.export import export_peft

    for lr, share in ((1e-5, 0.01), (1e-2, 0.5)):
        model, opt = train_from(tiny_dir, dtype=torch.bfloat16, lr=lr)
        inc = tmp_path / f"{lr}.safetensors"
        save_increment(opt, str(inc), base_model=tiny_dir)
        info = export_peft(str(inc), str(tmp_path / f"peft-{lr}"))
        base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16)
        merged = PeftModel.from_pretrained(base, str(tmp_path / f"peft-{lr}")).merge_and_unload()
        differ = sum(int((a != b).sum()) for a, b in zip(merged.parameters(), model.parameters()))
        assert differ == info["inexact"] and differ <= share * info["entries"], (lr, differ, info)
    assert differ > 0  # the large step does reach some
