"""Tiled decoder layers (trainer/tiled_decoder.py) against the model's own layers: the same forward,
every gradient, SIFT's and QSIFT's selections and sparse gradients, and the same training."""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from benchmarks.models import enable_checkpointing
from conftest import tiny_llama
from sift import SIFT, SIFTConfig
from sift.quantize import attach, layers, quantize
from trainer import offload, tiled_decoder
from trainer.loss import causal_lm_loss

LENGTH, CHUNK = 40, 7  # 6 chunks, the last one shorter


def long_batch(seed: int, size: int = 2, length: int = LENGTH, vocab: int = 64):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (size, length), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def pair(model, checkpointing=True):
    """(the model, a tiled deep copy), both in training mode, checkpointed (True, or "reentrant") or not."""
    tiled = copy.deepcopy(model)
    for m in (model, tiled):
        m.config.use_cache = False
        if checkpointing == "reentrant":
            m.activation_checkpointing_enable({"use_reentrant": True})
        elif checkpointing:
            enable_checkpointing(m)
        m.train()
    tiled_decoder.enable(tiled, CHUNK)
    return model, tiled


def assert_close(got, want, rel, what):
    scale = want.abs().max().clamp_min(1e-30)
    err = (got.double() - want.double()).abs().max() / scale
    assert err <= rel, f"{what}: relative error {err:.2e} > {rel:.0e}"


@pytest.mark.parametrize("checkpointing", [False, True, "reentrant"])
def test_forward_and_every_gradient_match_the_untiled_layers(checkpointing):
    model, tiled = pair(tiny_llama(layers=2), checkpointing)
    for m in (model, tiled):
        m.requires_grad_(True)  # every parameter, the embedding and head included
    b = long_batch(0)
    inputs = {}
    for name, m in (("ref", model), ("tiled", tiled)):
        emb = m.get_input_embeddings()(b["input_ids"]).detach().requires_grad_(True)
        out = m(inputs_embeds=emb, labels=b["labels"])
        out.loss.backward()
        inputs[name] = (out.logits.detach(), emb.grad)
    assert_close(inputs["tiled"][0], inputs["ref"][0], 1e-6, "logits")
    assert_close(inputs["tiled"][1], inputs["ref"][1], 1e-6, "gradient of the input")
    ref = dict(model.named_parameters())
    for name, p in tiled.named_parameters():
        if name == "model.embed_tokens.weight":  # the input came as embeddings: no gradient either way
            assert p.grad is None and ref[name].grad is None
        else:
            assert_close(p.grad, ref[name].grad, 1e-6, name)


def test_short_sequences_and_evaluation_run_the_layers_own_code_bit_for_bit():
    model, tiled = pair(tiny_llama(layers=2))
    model.requires_grad_(True)
    tiled.requires_grad_(True)
    short = long_batch(1, length=CHUNK)
    causal_lm_loss(model, short).backward()
    causal_lm_loss(tiled, short).backward()
    ref = dict(model.named_parameters())
    for name, p in tiled.named_parameters():
        assert torch.equal(p.grad, ref[name].grad), name
    with torch.no_grad():
        ids = long_batch(2)["input_ids"]
        assert torch.equal(model(input_ids=ids).logits, tiled(input_ids=ids).logits)


class Shapes(TorchDispatchMode):
    """The largest tensor (numel) any op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_intermediate_of_the_whole_sequence_exists_in_forward_recompute_or_backward():
    model, tiled = pair(tiny_llama(layers=2, hidden=32, vocab=16))
    b = long_batch(3, size=1, vocab=16)
    whole = LENGTH * model.config.intermediate_size  # one [tokens, intermediate] tensor
    largest = {}
    for name, m in (("ref", model), ("tiled", tiled)):
        SIFT(m, SIFTConfig(rate=0.1))
        with Shapes() as seen:
            causal_lm_loss(m, b).backward()
        largest[name] = seen.largest
    # the untiled layers make the whole sequence's intermediate (so the check can fail); the tiled
    # ones nothing that large (the largest tensors left are a weight and its gradient, 2,048 entries)
    assert largest["ref"] >= whole > largest["tiled"], largest


def sift_pair(step_in_backward: bool, offload_activations: bool = False):
    model, tiled = pair(tiny_llama(layers=2))
    opts = []
    for m in (model, tiled):
        cfg = SIFTConfig(rate=0.1, optimizer="adamw", lr=1e-2, step_in_backward=step_in_backward,
                         max_grad_norm=None if step_in_backward else 1.0)
        opts.append(SIFT(m, cfg))
        if offload_activations:
            offload.enable(m, min_bytes=0, devices=("cpu",))
    return (model, opts[0]), (tiled, opts[1])


def test_sift_hooks_get_the_whole_micro_batch_gradient_once():
    (model, opt), (tiled, topt) = sift_pair(step_in_backward=False)
    b = long_batch(4)
    causal_lm_loss(model, b).backward()
    causal_lm_loss(tiled, b).backward()
    want, got = opt.selected_indices(), topt.selected_indices()
    assert want.keys() == got.keys() and all(torch.equal(got[n], want[n]) for n in want)
    # the gathered sparse gradients, in slot order (one per target, none twice)
    grads, tgrads = opt.grad_tensors(), topt.grad_tensors()
    assert len(grads) == len(tgrads) == len(opt.slots)
    for g, t in zip(grads, tgrads):
        assert_close(t, g, 1e-6, "sparse gradient")


@pytest.mark.parametrize("step_in_backward", [False, True])
def test_sift_training_with_and_without_tiling_ends_the_same(step_in_backward):
    (model, opt), (tiled, topt) = sift_pair(step_in_backward, offload_activations=True)
    for step in range(3):
        for m, o in ((model, opt), (tiled, topt)):
            causal_lm_loss(m, long_batch(10 + step)).backward()
            o.step()
            o.zero_grad()
    want, got = opt.selected_indices(), topt.selected_indices()
    assert all(torch.equal(got[n], want[n]) for n in want)
    values, tvalues = opt.trained_values(), topt.trained_values()
    for name in values:
        assert_close(tvalues[name], values[name], 1e-5, name)


def qsift_pair():
    base = quantize(tiny_llama(layers=2), "nf4")
    attach(base, 0.1, "grad", seed=0)
    return pair(base)


def test_qsift_selects_from_the_whole_micro_batch_and_gets_its_delta_gradient():
    model, tiled = qsift_pair()
    for m in (model, tiled):
        for layer in layers(m).values():
            layer.delta.requires_grad_(True)
    b = long_batch(5)
    causal_lm_loss(model, b).backward()
    causal_lm_loss(tiled, b).backward()
    ref = layers(model)
    for name, layer in layers(tiled).items():
        assert torch.equal(layer.indices(), ref[name].indices()), f"{name}: another selection"
        assert_close(layer.delta.grad, ref[name].delta.grad, 1e-6, name)
    # selected now: the next micro-batch's delta gradient goes through the chunks as well
    for m in (model, tiled):
        m.zero_grad()
        causal_lm_loss(m, long_batch(6)).backward()
    for name, layer in layers(tiled).items():
        assert_close(layer.delta.grad, ref[name].delta.grad, 1e-6, name)


@pytest.mark.parametrize("step_in_backward", [False, True])
def test_qsift_training_with_and_without_tiling_ends_the_same(step_in_backward):
    model, tiled = qsift_pair()
    opts = [SIFT(m, SIFTConfig(rate=0.1, lr=1e-2, step_in_backward=step_in_backward,
                               max_grad_norm=None if step_in_backward else 1.0)) for m in (model, tiled)]
    for step in range(3):
        for m, o in zip((model, tiled), opts):
            causal_lm_loss(m, long_batch(20 + step)).backward()
            o.step()
            o.zero_grad()
    ref = layers(model)
    for name, layer in layers(tiled).items():
        assert torch.equal(layer.indices(), ref[name].indices()), name
        assert_close(layer.delta.detach(), ref[name].delta.detach(), 1e-5, name)


def test_enable_refuses_what_it_cannot_tile_and_disable_restores_the_classes():
    model = tiny_llama(layers=1)
    classes = [type(m) for m in model.modules()]
    assert tiled_decoder.enable(model, CHUNK) == CHUNK and tiled_decoder.enabled(model) == CHUNK
    tiled_decoder.disable(model)
    assert [type(m) for m in model.modules()] == classes and tiled_decoder.enabled(model) is None
    model.model.layers[0].mlp.dropout = torch.nn.Dropout(0.1)  # inside a layer: the recompute would redraw it
    with pytest.raises(ValueError, match="dropout"):
        tiled_decoder.enable(model, CHUNK)


def test_lora_adapters_get_the_same_gradients():
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,  # B != 0: A's gradient too
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model, tiled = pair(get_peft_model(tiny_llama(layers=2), cfg))  # enable() through the PEFT wrapper
    b = long_batch(7)
    causal_lm_loss(model, b).backward()
    causal_lm_loss(tiled, b).backward()
    ref = dict(model.named_parameters())
    trained = [(n, p) for n, p in tiled.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n, _ in trained)
    for name, p in trained:
        assert_close(p.grad, ref[name].grad, 1e-6, name)


@pytest.mark.parametrize("flags", [[], ["--quantization", "nf4"]], ids=["sift", "qsift"])
def test_train_sft_with_tile_tokens_ends_with_the_untiled_increment(flags, tiny_dir, alpaca_40, tmp_path, monkeypatch):
    """Three train_sft.py steps on bundled Alpaca rows (up to 96 tokens, checkpointed layers) with
    --tile_tokens 32 (so up to 3 chunks) and without: the same entries, and the same increment (merged
    weights - base, up to ~2e-3) within 1e-5."""
    import train_sft
    from conftest import train_args
    from safetensors.torch import load_file

    tiled_lengths = []
    apply = tiled_decoder._Tiled.apply
    monkeypatch.setattr(tiled_decoder._Tiled, "apply", lambda *a: tiled_lengths.append(a[2].shape[1]) or apply(*a))
    base = load_file(f"{tiny_dir}/model.safetensors")
    indices, increments = {}, {}
    for tile in ("0", "32"):
        train_sft.main(train_args(tiny_dir, alpaca_40, tmp_path / tile, "--max_steps", "3", "--generate_tokens", "0",
                                  "--gradient_checkpointing", "--tile_tokens", tile, *flags))
        assert bool(tiled_lengths) == (tile != "0")  # the tiled run chunked its layers, the other did not
        saved = load_file(tmp_path / tile / "sift_increment.safetensors")
        indices[tile] = {k: v for k, v in saved.items() if k.endswith(".indices")}
        merged = load_file(tmp_path / tile / "merged" / "model.safetensors")
        increments[tile] = {k: merged[k].double() - base[k].double() for k in base}
    assert max(tiled_lengths) > 64  # a sequence of 3 chunks
    assert indices["0"] and sorted(indices["0"]) == sorted(indices["32"])
    for name, idx in indices["0"].items():
        assert torch.equal(idx, indices["32"][name]), f"{name}: other entries"
    diffs = torch.cat([(increments["32"][k] - ref).flatten() for k, ref in increments["0"].items()]).abs()
    trained = torch.cat([ref.flatten() for ref in increments["0"].values()]) != 0
    scale = torch.cat([ref.flatten() for ref in increments["0"].values()]).abs().max().item()
    assert 1e-4 < scale < 1e-1 and diffs.max().item() <= 1e-5, (scale, diffs.max().item())
    # the gradients agree to ~1e-7 relative; Adam's update g / (|g| + eps) magnifies that on an entry whose
    # accumulated gradient is near eps (1e-8): allowed on at most 1 % of the trained entries
    assert (diffs[trained] > 1e-5 * scale).float().mean().item() <= 0.01
