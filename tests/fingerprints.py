"""Fingerprints of fixed-seed tiny runs of train_sft.py: what a refactor must reproduce bit for bit.

    python tests/fingerprints.py --write      # record tests/fixtures/fingerprints.json (only when a change
                                              # is meant to move bits; say which and why in the commit)

Each run is the real train_sft.py on a tiny random Llama with the SmolLM2 tokenizer and 40 bundled
Alpaca rows (tests/conftest.py). A fingerprint holds the held-out losses before / after, the logged
training losses and gradient norms, and per trained tensor (the increment's, the LoRA adapter's or
the full model's) the sha256 of its bytes plus float64 sums, for a machine whose CPU kernels differ.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "fingerprints.json")
QUICK = ["--max_steps", "3", "--generate_tokens", "0", "--save_total_limit", "1"]
# name -> the flags over conftest.train_args (4-step tiny run, batch 2 x 2 micro-batches, 96 tokens)
RUNS = {
    "sift_deferred": [],
    "sift_in_backward": ["--step_in_backward", "--gradient_accumulation_steps", "1", "--max_grad_norm", "0"],
    "sift_bf16": ["--bf16", "true"],
    "sift_packing": ["--packing"],
    "sift_magnitude_dense_norm": ["--sift_selection", "magnitude", "--sift_dense", "norm", "--optim", "adamw"],
    "qsift_nf4": ["--quantization", "nf4"],
    "qsift_nf4_in_backward": ["--quantization", "nf4", "--step_in_backward", "--gradient_accumulation_steps", "1",
                              "--max_grad_norm", "0"],
    "lora": ["--finetuning_type", "lora", "--optim", "adamw"],
    "full": ["--finetuning_type", "full", "--optim", "adamw8bit"],
}
OUTPUT_FILES = ("sift_increment.safetensors", "adapter/adapter_model.safetensors", "merged/model.safetensors")


def tensor_print(t) -> dict:
    import torch

    t = t.detach().cpu().contiguous()
    raw = t.view(torch.uint8) if t.dtype != torch.bool else t.to(torch.uint8)
    wide = t.double() if t.is_floating_point() else t.long().double()
    return {"sha256": hashlib.sha256(raw.numpy().tobytes()).hexdigest()[:24], "dtype": str(t.dtype),
            "shape": list(t.shape), "sum": float(wide.sum()), "sumsq": float((wide * wide).sum())}


def fingerprint(out_dir: str) -> dict:
    """The fingerprint of a finished run directory."""
    from safetensors.torch import load_file

    with open(os.path.join(out_dir, "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(out_dir, "train_log.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    rows = [r for r in rows if "loss" in r]
    name = next(n for n in OUTPUT_FILES if os.path.isfile(os.path.join(out_dir, n)))
    tensors = load_file(os.path.join(out_dir, name))
    return {"file": name, "heldout_before": results["before"]["heldout_loss"],
            "heldout_after": results["after"]["heldout_loss"], "losses": [r["loss"] for r in rows],
            "grad_norms": [r["grad_norm"] for r in rows],
            "tensors": {k: tensor_print(v) for k, v in sorted(tensors.items())}}


def cpu_capability() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()


def run(name: str, tiny_dir: str, data: str, out_dir: str) -> dict:
    import train_sft
    from conftest import train_args

    train_sft.main(train_args(tiny_dir, data, out_dir, *QUICK, *RUNS[name]))
    return fingerprint(out_dir)


def write() -> None:
    """Record every run (a fresh tiny model and data, as the conftest fixtures make them)."""
    import tempfile

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import conftest  # noqa: F401  the tests' environment (offline hub, threads)
    from transformers import AutoTokenizer

    from common.modeling import embedded_model_dir
    from data_prep import BUNDLED_ALPACA

    root = tempfile.mkdtemp(prefix="fingerprints-")
    tok = AutoTokenizer.from_pretrained(str(embedded_model_dir()))
    tiny = os.path.join(root, "tiny")
    model = conftest.tiny_llama(vocab=len(tok))
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(tiny)
    tok.save_pretrained(tiny)
    with open(BUNDLED_ALPACA) as f:
        rows = json.load(f)[:40]
    data = os.path.join(root, "alpaca40.json")
    with open(data, "w") as f:
        json.dump(rows, f)
    prints = {name: run(name, tiny, data, os.path.join(root, name)) for name in RUNS}
    from common.atomic import atomic_write

    atomic_write(FIXTURE, [json.dumps({"cpu_capability": cpu_capability(), "runs": prints}, indent=1) + "\n"])
    print(f"wrote {FIXTURE}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/fingerprints.py --write")
    write()
