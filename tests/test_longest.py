"""benchmarks.longest: plans scaled from a few layers against full plans, the search against
full plans on both sides of its answer, and the long-sequence step's dry run on the CPU."""
import dataclasses

import pytest
import torch
from transformers import LlamaConfig

from benchmarks import longest, memory_plan
from benchmarks.flash2 import FLASH2
from benchmarks.methods import Method
from benchmarks.models import FUSED_SDPA
from trainer import tiled_decoder

CONFIG = dict(vocab_size=64, hidden_size=64, intermediate_size=192, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=8192, tie_word_embeddings=False)
QSIFT = Method("QSIFT 1%", "sift", rate=0.01, quantization="nf4", offload_activations=True, tile_tokens=128)
SIFT = Method("SIFT 5%", "sift", rate=0.05, tile_tokens=128)


def config(layers):
    return LlamaConfig(num_hidden_layers=layers, **CONFIG)


def full(cfg, method, seq, tracker=memory_plan.MetaTracker):
    return memory_plan.plan(cfg, method, 1, seq, torch.bfloat16, gradient_checkpointing=True, steps=2,
                            attention=FLASH2, tracker=tracker)


@pytest.mark.parametrize("method", [QSIFT, SIFT, dataclasses.replace(SIFT, tile_tokens=None)],
                         ids=["qsift-offload-tiled", "sift-tiled", "sift-untiled"])
def test_scaled_plan_is_the_full_plan_within_one_percent(method):
    cfg = config(8)
    want = full(cfg, method, 1000)
    got = longest.scaled_plan(cfg, method, 1000)
    for key in ("peak", "offloaded_bytes"):
        assert got[key] == pytest.approx(want[key], rel=0.01), key
    # the first step with the host bytes: the plan subtracts the last step's host bytes from it,
    # which SIFT's first step only creates in its backward (the scaled plan takes those of the window)
    first = want["first_step_peak"] + want["peak_with_host"] - want["peak"]
    assert got["first_step"]["with_host"] == pytest.approx(first, rel=0.01)
    # the steady step's peak is not where the fixed parts alone would put it: a layer's backward
    assert got["steady"]["window"].endswith("layer")


@pytest.mark.parametrize("method", [dataclasses.replace(QSIFT, offload_activations=False), SIFT],
                         ids=["qsift", "sift"])
def test_the_planners_shortcuts_change_no_byte(method):
    """The op cache and the tiled layers' skipped middle chunks (meta device only) plan what the
    plain tracker over every chunk plans."""
    cfg = config(3)
    fast = full(cfg, method, 600, tracker=longest.CachingMetaTracker)
    tiled_decoder.PLAN_EVERY_CHUNK = True
    try:
        slow = full(cfg, method, 600)
    finally:
        tiled_decoder.PLAN_EVERY_CHUNK = False
    for key in ("peak", "first_step_peak", "peak_with_host", "offloaded_bytes"):
        assert fast[key] == slow[key], key
    assert fast["peak_breakdown"] == slow["peak_breakdown"]


def test_search_finds_the_longest_fitting_length_of_the_full_plan():
    cfg, method = config(5), dataclasses.replace(SIFT, offload_activations=True)
    budget = longest.needed(full(cfg, method, 2048)) * 1.3  # room for some more tokens than 2048
    found = longest.longest(cfg, method, budget, granularity=128, start=1024)
    seq = found["seq"]
    assert seq > 2048 and seq % 128 == 0 and found["plans"] <= 8
    assert longest.needed(full(cfg, method, seq)) <= budget < longest.needed(full(cfg, method, seq + 128))


def test_search_on_a_known_function():
    """Piecewise linear needs (a kink where the tiled layers start), nothing fitting, and a limit."""
    def plan_fn(_cfg, _method, seq):
        need = 1000 + 3 * seq if seq <= 4096 else 1000 + 3 * 4096 + 2 * (seq - 4096)
        return {"peak": need, "first_step_peak": need - 1}

    for budget in (900, 1000 + 3 * 300, 20_000, 250_000):
        found = longest.longest(None, None, budget, granularity=64, plan_fn=plan_fn, limit=2**17)
        fits = [s for s in range(64, 2**17 + 1, 64) if plan_fn(0, 0, s)["peak"] <= budget]
        assert found["seq"] == (max(fits) if fits else 0), budget


def test_long_step_dry_run_on_the_cpu_matches_its_plan():
    cfg = config(3)
    method = dataclasses.replace(QSIFT, offload_activations=False)  # nothing is offloaded on the CPU
    row = longest.long_step(cfg, method, 640, device="cpu")
    assert row["device"] == "cpu" and row["seq"] == 640
    assert row["steady_over_plan"] == pytest.approx(1, abs=0.03), row
    assert row["first_over_plan"] == pytest.approx(1, abs=0.03), row


def test_rows_and_cards_refuse_bad_input(capsys):
    with pytest.raises(SystemExit) as e:
        longest.main(["--rows", "lora:0.1"])
    assert e.value.code == 2 and "--rows 'lora:0.1'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        longest.main(["--gpu_gib", "0.4"])
    assert e.value.code == 2 and "--gpu_gib 0.4" in capsys.readouterr().err
    for argv, message in ((["--max_seq"], "--gradient_checkpointing"),
                          (["--max_seq", "--gradient_checkpointing", "--method", "lora"], "has none"),
                          (["--max_seq", "--gradient_checkpointing", "--gpu_gib", "24,x"], "--gpu_gib 24,x")):
        with pytest.raises(SystemExit) as e:
            memory_plan.main(["--model", "llama3.1-8b", *argv])
        assert e.value.code == 2 and message in capsys.readouterr().err
    for argv, message in ((["--device_step", "0"], "device_step 0"), (["--device_step", "64"], "no CUDA device")):
        with pytest.raises(SystemExit) as e:
            longest.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
