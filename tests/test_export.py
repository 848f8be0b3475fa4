"""python -m sift.export: merged directory and PEFT adapter against the trained model itself."""
import json
import os
import stat
import subprocess
import sys
import warnings
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


# ----------------------------------------------------------------------------- GGUF

# Unit roundoff of each type relative to a weight: half the spacing of the values it is rounded to.
# q8_0 rounds to a block's grid d = amax/127, so a weight moves by up to d/2 = amax/254; a block of 32
# Gaussian weights has amax ~ 4 rms, so ~2^-6 of a typical weight. The logits may differ from the
# merged model's by TOLERANCE x roundoff x their largest magnitude: measured 4.4-5.5 on SmolLM2-135M
# (30 layers; f16, bf16, q8_0), below 2 on the 2-layer test model; 16 leaves a 3x margin. The exact
# part of the check is on the weights (check_gguf_weights) and, for f16 / bf16, on the logits of a
# model holding exactly the rounded weights.
ROUNDOFF = {"f32": 0.0, "f16": 2.0 ** -11, "bf16": 2.0 ** -8, "q8_0": 2.0 ** -6}
TOLERANCE = 16
CAST = {"f16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    """A tiny SIFT run over a 384-token byte-level BPE tokenizer trained here (the SmolLM2 one of the
    other tests takes transformers' GGUF reader ~8 s per read, for its 49k tokens and merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from data_prep import BUNDLED_ALPACA

    rows = json.loads(Path(BUNDLED_ALPACA).read_text())[:300]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator((r["instruction"] + " " + r["output"] for r in rows), trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")
    fast.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    out = tmp_path_factory.mktemp("bpe")
    from conftest import tiny_llama

    tiny_llama(vocab=len(fast)).save_pretrained(out / "base")
    fast.save_pretrained(out / "base")
    model, opt = train_from(out / "base")
    save_increment(opt, str(out / "sift_increment.safetensors"), base_model=str(out / "base"))
    return model, str(out / "sift_increment.safetensors"), str(out / "base")


def gguf_roundtrip(inc, path, outtype, *extra):
    """Export through the CLI's main, read back with transformers' own GGUF loader."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert export_main(["gguf", "--increment", str(inc), "--output", str(path), "--outtype", outtype, *extra]) == 0
    kwargs = {"gguf_file": path.name}
    return (AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kwargs).eval(),
            AutoTokenizer.from_pretrained(path.parent, **kwargs))


def check_gguf_weights(loaded, merged, outtype):
    """f32: the merged weights bit for bit; f16 / bf16: exactly torch's rounding of them (norms stay
    f32); q8_0: on each 32-entry block's grid q * d (|q| <= 127, d the f16 scale) and within the
    format's error bound 0.5 d (1 + 2^-10) + 127 |d - amax/127| of the merged weight."""
    want = dict(merged.named_parameters())
    for name, got in loaded.named_parameters():
        w, got = want[name].detach().float(), got.detach()
        if w.dim() == 1 or outtype == "f32":
            assert torch.equal(got, w), name
        elif outtype in CAST:
            assert torch.equal(got, w.to(CAST[outtype]).float()), name
        else:
            blocks, hat = w.reshape(-1, 32), got.reshape(-1, 32)
            d = blocks.abs().amax(1, keepdim=True) / 127
            d16 = d.half().float()
            q = hat / d16
            assert torch.equal(q, q.round()) and q.abs().max() <= 127, name
            bound = 0.5 * d * (1 + 2 ** -10) + 127 * (d16 - d).abs()
            assert ((hat - blocks).abs() <= bound).all(), name


def check_gguf_logits(loaded, merged, base, outtype, vocab):
    """Logits against the merged model's within TOLERANCE x the type's roundoff x their scale, much
    nearer to them than to the base's (the increment is in the file), and, where the rounding is a
    plain cast, equal to those of a model holding exactly the rounded weights."""
    want, got, before = (logits(m, vocab) for m in (merged, loaded, base))
    error = (got - want).abs().max()
    assert error <= TOLERANCE * ROUNDOFF[outtype] * want.abs().max(), (error, want.abs().max())
    assert (before - want).abs().max() > 4 * error
    if outtype in CAST:
        rounded = type(merged)(merged.config).eval()
        rounded.load_state_dict({k: v if v.dim() == 1 else v.to(CAST[outtype]).float()
                                 for k, v in merged.state_dict().items()})
        assert torch.equal(got, logits(rounded, vocab))


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_gguf_reads_back_as_the_merged_model(bpe_run, tmp_path, outtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, inc, tiny_dir = bpe_run
    loaded, tokenizer = gguf_roundtrip(inc, tmp_path / f"tiny-{outtype}.gguf", outtype)
    check_gguf_weights(loaded, model, outtype)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    check_gguf_logits(loaded, model, base, outtype, model.config.vocab_size)
    original = AutoTokenizer.from_pretrained(tiny_dir)
    text = "Below is an instruction. 12345 <|im_start|>user\nHi,  wörld!<|im_end|>"
    assert tokenizer(text).input_ids == original(text).input_ids
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (original.bos_token_id, original.eos_token_id)
    assert tokenizer.chat_template == original.chat_template


def test_gguf_export_matches_what_llama_cpp_reads(bpe_run, tmp_path):
    """The file itself: llama.cpp's key names and types, no unrelated warning on the console, and a
    refused output left alone."""
    import gguf

    _, inc, _ = bpe_run
    path = tmp_path / "m.gguf"
    done = subprocess.run([sys.executable, "-m", "sift.export", "gguf", "--increment", inc, "--output", str(path),
                           "--outtype", "q8_0"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert "GGUF written to" in done.stdout and "5 F32, 16 Q8_0" in done.stdout
    for unrelated in ("Setting accelerator to CPU", "gemm_4bit_forward", "Traceback"):
        assert unrelated not in done.stderr + done.stdout, done.stderr
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.architecture"] == "llama" and fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "gpt-2" and fields["llama.attention.head_count_kv"] == 2
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.attn_q.weight"] == "Q8_0"
    assert "output.weight" in types  # the tiny model's head is not tied
    stamp = path.stat().st_mtime_ns
    again = subprocess.run([sys.executable, "-m", "sift.export", "gguf", "--increment", inc, "--output", str(path)],
                           cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [
        f"python -m sift.export: error: --output {path}: exists; pass --overwrite to replace it"]
    assert path.stat().st_mtime_ns == stamp


def test_gguf_permutes_q_and_k_rows_as_llama_cpp():
    """GGUF stores each head's rotary pairs interleaved (row 2i, 2i+1 = HF rows i, i + head_dim/2)."""
    from sift.gguf import permute_rope

    w = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(2 * 8, 3)  # 2 heads of dim 8, 3 inputs
    p = permute_rope(w, 2)
    for head in range(2):
        for i in range(4):
            assert torch.equal(p[head * 8 + 2 * i], w[head * 8 + i])
            assert torch.equal(p[head * 8 + 2 * i + 1], w[head * 8 + 4 + i])


def test_gguf_refuses_what_it_cannot_write_before_loading_weights(run, tiny_dir, tmp_path, capsys):
    from transformers import AutoConfig

    from sift.gguf import config_problem

    _, inc = run
    config = AutoConfig.from_pretrained(tiny_dir)
    assert config_problem(config) is None
    config.rope_parameters = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}
    assert "rope scaling 'yarn'" in config_problem(config)
    config = AutoConfig.for_model("mistral")
    assert "model type 'mistral'" in config_problem(config)
    other = tmp_path / "wordpiece"  # same weights, a tokenizer that is not byte-level BPE
    for f in Path(tiny_dir).iterdir():
        (other / f.name).parent.mkdir(exist_ok=True)
        (other / f.name).write_bytes(f.read_bytes())
    spec = json.loads((other / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    (other / "tokenizer.json").write_text(json.dumps(spec))
    out = tmp_path / "x.gguf"
    assert export_main(["gguf", "--increment", inc, "--output", str(out), "--model", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pre-tokenizer" in err[0] and "convert_hf_to_gguf.py" in err[0], err
    assert not out.exists()


def test_gguf_of_the_embedded_smollm2_reads_back(tmp_path):
    """The real tokenizer (49k byte-level BPE tokens, merges, chat template), tied embeddings and 9
    query / 3 key-value heads: one SIFT step on SmolLM2-135M, exported as f16."""
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.modeling import EMBEDDED, embedded_model_dir

    start = time.time()
    model, opt = train_from(embedded_model_dir(), steps=1, lr=1e-3)
    inc = tmp_path / "sift_increment.safetensors"
    save_increment(opt, str(inc), base_model=EMBEDDED)
    loaded, tokenizer = gguf_roundtrip(inc, tmp_path / "smollm2-f16.gguf", "f16")
    check_gguf_weights(loaded, model, "f16")
    base = AutoModelForCausalLM.from_pretrained(embedded_model_dir())
    check_gguf_logits(loaded, model, base, "f16", model.config.vocab_size)
    original = AutoTokenizer.from_pretrained(embedded_model_dir())
    text = original.apply_chat_template([{"role": "user", "content": "Write 2 haiku about the sea, 1234 words."}],
                                        tokenize=False, add_generation_prompt=True)
    assert tokenizer(text).input_ids == original(text).input_ids
    assert tokenizer.chat_template == original.chat_template
    assert loaded.config.tie_word_embeddings and loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    print(f"SmolLM2 GGUF round trip: {time.time() - start:.1f} s")


# ----------------------------------------------------------------------------- outputs that destroy inputs

def fake_hub_snapshot(hub: Path, repo: str, source: str) -> Path:
    """`source`'s files as the hub cache lays out a download: blobs/, snapshots/<rev>/ of links, refs/main."""
    folder = hub / f"models--{repo.replace('/', '--')}"
    revision = "0" * 40
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (folder / "blobs").mkdir()
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)
    for f in Path(source).iterdir():
        blob = folder / "blobs" / f"blob-{f.name}"
        blob.write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_exports_refuse_an_output_that_is_or_holds_what_they_read(tiny_dir, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    from common.modeling import EMBEDDED
    from sift.increment import write_increment

    base, other = tmp_path / "base", tmp_path / "other"
    for d in (base, other):
        d.mkdir()
        for f in Path(tiny_dir).iterdir():
            (d / f.name).write_bytes(f.read_bytes())
    (tmp_path / "link").symlink_to(base)
    _, opt = train_from(base, steps=1)
    inc = tmp_path / "run" / "sift_increment.safetensors"
    inc.parent.mkdir()
    save_increment(opt, str(inc), base_model=str(base))
    tensors, meta = load_increment(str(inc))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = fake_hub_snapshot(tmp_path / "hub", "sift-test/tiny", tiny_dir)
    write_increment(str(tmp_path / "hub.safetensors"), tensors, {**meta, "base_model": "sift-test/tiny"})
    monkeypatch.setenv("SIFT_CACHE", str(tmp_path / "cache"))
    embedded = tmp_path / "cache" / "smollm2-135m-instruct"
    embedded.mkdir(parents=True)
    (embedded / "config.json").write_text("{}")
    write_increment(str(tmp_path / "embedded.safetensors"), tensors, {**meta, "base_model": EMBEDDED})
    capsys.readouterr()
    before = tree(tmp_path)
    recorded = f"is the increment's recorded base model {base}"
    cases = [  # (argv, what the one line says)
        (["merged", "--output_dir", str(base)], recorded),
        (["peft", "--output_dir", str(base)], recorded),
        (["merged", "--output_dir", str(tmp_path / "link")], recorded),       # a symlink to it
        (["merged", "--output_dir", str(tmp_path)], f"holds --increment ({inc})"),
        (["peft", "--output_dir", str(other), "--model", str(other)], f"is --model {other}"),
        (["merged", "--output_dir", str(snapshot), "--increment", str(tmp_path / "hub.safetensors")],
         "is the increment's recorded base model sift-test/tiny"),
        (["merged", "--output_dir", str(snapshot.parents[1] / "blobs"), "--increment",
          str(tmp_path / "hub.safetensors")], "holds the increment's recorded base model sift-test/tiny"),
        (["peft", "--output_dir", str(tmp_path / "cache"), "--increment", str(tmp_path / "embedded.safetensors")],
         f"holds the increment's recorded base model {EMBEDDED} ({embedded})"),
        (["gguf", "--output", str(inc)], "name a .gguf file"),
        (["gguf", "--output", str(base)], "is a directory: name the file to write"),
    ]
    for argv, message in cases:
        kind, *rest = argv
        flags = [] if "--increment" in rest else ["--increment", str(inc)]
        assert export_main([kind, *flags, *rest, "--overwrite"]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and err[0].startswith("python -m sift.export: error: "), (argv, err)
    assert tree(tmp_path) == before  # nothing written, nothing lost


def test_peft_export_of_an_embedded_model_run_records_the_portable_id(tmp_path):
    """Not the machine-local cache directory the embedded model loads from: the id the increment records."""
    from common.modeling import EMBEDDED, embedded_model_path
    from sift.increment import write_increment

    inc = tmp_path / "sift_increment.safetensors"
    name = "model.layers.0.self_attn.q_proj.weight"
    write_increment(str(inc), {f"{name}.indices": torch.tensor([3, 70, 500], dtype=torch.int32),
                               f"{name}.delta": torch.tensor([1e-3, -2e-3, 5e-4])},
                    {"base_model": EMBEDDED, "dtype": "float32", "rate": "0.05"})
    out = tmp_path / "peft"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert export_main(["peft", "--increment", str(inc), "--output_dir", str(out)]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == EMBEDDED
    assert str(embedded_model_path()) not in (out / "adapter_config.json").read_text()
    # neither peft's "base_model_name_or_path was renamed" nor its hub lookup of the id ("Could not find a config")
    assert not [w for w in seen if "renamed" in str(w.message) or "config file" in str(w.message)]
