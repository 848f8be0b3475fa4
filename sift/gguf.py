"""A LLaMA-architecture model written as one GGUF file (llama.cpp's format), with the `gguf` package
(llama.cpp's own gguf-py: writer, tensor names, quantizers, special-token reader).

What it writes follows llama.cpp's convert_hf_to_gguf.py for `LlamaForCausalLM`: the `llama.*`
hyperparameters, tensors renamed by gguf's name map, q_proj / k_proj rows permuted from the HF
rotate-half layout to GGUF's interleaved one (transformers' GGUF loader undoes it), 1-D tensors
(norms) in f32 and every other tensor in the chosen type (q8_0 falls back to f16 for a tensor
whose rows are not a multiple of its 32-entry blocks), no `output.weight` for tied embeddings, and
the vocabulary as a byte-level BPE (`gpt2`) tokenizer with its merges, special tokens and chat
template. Tensors are converted and written one at a time: peak memory is the model plus one tensor.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch

from common.atomic import atomic_path

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# llama.cpp's pre-tokenizer names for the byte-level regexes of tokenizer.json's pre_tokenizer: it
# applies the same regex, so the GGUF tokenizes as the HF tokenizer does
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


class GGUFError(ValueError):
    """A model or tokenizer this export cannot write as GGUF: one line for the user."""


def _types(outtype: str):
    q, f = gguf.GGMLQuantizationType, gguf.LlamaFileType
    return {"f32": (q.F32, f.ALL_F32), "f16": (q.F16, f.MOSTLY_F16), "bf16": (q.BF16, f.MOSTLY_BF16),
            "q8_0": (q.Q8_0, f.MOSTLY_Q8_0)}[outtype]


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def config_problem(config) -> str | None:
    """Why `config` is not a model this writer covers (None if it is): a plain LLaMA decoder."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if getattr(config, "model_type", None) != "llama":
        return (f"model type {getattr(config, 'model_type', None)!r}: the GGUF export writes LLaMA models; "
                "export merged and convert that directory with llama.cpp's convert_hf_to_gguf.py")
    if rope.get("rope_type", "default") != "default":
        return (f"rope scaling {rope.get('rope_type')!r}: the GGUF export writes unscaled RoPE only; export merged "
                "and convert that directory with llama.cpp's convert_hf_to_gguf.py")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "attention or MLP biases: the GGUF export writes bias-free LLaMA layers only"
    return None


def _pre_tokenizer(spec: dict | None) -> str | None:
    """llama.cpp's name for a byte-level pre-tokenizer, or None if it has none this writer knows."""
    steps = spec.get("pretokenizers", []) if spec and spec.get("type") == "Sequence" else [spec] if spec else []
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True) \
            and steps[0].get("pattern", {}).get("Regex") == _LLAMA3_REGEX:
        return "llama-bpe"
    return None


def read_vocab(tokenizer, vocab_size: int) -> dict:
    """The tokenizer as GGUF's `gpt2` vocabulary: {tokens, types, pre, special}, raising GGUFError
    for another kind of tokenizer; `special` is gguf's SpecialVocab (merges, special token ids and
    whether to add BOS, chat template), read from a temporary copy of the tokenizer's files."""
    with tempfile.TemporaryDirectory(prefix="sift-gguf-tokenizer-") as directory:
        tokenizer.save_pretrained(directory)
        path = Path(directory, "tokenizer.json")
        spec = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        special = gguf.SpecialVocab(Path(directory), load_merges=True, n_vocab=vocab_size)
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or spec.get("decoder", {}).get("type") != "ByteLevel":
        raise GGUFError("the tokenizer is not a byte-level BPE (GPT-2 / Llama-3 style) one, the kind the GGUF export "
                        "writes; export merged and convert that directory with llama.cpp's convert_hf_to_gguf.py")
    pre = _pre_tokenizer(spec.get("pre_tokenizer"))
    if pre is None:
        raise GGUFError(f"the tokenizer's pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))[:120]} has no llama.cpp "
                        "name this export knows (gpt-2, llama-bpe); convert a merged export with llama.cpp's "
                        "convert_hf_to_gguf.py, which recognises more")
    ids = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(vocab_size):  # as llama.cpp's converter: rows past the tokenizer are unused pads
        if i not in ids:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(ids[i])
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    bos = tokenizer.bos_token_id  # written explicitly: llama.cpp's default differs by pre-tokenizer
    special.add_special_token.setdefault("bos", bos is not None and tokenizer("a").input_ids[:1] == [bos])
    return {"tokens": tokens, "types": types, "pre": pre, "special": special}


def _write_metadata(writer, config, vocab: dict, name: str, ftype) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_file_type(ftype)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    vocab["special"].add_to_gguf(writer, quiet=True)


def permute_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotate-half row order -> GGUF's interleaved pairs, per head (llama.cpp's permute)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_names(model) -> list[tuple[str, str, int]]:
    """(GGUF name, parameter name, heads its rows are permuted by, 0 for none) per parameter, in
    the model's order; a tied output weight is the embedding's parameter, listed once (llama.cpp
    then reads token_embd)."""
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    out = []
    for hf_name, _ in model.named_parameters():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GGUFError(f"{hf_name}: no GGUF name for this LLaMA tensor")
        heads = config.num_attention_heads if hf_name.endswith("q_proj.weight") else \
            config.num_key_value_heads if hf_name.endswith("k_proj.weight") else 0
        out.append((name, hf_name, heads))
    return out


def tensor_type(name: str, shape: tuple[int, ...], outtype: str):
    """The GGML type a tensor is stored in: f32 for 1-D tensors and norms, else the chosen type
    (q8_0: f16 where a row is not a whole number of blocks)."""
    qtype = _types(outtype)[0]
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return gguf.GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def write_gguf(model, vocab: dict, path: str, outtype: str, name: str) -> list[tuple[str, str]]:
    """Write `model` (a LlamaForCausalLM, any dtype) and `vocab` (read_vocab) to `path` atomically.
    Returns [(tensor name, GGML type name)]."""
    params = dict(model.named_parameters())
    entries = gguf_names(model)
    types = [tensor_type(n, tuple(params[p].shape), outtype) for n, p, _ in entries]
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        _write_metadata(writer, model.config, vocab, name, _types(outtype)[1])
        for (n, p, _), qtype in zip(entries, types):  # infos first: the data is then streamed tensor by tensor
            shape = tuple(params[p].shape)
            writer.add_tensor_info(n, shape, np.float32, int(np.prod(gguf.quant_shape_to_byte_shape(shape, qtype))),
                                   raw_dtype=qtype)
        writer.write_header_to_file(path=Path(tmp))
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for (_, p, heads), qtype in zip(entries, types):
            tensor = params[p].detach()
            tensor = permute_rope(tensor, heads) if heads else tensor
            writer.write_tensor_data(gguf.quants.quantize(tensor.float().numpy(), qtype))
        writer.close()
    return [(n, q.name) for (n, _, _), q in zip(entries, types)]
