import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)


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


@pytest.fixture
def make_llama():
    return tiny_llama
