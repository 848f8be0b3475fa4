"""trainer.offload: --offload_activations and --embeddings_on_host train the same, with fewer device bytes."""
import pytest
import torch
from transformers import LlamaConfig

from conftest import batch, tiny_llama
from sift import SIFT, SIFTConfig
from trainer import offload
from trainer.loss import causal_lm_loss

from benchmarks import memory_plan
from benchmarks.methods import Method


def train(offloaded: bool, steps: int = 3):
    torch.manual_seed(0)
    model = tiny_llama(dtype=torch.float32)
    model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    opt = SIFT(model, SIFTConfig(rate=0.1, lr=1e-3))
    hooks = offload.enable(model, min_bytes=0, devices=("cpu",)) if offloaded else None  # CPU "host": a copy
    for i in range(steps):
        causal_lm_loss(model, batch(i)).backward()
        opt.step()
        opt.zero_grad()
    return model, hooks


def floor_plans(hidden: int, layers: int, vocab: int, seq: int, **option):
    """The planned floor of a checkpointed bf16 LLaMA shape, without and with `option`."""
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=8, vocab_size=vocab, tie_word_embeddings=False)
    return [memory_plan.plan(cfg, Method("floor", "floor", **kw), 1, seq, torch.bfloat16, True, steps=2)
            for kw in ({}, option)]


def test_offloaded_training_equals_the_plain_one_bit_for_bit():
    plain, _ = train(False)
    moved, hooks = train(True)
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), moved.parameters()))
    layers, hidden = plain.config.num_hidden_layers, plain.config.hidden_size
    x = batch(2)["input_ids"]
    # at least every checkpointed layer's input went through the host, and no parameter did
    assert hooks.offloaded_tensors >= layers and hooks.offloaded_bytes >= layers * x.numel() * hidden * 4
    assert hooks.offloaded_bytes < sum(p.nbytes for p in plain.parameters())


def test_planner_sees_the_checkpointed_inputs_leave_the_device():
    """4 layers x (1 x 2048 x 512) bf16 inputs = 2 MiB each: the floor's peak falls by the ones that
    are not in use at the peak, and they are counted as host memory instead."""
    plain, moved = floor_plans(hidden=512, layers=4, vocab=512, seq=2048, offload_activations=True)
    layer_input = 2048 * 512 * 2
    assert moved["offloaded_bytes"] >= 4 * layer_input
    assert plain["peak"] - moved["peak"] >= 3 * layer_input - 2**16  # all but the one being recomputed


def test_train_sft_takes_the_flag_and_records_it(tiny_dir, alpaca_40, tmp_path, monkeypatch):
    """The trainer switches the hooks on (here on CPU, where they copy) and its run is the same."""
    import json

    import train_sft
    from conftest import train_args
    from safetensors.torch import load_file

    runs, made = {}, []
    for flag in (False, True):
        if flag:  # let the CPU play the host link: every saved activation is copied and copied back
            enable = offload.enable
            monkeypatch.setattr(offload, "enable",
                                lambda model: made.append(enable(model, min_bytes=0, devices=("cpu",))) or made[-1])
        out = tmp_path / str(flag)
        train_sft.main(train_args(tiny_dir, alpaca_40, out, "--max_steps", "2", "--gradient_checkpointing",
                                  "--generate_tokens", "0", *(["--offload_activations"] if flag else [])))
        runs[flag] = load_file(out / "sift_increment.safetensors")
        assert json.loads((out / "args.json").read_text())["train"]["offload_activations"] is flag
    assert len(made) == 1 and made[0].offloaded_tensors > 0  # the last forward's saved activations went out
    assert runs[False].keys() == runs[True].keys()
    assert all(torch.equal(runs[False][k], runs[True][k]) for k in runs[False])


def test_embeddings_on_host_train_the_same_and_refuse_what_they_cannot_hold():
    def run(on_host: bool):
        model = tiny_llama(dtype=torch.float32)
        opt = SIFT(model, SIFTConfig(rate=0.1, lr=1e-3))  # freezes the table
        if on_host:
            offload.embeddings_on_host(model)
        for i in range(2):
            causal_lm_loss(model, batch(i)).backward()
            opt.step()
            opt.zero_grad()
        return model

    plain, moved = run(False), run(True)
    assert moved.get_input_embeddings().weight.device.type == "cpu"
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), moved.parameters()))
    tied = tiny_llama()
    tied.lm_head.weight = tied.get_input_embeddings().weight  # what tie_word_embeddings does
    tied.requires_grad_(False)
    with pytest.raises(ValueError, match="tied to the output head"):
        offload.embeddings_on_host(tied)
    with pytest.raises(ValueError, match="trained here"):
        offload.embeddings_on_host(tiny_llama())  # every parameter still trains


def test_planner_moves_the_table_to_the_host_column():
    plain, moved = floor_plans(hidden=256, layers=2, vocab=4096, seq=256, embeddings_on_host=True)
    table = 4096 * 256 * 2
    assert plain["peak"] - moved["peak"] == table
    assert moved["peak_breakdown"]["host"] == table


def test_train_sft_refuses_host_embeddings_it_cannot_keep(tiny_dir, alpaca_40, tmp_path):
    import json
    import shutil

    import train_sft
    from conftest import train_args

    with pytest.raises(SystemExit) as err:
        train_sft.main(train_args(tiny_dir, alpaca_40, tmp_path / "a", "--embeddings_on_host",
                                  "--finetuning_type", "full"))
    assert "--embeddings_on_host: only for a frozen table" in str(err.value)
    tied = tmp_path / "tied"  # a tied table is refused from the config, before any weight is read
    shutil.copytree(tiny_dir, tied)
    cfg = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    with pytest.raises(SystemExit) as err:
        train_sft.main(train_args(str(tied), alpaca_40, tmp_path / "b", "--embeddings_on_host"))
    assert "ties its input embeddings to the output head" in str(err.value)
    train_sft.main(train_args(tiny_dir, alpaca_40, tmp_path / "c", "--embeddings_on_host", "--max_steps", "1",
                              "--generate_tokens", "0"))  # an untied, frozen table trains
    assert (tmp_path / "c" / "sift_increment.safetensors").exists()
