"""benchmarks/: the byte counter against hand-counted tensors, the planner against a measured step,
and the memory / speed machinery on a tiny model. No timing assertions: this machine is shared."""
import copy
import datetime
import gc
import json
import math
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from benchmarks import memory_plan, memory_speed, quality, run
from benchmarks.memtrack import MemoryTracker, nbytes_of
from benchmarks.methods import Method, Trainee, compared_methods, lora_rank_for_rate, sift_rate_for_rank, targets_of
from benchmarks.sparsity import mean_pairwise_overlap
from conftest import batch, tiny_llama


def test_tracker_counts_hand_counted_tensors():
    with MemoryTracker() as mt:
        a = torch.empty(1000)                              # 4000 B
        b = torch.zeros(10, 10, dtype=torch.float64)       # 800 B
        view = a[10:].view(-1)                             # a view: no new storage
        a.add_(1)                                          # in place: nothing new
        c = a * 2                                          # 4000 B
        assert mt.current == 8800
        del a
        assert mt.current == 8800, "the view keeps a's storage alive"
        del view
        assert mt.current == 4800
        i = torch.tensor([[0, 1], [2, 0]])                 # int64 (2, 2): 32 B
        v = torch.ones(2)                                  # 8 B
        s = torch.sparse_coo_tensor(i, v, (3, 3)).coalesce()  # its own indices (32 B) and values (8 B)
        assert mt.current == 4800 + 40 + nbytes_of(s)
        assert nbytes_of(s) == 40
        del c, s, i, v
        gc.collect()
        assert mt.current == 800
    assert mt.peak == 8800
    del b


def test_tracker_categories_and_peak_snapshot():
    w = torch.randn(256, 256)                              # existed before the tracker: added by hand
    with MemoryTracker() as mt:
        mt.add([w], "params")
        with mt.phase("forward"):
            act = torch.randn(64, 256)                     # 64 KiB
        with mt.phase("backward"):
            tmp = torch.randn(128, 256)                    # 128 KiB, dies before the end
            g = torch.randn(256, 256)                      # 256 KiB, named a gradient later
            del tmp
        mt.tag([g], "grads")                               # renames it in the peak snapshot too
    bd = mt.peak_breakdown()
    assert bd["params"] == bd["grads"] == 256 * 256 * 4
    assert bd["activations"] == 64 * 256 * 4 and bd["backward"] == 128 * 256 * 4
    assert mt.peak == sum(bd.values())
    del act, g


def test_tracker_sees_sift_state_exactly_as_sift_reports_it():
    model = tiny_llama(layers=2, hidden=64, vocab=128)
    method = Method("s", "sift", rate=0.05)
    trainee, steps, after = memory_speed.track_steps(method, model, [batch(i, vocab=128) for i in range(2)], 2)
    report = trainee.sift_report()
    assert after["breakdown"]["optimizer"] == report["persistent"]  # quantile maps and tables included
    assert after["breakdown"]["params"] == nbytes_of(list(model.parameters()) + list(model.buffers()))
    trainee.close()


def test_full_adamw_end_of_step_is_params_plus_states():
    model = tiny_llama(layers=1, hidden=64, vocab=128)
    trainee, steps, after = memory_speed.track_steps(Method("f", "full"), model, [batch(0, vocab=128)], 2)
    n = sum(p.numel() for p in model.parameters())
    step_counters = 4 * len(list(model.parameters()))      # one fp32 scalar per parameter
    assert after["breakdown"]["optimizer"] == 8 * n + step_counters
    # peak of a full step holds at least weights, gradients and both moments
    assert steps[-1]["peak"] >= 16 * n


def test_rank_and_rate_matching():
    model = tiny_llama(layers=2, hidden=64, vocab=128)
    rank = lora_rank_for_rate(model, 0.05)
    rate = sift_rate_for_rank(model, rank)
    lora = Trainee(Method("l", "lora", rank=rank), copy.deepcopy(model))
    sift = Trainee(Method("s", "sift", rate=rate), copy.deepcopy(model))
    assert abs(lora.entries - sift.entries) <= len(targets_of(model))  # ceil per tensor
    sift.close()


@pytest.mark.parametrize("ckpt", [False, True])
def test_planner_matches_a_measured_cpu_step_within_10_percent(ckpt):
    """The planner runs the real step on meta tensors; the measurement runs it on CPU tensors."""
    cfg = tiny_llama(layers=2, hidden=64, vocab=128).config
    methods = [Method("floor", "floor"), Method("lora", "lora", rank=4), Method("original", "original", rate=0.05),
               Method("sift", "sift", rate=0.05), Method("sift-ib", "sift", rate=0.05, step_in_backward=True)]
    if not ckpt:
        methods.insert(1, Method("full", "full"))
    # 96 tokens: an S x S attention matrix (what meta's math-path SDPA would keep) would be visible
    batches = [batch(i, size=2, length=96, vocab=128) for i in range(2)]
    for method in methods:  # step 2: every optimizer's state exists (the original profile's from step 3)
        model = memory_plan.build(cfg, "cpu", torch.float32, ckpt)
        _, steps, _ = memory_speed.track_steps(method, model, batches, 2)
        plan = memory_plan.plan(cfg, method, batch_size=2, seq_len=96, dtype=torch.float32,
                                gradient_checkpointing=ckpt, steps=2)
        measured = steps[-1]["peak"]  # on CPU, host-resident state is resident: compare like with like
        assert abs(plan["peak_with_host"] - measured) <= 0.10 * measured, (method.name, plan, measured)


def test_compared_methods_machinery_on_a_tiny_model():
    model = tiny_llama(layers=2, hidden=64, vocab=128)
    batches = [batch(i, vocab=128) for i in range(3)]
    methods = compared_methods(model)
    assert [m.kind for m in methods] == ["floor", "full", "full", "lora", "original"] + ["sift"] * 4
    # the full-model optimizers are covered above; the 1 % rows take the same paths as the 5 % ones
    methods = [m for m in methods if m.kind != "full" and m.rate != 0.01]
    results = memory_speed.run(model, batches, methods, tracked_steps=2, timed_steps=1, log=lambda *_: None)
    assert [r["name"] for r in results] == [m.name for m in methods]
    sift = [r for r in results if r["method"]["kind"] == "sift"]
    for r in results:
        assert r["peak_vs_floor"] >= 1.0 - 1e-9 and r["median_step_s"] > 0
    for r in sift:  # SIFT's peak is the floor plus its sparse state, nothing more
        assert r["goals"]["peak_le_floor_plus_sparse_state"], r["goals"]


@pytest.mark.parametrize("dtype, grad_bytes", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_sparse_state_counts_the_deferred_gradients_in_the_weights_dtype(dtype, grad_bytes):
    """The deferred step's sparse gradients stay in the weight's dtype until a second micro-batch
    accumulates (none does here): 4 B per entry on fp32 weights, 2 on bf16; in-backward keeps none."""
    model = tiny_llama(layers=1, hidden=64, vocab=128, dtype=dtype)
    methods = [Method("floor", "floor"), Method("deferred", "sift", rate=0.05),
               Method("in-backward", "sift", rate=0.05, step_in_backward=True)]
    results = memory_speed.run(model, [batch(i, vocab=128) for i in range(2)], methods, tracked_steps=2,
                               timed_steps=1, log=lambda *_: None)
    deferred, in_backward = results[1], results[2]
    entries = deferred["trainable_entries"]
    assert entries == deferred["sift"]["entries"] > 0
    assert deferred["goals"]["sparse_state_bytes"] == deferred["state_bytes"] + grad_bytes * entries
    assert in_backward["goals"]["sparse_state_bytes"] == in_backward["state_bytes"]


def test_mean_pairwise_overlap_matches_set_intersections():
    g = torch.Generator().manual_seed(0)
    sets = [torch.randperm(1000, generator=g)[:50].sort().values.int() for _ in range(4)]
    pairs = [(a, b) for i, a in enumerate(sets) for b in sets[i + 1:]]
    expected = sum(torch.isin(a, b).sum().item() / 50 for a, b in pairs) / len(pairs)
    assert mean_pairwise_overlap(sets, 1000) == pytest.approx(expected)
    assert mean_pairwise_overlap([sets[0], sets[0]], 1000) == 1.0


def test_heldout_loss_is_a_token_mean_not_a_mean_of_batch_means():
    model = tiny_llama(layers=1, hidden=32, vocab=64)
    a, b = batch(0, size=1, length=12), batch(1, size=2, length=12)
    b["labels"][:, :6] = -100  # fewer label tokens in the second batch
    na, nb = 11, 2 * 6  # labels are shifted by one inside the loss: positions 6..11 of each row
    expected = (model(**a).loss.item() * na + model(**b).loss.item() * nb) / (na + nb)
    assert quality.heldout_loss(model, [a, b]) == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------- the driver
REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


def _experiment(root: Path, name: str, params: dict) -> None:
    path = root / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"description": "a tiny plan", "params": params}))


def test_driver_regenerates_an_experiment_into_a_stamped_result_plot_and_readme_table(tmp_path):
    """plan/tiny through `python -m benchmarks.run`: the result holds the planner's own rows (a direct
    call is the reference), a stamp naming the command, commit, device and date, a PNG, a README table."""
    params = {"model": "llama-tiny", "seq": 32, "method": "sift", "rate": 0.05}
    _experiment(tmp_path / "exp", "plan/tiny", params)
    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- BEGIN plan--tiny -->\nstale\n<!-- END plan--tiny -->\nafter\n")
    t0 = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    assert run.main(["plan/tiny", "--experiments_dir", str(tmp_path / "exp"), "--results_dir", str(tmp_path / "res"),
                     "--plots_dir", str(tmp_path / "plots"), "--readme", str(readme)]) == 0
    doc = json.loads((tmp_path / "res" / "plan--tiny.json").read_text())
    reference = memory_plan.plan_setting(**params)["rows"]
    rows = doc["result"]["rows"]
    assert [r["name"] for r in rows] == [r["name"] for r in reference]
    for got, want in zip(rows, reference):  # LoRA's step allocates a 16-byte scalar or not, run to run
        assert got["peak"] == pytest.approx(want["peak"], abs=64), got["name"]
        assert got["peak_breakdown"]["optimizer"] == want["peak_breakdown"]["optimizer"], got["name"]
    assert (doc["experiment"], doc["stage"], doc["params"]) == ("plan/tiny", "plan", params)
    st = doc["stamp"]
    assert st["command"] == "python -m benchmarks.run plan/tiny"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    assert st["commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert isinstance(st["dirty"], bool) and st["seconds"] > 0
    assert datetime.datetime.fromisoformat(st["date"]) >= t0
    assert st["device"]["cores"] >= 1 and st["device"]["cpu"] and st["device"]["torch"] == torch.__version__
    assert (tmp_path / "plots" / "plan--tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = readme.read_text()
    assert "stale" not in text and text.startswith("before\n") and text.endswith("after\n")
    assert "Made by `python -m benchmarks.run plan/tiny` · commit" in text
    assert "![plan--tiny](plots/plan--tiny.png)" in text and "| SIFT 5% deferred |" in text


def test_driver_dry_run_writes_nothing_and_bad_experiments_are_refused_together(tmp_path):
    exp, res = tmp_path / "exp", tmp_path / "res"
    _experiment(exp, "plan/tiny", {"model": "llama-tiny", "seq": 32, "method": "sift"})
    dirs = ["--experiments_dir", str(exp), "--results_dir", str(res), "--plots_dir", str(tmp_path / "p"),
            "--readme", ""]
    assert run.main(["--dry-run", "plan/*", *dirs]) == 0
    assert not res.exists() and not (tmp_path / "p").exists()
    _experiment(exp, "plan/typo", {"model": "llama-tiny", "sequence": 32})
    _experiment(exp, "nostage/x", {})
    (exp / "plan" / "broken.json").write_text("{")
    with pytest.raises(SystemExit) as err:
        run.main(["plan/*", "nostage/x", "memory/nothing", *dirs])
    lines = str(err.value).splitlines()
    assert err.value.code == 2 and not res.exists()
    for needles in (["broken.json", "not JSON"], ["typo.json", "unknown params ['sequence']", "seq"],
                    ["nostage/x.json", "no stage 'nostage'"], ["memory/nothing", "no such experiment"]):
        assert len([line for line in lines if all(n in line for n in needles)]) == 1, (needles, lines)


def test_checkpoint_offers_a_partial_result_only_to_the_same_params(tmp_path):
    saved = run.Checkpoint(tmp_path / ".partial" / "x.json", {"steps": 3})
    assert saved.load() is None
    saved.save({"runs": [1, 2]})
    assert run.Checkpoint(saved.path, {"steps": 3}).load() == {"runs": [1, 2]}
    assert run.Checkpoint(saved.path, {"steps": 4}).load() is None
    saved.clear()
    assert saved.load() is None


def test_every_result_is_regenerable_by_its_experiment_and_every_readme_table_has_a_result():
    experiments = run.discover(BENCH / "experiments")
    for name, path in experiments.items():
        assert run.load_experiment(name, path)[1] == [], name
    slugs = set()
    for path in sorted((BENCH / "results").glob("*.json")):
        doc = json.loads(path.read_text())
        slugs.add(path.stem)
        assert path.stem == doc["experiment"].replace("/", "--") and doc["experiment"] in experiments, path.name
        st = doc["stamp"]
        assert st["command"] == f"python -m benchmarks.run {doc['experiment']}", path.name
        assert len(st["commit"]) == 40 and st["date"] and st["device"], path.name
        # a rerun used the experiment's params; a result kept from history says how it was made
        assert doc["params"] == json.loads(experiments[doc["experiment"]].read_text())["params"] or st["note"]
    for png in (BENCH / "plots").glob("*.png"):
        assert any(png.stem == s or png.stem.startswith(s + "-") for s in slugs), png.name
    markers = re.findall(r"^<!-- BEGIN (\S+)", (BENCH / "README.md").read_text(), re.M)
    assert markers and set(markers) - {"index"} <= slugs, set(markers) - slugs - {"index"}


def test_gpu_check_dry_run_builds_every_part_on_the_cpu_and_each_row_meets_its_plan():
    """The prepared GPU check with its real experiment, CPU side only: every row (bf16, QSIFT,
    QLoRA; llama-tiny shapes) measured by the byte counter within 2 % of its live plan."""
    name = "gpu/check"
    exp, problems = run.load_experiment(name, run.discover(BENCH / "experiments")[name])
    assert not problems
    exp["params"]["steps"] = 2  # the first step selects, the second is a steady one: enough to compare
    result = run.call_stage(exp, log=lambda *_: None, dry_run=True)
    assert len(result["rows"]) == len(exp["params"]["rows"])
    for row in result["rows"]:
        assert abs(row["measured_vs_plan"]) <= 0.02, row
    assert [p["optimizer"] for p in result["parity"]] == ["adamw8bit", "adamw"]
    assert result["parity"][0]["max_abs_update"] > 0 and result["kernel_same_inputs"]["max_abs_update"] > 0
    commands = result["zero3"]["commands"]
    assert "ds_configs/zero3_offload.json" in commands["offload"] and "ds_configs/zero3.json" in commands["qsift"]
    assert commands["sift"][commands["sift"].index("--per_device_train_batch_size") + 1] == "2"
    if not torch.cuda.is_available():  # the real run refuses in one line
        with pytest.raises(SystemExit) as err:
            run.call_stage(exp, log=lambda *_: None)
        assert err.value.code == 2 and "needs a CUDA device" in str(err.value)


# ------------------------------------------------------------------------------- the planner's bad input
def _planner_files(d: Path) -> None:
    (d / "empty").mkdir()
    (d / "garbage.json").write_text("{not json")
    (d / "list.json").write_text("[1, 2]")
    (d / "notype.json").write_text('{"hidden_size": 64}')
    (d / "nosuch_type.json").write_text('{"model_type": "no-such-architecture"}')
    (d / "gpt2.json").write_text('{"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 128, '
                                 '"bos_token_id": 0, "eos_token_id": 0}')
    tied = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128, "tie_word_embeddings": True}
    (d / "tied.json").write_text(json.dumps(tied))
    (d / "out.json").write_text("kept")


# id: (arguments, [what one line of stderr must say, for each problem]). The first group runs as
# subprocesses (each ~5 s of CPU importing torch and bitsandbytes): the option check, the model
# check (its config read and its meta skeleton) and argparse's own; the second in this process.
PLANNER_SUBPROCESS = {
    "numbers": (["--seq", "0", "--batch", "-1", "--rate", "nan", "--lora_rank", "0",
                 "--gradient_accumulation_steps", "0"],
                [["--seq 0", ">= 1"], ["--batch -1", ">= 1"], ["--rate nan", "(0, 1]"], ["--lora_rank 0", ">= 1"],
                 ["--gradient_accumulation_steps 0", ">= 1"]]),
    "not_llama": (["--model", "{d}/gpt2.json"], [["gpt2.json", "GPT2LMHeadModel lacks the LLaMA linears", "q_proj"]]),
    "abbreviation": (["--lora_r", "3"], [["unrecognized arguments: --lora_r 3"]]),
}
PLANNER_IN_PROCESS = {
    "unknown_model": (["--model", "llama-9b"], [["--model llama-9b", "not a shape name", "llama-7b"]]),
    "garbage_config": (["--model", "{d}/garbage.json"], [["garbage.json", "not JSON", "line 1"]]),
    "json_is_a_directory": (["--json", "{d}"], [["--json", "is a directory"]]),
    "rate_above_1": (["--rate", "2"], [["--rate 2.0", "(0, 1]"]]),
    "rate_inf": (["--rate", "inf", "--seq", "-3"], [["--rate inf", "(0, 1]"], ["--seq -3", ">= 1"]]),
    "dir_without_config": (["--model", "{d}/empty"], [["empty", "no config.json"]]),
    "config_not_an_object": (["--model", "{d}/list.json"], [["list.json", "expected a JSON object"]]),
    "config_without_model_type": (["--model", "{d}/notype.json"], [["notype.json", "no model_type field"]]),
    "unknown_model_type": (["--model", "{d}/nosuch_type.json"], [["nosuch_type.json", "transformers cannot read it"]]),
    "tied_embeddings_on_host": (["--model", "{d}/tied.json", "--embeddings_on_host"],
                                [["--embeddings_on_host", "ties its input embeddings"]]),
    "json_in_a_missing_directory": (["--json", "{d}/nowhere/plan.json"], [["--json", "nowhere", "no directory"]]),
    "zero3_bad_ranks_and_config": (["--zero", "3", "--world_size", "0", "--ds_config", "{d}/none.json"],
                                   [["--world_size 0", ">= 1"], ["--ds_config", "none.json", "zero3 or zero3_offload"]]),
    "seq_not_a_number": (["--seq", "abc"], [["--seq", "invalid int value: 'abc'"]]),
    "unknown_dtype": (["--dtype", "fp8"], [["--dtype", "invalid choice: 'fp8'"]]),
}


def _assert_one_line_each(rc: int, err: str, problems: list[list[str]], d: Path) -> None:
    assert rc == 2 and "Traceback" not in err, err
    for needles in problems:
        assert len([line for line in err.splitlines() if all(n in line for n in needles)]) == 1, (needles, err)
    assert "gemm_4bit_forward" not in err and "Setting accelerator to CPU" not in err, err
    assert (d / "out.json").read_text() == "kept" and not (d / "nowhere").exists()


@pytest.fixture(scope="module")
def planner_subprocesses(tmp_path_factory):
    d = tmp_path_factory.mktemp("planner-bad-input")
    _planner_files(d)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def one(args):
        argv = [sys.executable, "-m", "benchmarks.memory_plan", *[a.format(d=d) for a in args]]
        return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(max_workers=3) as pool:  # subprocesses: the threads only wait
        done = dict(zip(PLANNER_SUBPROCESS, pool.map(one, [a for a, _ in PLANNER_SUBPROCESS.values()])))
    return d, done


@pytest.mark.parametrize("name", list(PLANNER_SUBPROCESS))
def test_planner_bad_input_gets_one_clear_line_before_any_plan(planner_subprocesses, name):
    d, done = planner_subprocesses
    _assert_one_line_each(done[name].returncode, done[name].stderr, PLANNER_SUBPROCESS[name][1], d)
    assert done[name].stdout == ""  # no table, nothing planned


@pytest.mark.parametrize("name", list(PLANNER_IN_PROCESS))
def test_planner_bad_input_in_process(tmp_path, capsys, name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _planner_files(tmp_path)
    args, problems = PLANNER_IN_PROCESS[name]
    with pytest.raises(SystemExit) as err:
        memory_plan.main([a.format(d=tmp_path) for a in args])
    out = capsys.readouterr()
    _assert_one_line_each(err.value.code, out.err, problems, tmp_path)
    assert out.out == ""


def test_the_planner_plans_each_sift_row_inside_a_regrow_window_too():
    """--regrow_fraction adds each SIFT row stepping inside the first regrow window: its peak is the
    static row's plus the window's candidates exactly (memory_report's regrow_candidates), which stay
    within sift.regrow's bound of 14 B per candidate (<= 2 x fraction x k) + 4 B per index block."""
    from sift import regrow

    doc = memory_plan.plan_setting(model="llama-tiny", seq=32, method="sift", rate=0.05, regrow_fraction=0.2)
    rows = {r["name"]: r for r in doc["rows"]}
    tensors = 7 * memory_plan.checked_config("llama-tiny", False)[0].num_hidden_layers  # one index block each
    for mode in ("deferred", "in-backward"):
        static, window = rows[f"SIFT 5% {mode}"], rows[f"SIFT 5% {mode} + regrow window (0.2)"]
        held = window["sift"]["regrow_candidates"]
        assert "regrow_candidates" not in static["sift"] and window["sift"]["total"] == static["sift"]["total"] + held
        assert 0 < held <= 14 * regrow.CANDIDATES * 0.2 * window["trainable_entries"] + 4 * tensors
        assert window["peak"] == static["peak"] + held, mode


@pytest.mark.parametrize("key, value, needle", [("seq", 2.5, "--seq 2.5: must be an integer"),
                                                ("batch", True, "--batch True: must be an integer"),
                                                ("rate", "0.05", "--rate 0.05: must be a number in (0, 1]"),
                                                ("method", "qlora", "--method qlora: choose one of all, full"),
                                                ("quantization", "int8", "--quantization int8: choose one of nf4"),
                                                ("regrow_fraction", 1.5, "--regrow_fraction 1.5: must be a number in (0, 1]"),
                                                ("zero", 2, "--zero 2: the per-rank plan is for ZeRO-3")])
def test_plan_experiments_get_the_planners_checks(key, value, needle):
    """An experiment's JSON can hold what argparse would refuse; the stage refuses it the same way."""
    with pytest.raises(SystemExit) as err:
        memory_plan.plan_setting(**{"model": "llama-tiny", key: value})
    assert err.value.code == 2 and needle in str(err.value)


def test_regrow_studys_sift_rate_is_lora_rank_4s_count_on_the_embedded_model():
    """The study's equal budget, against the count written out from SmolLM2-135M's config: LoRA adds
    r (in + out) per q / k / v / o / gate / up / down projection, SIFT trains rate x in x out."""
    from transformers import AutoConfig

    from benchmarks.regrow_quality import sift_rate
    from common.modeling import resolve_model_path

    c = AutoConfig.from_pretrained(resolve_model_path(None))
    h, i, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]
    lora = 4 * sum(a + b for a, b in shapes)
    assert sift_rate(4) == pytest.approx(lora / sum(a * b for a, b in shapes), rel=1e-12)


def test_regrow_studys_sweep_extends_past_a_winning_end_and_stops_inside():
    """A score with its minimum at 3e-5, below a (3e-4, 1e-3, 3e-3) grid: the sweep walks down one
    half-decade at a time (1e-4, then 3e-5), each rate scored once, and stops when its extensions are
    spent; the same score on a grid around 3e-5 needs none, and a rising score walks up."""
    from benchmarks.regrow_quality import choose_lr

    def score_from(seen):
        def score(lr):
            seen.append(lr)
            return (math.log10(lr) - math.log10(3e-5)) ** 2
        return score

    seen = []
    assert choose_lr((3e-4, 1e-3, 3e-3), score_from(seen), extend=2) == pytest.approx(3e-5)
    assert sorted(seen) == pytest.approx([3e-5, 1e-4, 3e-4, 1e-3, 3e-3])  # each rate scored once
    seen = []
    assert choose_lr((3e-4, 1e-3, 3e-3), score_from(seen), extend=1) == pytest.approx(1e-4)  # budget spent
    seen = []
    assert choose_lr((1e-5, 3e-5, 1e-4), score_from(seen)) == pytest.approx(3e-5) and len(seen) == 3
    assert choose_lr((1e-3, 3e-3), lambda lr: -lr, extend=1) == pytest.approx(1e-2)  # upwards
    assert choose_lr((2e-4,), score_from([])) == 2e-4


def test_regrow_studys_summary_pairs_each_method_with_its_reference_by_seed():
    """Known answer: a regrow method against its static self, every other method against static SIFT,
    seed with seed."""
    from benchmarks.regrow_quality import StudyConfig, summarize

    after = {"sift": (1.50, 1.60), "sift-regrow": (1.49, 1.62), "qsift": (1.70, 1.80), "qsift-regrow": (1.68, 1.81),
             "lora": (1.52, 1.58)}
    runs = {f"{m}-seed{s}": {"method": m, "seed": s, "lr": 1e-3, "seconds": 60.0, "trained_entries": 10,
                             "before": {"heldout_loss": 2.0, "other_loss": 3.0},
                             "after": {"heldout_loss": a[s], "other_loss": 3.0 - a[s]}}
            for m, a in after.items() for s in (0, 1)}
    out = summarize(runs, StudyConfig(methods=tuple(after)))
    assert "vs" not in out["sift"] and out["sift"]["heldout_after"] == pytest.approx(1.55)
    assert out["sift-regrow"]["vs"] == "sift" and out["sift-regrow"]["heldout_paired"] == pytest.approx(0.005)
    assert out["sift-regrow"]["heldout_paired_spread"] == pytest.approx([-0.01, 0.02])
    assert out["qsift-regrow"]["vs"] == "qsift" and out["qsift-regrow"]["heldout_paired"] == pytest.approx(-0.005)
    assert out["qsift"]["vs"] == "sift" and out["qsift"]["heldout_paired"] == pytest.approx(0.2)
    assert out["lora"]["other_paired"] == pytest.approx(0.0) and out["lora"]["other_paired_spread"] == pytest.approx([-0.02, 0.02])
