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
    # the core-speed model: ~30 M parameters, 8 layers 512 wide, where a CPU step takes under a second
    "llama-30m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=8192, max_position_embeddings=256,
                      tie_word_embeddings=False),
    # two layers 64 wide: a step in milliseconds, for tests and the GPU check's CPU dry run
    "llama-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
                       tie_word_embeddings=False),
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


class ConfigError(ValueError):
    """A model name or config file the benchmarks cannot use; the message names it and says why."""


def load_config(model: str):
    """A HF config from a SHAPES name, "smollm2-135m", a config.json, a model directory or a hub id."""
    if model in SHAPES:
        return LlamaConfig(**SHAPES[model])
    if model == SMOLLM2:
        from common.modeling import resolve_model_path
        return AutoConfig.from_pretrained(resolve_model_path(None))
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{model}: no config.json in this directory: pass a Hugging Face model directory")
        return config_from_file(path / "config.json")
    if path.is_file():
        return config_from_file(path)
    from common.hub import hub_problem, looks_like_hub_id

    if not looks_like_hub_id(model):
        raise ConfigError(f"{model}: no such file or directory, and not a shape name ({', '.join(SHAPES)}, "
                          f"{SMOLLM2}) nor a hub id owner/name")
    problem = hub_problem(model, "model")
    if problem:
        raise ConfigError(f"{model}: {problem}")
    return AutoConfig.from_pretrained(model)


def config_from_file(path: Path):
    """The config a Hugging Face config.json describes; every way it can be unusable is a ConfigError."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object (a Hugging Face config.json)")
    if "model_type" not in data:
        raise ConfigError(f"{path}: no model_type field (a Hugging Face config.json names one, e.g. \"llama\")")
    try:
        return AutoConfig.for_model(**data)
    except (ValueError, TypeError, KeyError) as e:  # an unknown model_type, a field of the wrong type
        raise ConfigError(f"{path}: transformers cannot read it: {str(e).splitlines()[0]}") from None


def build_model(config, device: str = "cpu", dtype: torch.dtype = torch.float32,
                attn_implementation: str = "sdpa", seed: int = 0):
    """A randomly initialised causal LM; on "meta" no memory is touched (the planner's case)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return model


def enable_checkpointing(model):
    """Non-reentrant activation checkpointing of every decoder layer (recomputed in backward)."""
    # transformers older than 5.23 names it gradient_checkpointing_enable
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})


def count_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def load_pristine(model_name: str):
    """(model, tokenizer) in fp32 on the CPU: the embedded SmolLM2 weights, or a random-init shape
    (SmolLM2's tokenizer encodes the data; callers fold ids into the shape's vocabulary)."""
    from common.modeling import load_model_and_tokenizer, load_tokenizer

    if model_name == SMOLLM2:
        model, tok = load_model_and_tokenizer(None)
    else:
        tok = load_tokenizer(None)
        model = build_model(load_config(model_name), "cpu", torch.float32, "sdpa")
    model.config.use_cache = False  # a training forward keeps no KV cache
    model.train()
    return model, tok
