"""Fixed-seed tiny runs of train_sft.py reproduce the recorded fingerprints (tests/fingerprints.py):
the same held-out losses, training losses, gradient norms and trained tensors, bit for bit.

On a CPU whose kernel family differs from the recording machine's (torch's cpu capability), float
results may differ in the last bits: there the sums of every tensor and the losses are compared
within 1e-5 instead, and the test says so in its name."""
import json
import math

import pytest

from fingerprints import FIXTURE, RUNS, cpu_capability, run

with open(FIXTURE) as f:
    RECORDED = json.load(f)
SAME_KERNELS = RECORDED["cpu_capability"] == cpu_capability()


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_run_reproduces_its_fingerprint(name, tiny_dir, alpaca_40, tmp_path):
    want = RECORDED["runs"][name]
    got = run(name, tiny_dir, alpaca_40, str(tmp_path / name))
    assert got["file"] == want["file"]
    assert sorted(got["tensors"]) == sorted(want["tensors"])
    if SAME_KERNELS:
        for key in ("heldout_before", "heldout_after", "losses", "grad_norms"):
            assert got[key] == want[key], key
        for key, t in want["tensors"].items():
            assert got["tensors"][key] == t, key
        return
    for key in ("heldout_before", "heldout_after"):
        assert close(got[key], want[key]), key
    assert all(close(a, b) for a, b in zip(got["losses"], want["losses"]))
    for key, t in want["tensors"].items():
        mine = got["tensors"][key]
        assert (mine["dtype"], mine["shape"]) == (t["dtype"], t["shape"]), key
        if "int" in t["dtype"]:
            assert mine["sha256"] == t["sha256"], key  # indices: the same entries whatever the kernels
        else:
            assert close(mine["sum"], t["sum"]) and close(mine["sumsq"], t["sumsq"]), key
