"""Model shapes for the benchmarks and the planner: named LLaMA shapes, HF configs, meta builds.

`fused_sdpa` is the attention the planner runs on the meta device. On a meta tensor
`F.scaled_dot_product_attention` falls back to its math path and materialises the S x S score
matrix; on CPU it dispatches to `_scaled_dot_product_flash_attention_for_cpu`, and on a GPU to
flash / memory-efficient kernels, both of which keep only the output and an O(S) log-sum-exp.
Calling that CPU op directly gives meta tensors the allocations the CPU run really makes (the
planner test checks it) and the flash-attention memory profile a GPU run has.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, LlamaConfig
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

FUSED_SDPA = "fused_sdpa"  # a name without "flash": transformers routes those to flash-attn packages

# name -> LlamaConfig kwargs; "smollm2-135m" is the embedded model (common.modeling)
SHAPES = {
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                     max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False),
    "llama-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                      num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
                      max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False),
    # Llama-3-8B: GQA 32/8 and a 128,256-entry vocabulary (the logits dominate the loss path)
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                      tie_word_embeddings=False),
    # Llama-3.1-8B: Llama-3-8B's shapes with 128 K positions (RoPE scaled as "llama3")
    "llama3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
                        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 8192}),
    # LLaMA-2-70B (grouped-query attention, 8 KV heads)
    "llama-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                      num_attention_heads=64, num_key_value_heads=8, vocab_size=32000,
                      max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False),
    # the wider random-init model of the CPU benchmark: TinyLlama-1.1B's layers (2048 wide, GQA 32/4),
    # 4 of them, and an 8k vocabulary so that embeddings do not dominate (210 M parameters)
    "llama-wide-4l": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=4,
                          num_attention_heads=32, num_key_value_heads=4, vocab_size=8192,
                          max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False),
}
SMOLLM2 = "smollm2-135m"


def _fused_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **_):
    """Causal attention through the fused CPU kernel (query [B, H, S, D], key/value [B, Hkv, S, D])."""
    if attention_mask is not None:
        raise ValueError("fused_sdpa models unpadded causal batches: pass no attention_mask")
    out, _lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout, True, scale=scaling)
    return out.transpose(1, 2), None  # [B, S, H, D], already contiguous in that order


AttentionInterface.register(FUSED_SDPA, _fused_sdpa)
AttentionMaskInterface.register(FUSED_SDPA, sdpa_mask)  # lets is_causal stand in for a mask


def load_config(model: str):
    """A HF config from a SHAPES name, "smollm2-135m", a config.json path, or a model directory / id."""
    if model in SHAPES:
        return LlamaConfig(**SHAPES[model])
    if model == SMOLLM2:
        from common.modeling import resolve_model_path
        return AutoConfig.from_pretrained(resolve_model_path(None))
    path = Path(model)
    if path.is_file():
        data = json.loads(path.read_text())
        if "model_type" not in data:
            raise ValueError(f"{path}: a HF config.json needs a model_type field")
        return AutoConfig.for_model(**data)
    return AutoConfig.from_pretrained(model)


def build_model(config, device: str = "cpu", dtype: torch.dtype = torch.float32,
                attn_implementation: str = "sdpa", seed: int = 0):
    """A randomly initialised causal LM; on "meta" no memory is touched (the planner's case)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return model


def enable_checkpointing(model):
    """Non-reentrant activation checkpointing of every decoder layer (recomputed in backward)."""
    # transformers before 5.23 (as on the GPU machine: 5.17) names it gradient_checkpointing_enable
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})


def count_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
