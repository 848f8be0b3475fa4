import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: as train_sft.py and benchmarks.run do

import glob
import json

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)


DS_SHM = "/dev/shm/deepspeed_allreduce_buffer_*"  # DeepSpeed's CPU all-reduce buffer, one per rank and launch


@pytest.fixture(scope="session", autouse=True)
def _deepspeed_shm_buffers():
    """DeepSpeed's CPU all-reduce (shm.cpp) leaves its 66 MiB /dev/shm buffer behind when a rank exits;
    /dev/shm is memory (132 MiB a 2-rank launch): the session removes the buffers its launches left."""
    before = set(glob.glob(DS_SHM))
    yield
    for path in set(glob.glob(DS_SHM)) - before:
        try:
            os.unlink(path)
        except OSError:
            pass


def tiny_llama(layers: int = 2, seed: int = 0, dtype=torch.float32, hidden: int = 32, vocab: int = 64, **kw):
    """A random LlamaForCausalLM small enough for a step in milliseconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, tie_word_embeddings=False, **kw)
    return LlamaForCausalLM(cfg).to(dtype)


def batch(seed: int, size: int = 2, length: int = 12, vocab: int = 64):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (size, length), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def train_args(model_dir, data, out, *extra) -> list[str]:
    """train_sft.py flags for a 4-step run of a tiny model (overridable: later flags win)."""
    return ["--model_name_or_path", str(model_dir), "--data_path", str(data), "--output_dir", str(out),
            "--max_steps", "4", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
            "--model_max_length", "96", "--eval_samples", "4", "--logging_steps", "1",
            "--generate_tokens", "4", "--learning_rate", "1e-3", "--sift_rate", "0.05", *extra]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from transformers import AutoTokenizer

    from common.modeling import embedded_model_dir

    tok = AutoTokenizer.from_pretrained(str(embedded_model_dir()))
    out = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_llama(vocab=len(tok))
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def alpaca_40(tmp_path_factory):
    from data_prep import BUNDLED_ALPACA

    with open(BUNDLED_ALPACA) as f:
        rows = json.load(f)[:40]
    path = tmp_path_factory.mktemp("data") / "alpaca40.json"
    path.write_text(json.dumps(rows))
    return str(path)


