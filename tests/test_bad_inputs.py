"""The bad-input catalogue through the real CLIs, each in its own subprocess: the exit status (2 for
usage errors), a line that names the option or file and says what to do, no traceback, no
unrelated third-party warning, and no existing file modified or lost. Each process spends ~5 s of
CPU importing torch and bitsandbytes, so the cases run three at a time, and problems that one
check finds together share one invocation (each must get its own line)."""
import hashlib
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("OPENAI_API_KEY", None)
UNRELATED = ("gemm_4bit_forward", "Setting accelerator to CPU")
LAUNCHED = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}  # what `deepspeed --num_gpus 2` sets for rank 0


def _train(*extra):
    return lambda c: [sys.executable, "train_sft.py", "--model_name_or_path", c["tiny"], "--data_path", c["data"],
                      "--output_dir", str(c["dir"] / "out"), "--max_steps", "1", *[x.format(**c) for x in extra]]


def _eval(script, *extra):
    return lambda c: [sys.executable, f"eval/{script}", *[x.format(**c) for x in extra]]


def _prep(*extra):
    return lambda c: [sys.executable, "-m", "data_prep.alpaca", *[x.format(**c) for x in extra]]


# id: (command, exit status, [what one line of the message must say, for each problem], extra environment).
# Problems that the option check finds together are given together: every one must get its own line.
CASES = {
    # train_sft.py: usage errors found before any weight is read
    "option_problems_at_once": (_train("--data_path", "{dir}", "--learning_rate", "nan", "--lr_scheduler_type", "bogus",
                                       "--max_skipped_steps", "3", "--sift_rate", "1.5", "--output_dir", "{dir}/user.txt",
                                       "--deepspeed", "{dir}/list.json"), 2,
                                [["--data_path", "is a directory"], ["--learning_rate nan", "finite number > 0"],
                                 ["--lr_scheduler_type bogus", "choose one of"], ["--max_skipped_steps 3.0", "[0, 1]"],
                                 ["--sift_rate 1.5", "(0, 1]"], ["--output_dir", "user.txt: is a file"],
                                 ["--deepspeed", "list.json: expected a JSON object"]], {}),
    "sources_and_launcher": (_train("--data_path", "{dir}/nowhere/data.json", "--model_name_or_path",
                                    "nobody-sift/no-such-model", "--finetuning_type", "full", "--learning_rate", "0",
                                    "--deepspeed", "ds_configs/zero2.json", "--output_dir", "{dir}/user.txt/out"), 2,
                             [["--data_path", "no such file", "nor its directory"],
                              ["--model_name_or_path nobody-sift/no-such-model", "HF_HUB_OFFLINE", "local path"],
                              ["--learning_rate 0.0", "finite number > 0"],
                              ["--deepspeed ds_configs/zero2.json", "DeepSpeed launcher"],
                              ["--output_dir", "is a file, so the directory cannot be created"]], {}),
    "hub_dataset_model_dir_resume": (_train("--data_path", "nobody-sift/no-such-data", "--model_name_or_path", "{dir}",
                                            "--resume_from_checkpoint", "latest", "--overwrite_output_dir"), 2,
                                     [["--data_path nobody-sift/no-such-data", "HF_HUB_OFFLINE"],
                                      ["--model_name_or_path", "no config.json"],
                                      ["--overwrite_output_dir", "--resume_from_checkpoint", "pass one of them"]], {}),
    # ZeRO-3 under the launcher's variables: the baselines and an offload_optimizer section refused
    "zero3_lora_offload_optimizer": (_train("--finetuning_type", "lora", "--deepspeed", "{dir}/zero3_opt.json"), 2,
                                     [["--deepspeed runs SIFT only", "run the lora baseline without --deepspeed"],
                                      ["zero3_opt.json: offload_optimizer has nothing to offload", "keep offload_param"]],
                                     LAUNCHED),
    "zero3_full": (_train("--finetuning_type", "full", "--deepspeed", "ds_configs/zero3_offload.json"), 2,
                   [["--deepspeed runs SIFT only", "run the full baseline without --deepspeed"]], LAUNCHED),
    "too_few_samples": (_train("--eval_samples", "100"), 2, [["--eval_samples 100", "lower --eval_samples"]], {}),
    "yaml_syntax": (lambda c: [sys.executable, "train_sft.py", str(c["dir"] / "bad.yaml")], 2,
                    [["bad.yaml: not valid YAML at line", "fix the file"]], {}),
    "yaml_unknown_key": (lambda c: [sys.executable, "train_sft.py", str(c["dir"] / "typo.yaml")], 2,
                         [["typo.yaml: unknown option learning_rat: did you mean learning_rate?"]], {}),
    "resume_nothing": (_train("--resume_from_checkpoint", "latest"), 2,
                       [["--resume_from_checkpoint latest", "no complete checkpoint"]], {}),
    "holds_another_run": (_train("--output_dir", "{dir}/old_run"), 2,
                          [["--output_dir", "holds another run", "--overwrite_output_dir"]], {}),
    "unknown_target": (_train("--sift_targets", "q_proj,qkv_proj"), 2,
                       [["--sift_targets", "qkv_proj", "matches no module"]], {}),
    # the eval CLIs
    "mmlu_increment_corrupt": (_eval("mmlu.py", "--model", "{tiny}", "--increment", "{dir}/garbage.safetensors"), 2,
                               [["--increment", "garbage.safetensors", "not a readable safetensors file"]], {}),
    "mmlu_increment_missing": (_eval("mmlu.py", "--increment", "{dir}/none.safetensors"), 2,
                               [["--increment", "none.safetensors: no such file"]], {}),
    "mmlu_increment_foreign": (_eval("mmlu.py", "--model", "{tiny}", "--increment", "{dir}/foreign.safetensors",
                                     "--subjects", "anatomy", "--limit", "1", "--output_dir", "{dir}/mmlu"), 2,
                               [["--increment", "foreign.safetensors", "is not a parameter"]], {}),
    "mmlu_hub_model_offline": (_eval("mmlu.py", "--model", "nobody-sift/no-such-model"), 2,
                               [["--model nobody-sift/no-such-model", "HF_HUB_OFFLINE"]], {}),
    "mt_bench_gen_missing_model_dir": (_eval("mt_bench.py", "gen", "--model", "{dir}/no/such/dir"), 2,
                                       [["--model", "no such directory"]], {}),
    "mmlu_unknown_subject": (_eval("mmlu.py", "--subjects", "astrology", "--output_dir", "{dir}/mmlu"), 2,
                             [["--subjects", "astrology"]], {}),
    "mt_bench_gen_increment_corrupt": (_eval("mt_bench.py", "gen", "--model", "{tiny}", "--increment",
                                             "{dir}/garbage.safetensors", "--output_dir", "{dir}/bench"), 2,
                                       [["--increment", "garbage.safetensors"]], {}),
    "mt_bench_judge_key_newline": (_eval("mt_bench.py", "judge", "--output_dir", "{dir}/bench"), 2,
                                   [["$OPENAI_API_KEY", "whitespace or control characters"]],
                                   {"OPENAI_API_KEY": "sk-secret-key-4242\n"}),
    "mt_bench_judge_no_answers": (_eval("mt_bench.py", "judge", "--output_dir", "{dir}/nothing"), 2,
                                  [["--output_dir", "no model_answer/", "run `gen` first"]], {}),
    "mt_bench_show_no_judgments": (_eval("mt_bench.py", "show", "--output_dir", "{dir}/bench"), 2,
                                   [["gpt-4_single.jsonl: no judgment file", "run `judge` first"]], {}),
    # data_prep
    "prep_empty_input": (_prep("{dir}/empty.json", "-o", "{dir}/empty.jsonl"), 1,
                         [["no usable conversation", "nothing written"]], {}),
    "prep_output_is_input": (_prep("{dir}/rows.json", "-o", "{dir}/./rows.json"), 2,
                             [["-o", "would overwrite the input", "rows.json"]], {}),
    "prep_output_is_directory": (_prep("{dir}/rows.json", "-o", "{dir}"), 2, [["-o", "is a directory"]], {}),
    "prep_missing_input": (_prep("{dir}/absent.json", "-o", "{dir}/x.jsonl"), 2,
                           [["absent.json", "no such data file"]], {}),
}


def _setup(case_dir: Path, alpaca_40: str) -> None:
    """Files the cases point at; every one of them must be intact afterwards."""
    (case_dir / "user.txt").write_text("the user's notes\n")
    (case_dir / "bad.yaml").write_text("learning_rate: 1e-3\nsift_targets: [q_proj, v_proj\n")
    (case_dir / "typo.yaml").write_text("learning_rat: 1e-3\n")
    (case_dir / "list.json").write_text("[1, 2]\n")
    (case_dir / "zero3_opt.json").write_text('{"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}\n')
    (case_dir / "garbage.safetensors").write_bytes(b"not a safetensors file")
    save_file({"model.layers.9.self_attn.q_proj.weight.indices": torch.tensor([0, 1], dtype=torch.int32),
               "model.layers.9.self_attn.q_proj.weight.values": torch.zeros(2)},
              str(case_dir / "foreign.safetensors"), metadata={"format": "sift-increment", "version": "1"})
    (case_dir / "empty.json").write_text("")
    (case_dir / "empty.jsonl").write_text('{"an": "older output that must survive"}\n')
    (case_dir / "rows.json").write_text(Path(alpaca_40).read_text())
    old = case_dir / "old_run"
    old.mkdir()
    (old / "args.json").write_text("{}")
    (old / "sift_increment.safetensors").write_bytes(b"the old run's increment")
    answers = case_dir / "bench" / "model_answer"
    answers.mkdir(parents=True)
    (answers / "m.jsonl").write_text(json.dumps({"question_id": 81, "answer_id": "a", "model_id": "m",
                                                 "choices": [{"index": 0, "turns": ["a", "b"]}]}) + "\n")


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _run_case(name: str, root: Path, tiny: str, data: str) -> dict:
    command, *_ , env = CASES[name]
    case_dir = root / name
    case_dir.mkdir()
    _setup(case_dir, data)
    before = _snapshot(case_dir)
    argv = command({"dir": case_dir, "tiny": tiny, "data": data})
    done = subprocess.run(argv, cwd=REPO, env={**ENV, **env}, capture_output=True, text=True, timeout=600)
    return {"rc": done.returncode, "out": done.stdout, "err": done.stderr, "before": before,
            "after": _snapshot(case_dir), "argv": argv}


@pytest.fixture(scope="module")
def results(tiny_dir, alpaca_40, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    with ThreadPoolExecutor(max_workers=3) as pool:  # subprocesses: threads only wait
        futures = {name: pool.submit(_run_case, name, root, tiny_dir, alpaca_40) for name in CASES}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_one_clear_line(results, name):
    _, status, problems, _ = CASES[name]
    r = results[name]
    context = f"{' '.join(map(str, r['argv']))}\nrc={r['rc']}\nstdout:\n{r['out'][-1500:]}\nstderr:\n{r['err'][-3000:]}"
    assert r["rc"] == status, context
    assert "Traceback" not in r["err"] + r["out"], context
    for needles in problems:
        assert len([line for line in r["err"].splitlines() if all(n in line for n in needles)]) == 1, (needles, context)
    assert not any(w in r["err"] + r["out"] for w in UNRELATED), context
    assert "sk-secret-key-4242" not in r["err"] + r["out"]
    assert r["after"] == r["before"], "files changed: " + ", ".join(
        sorted(k for k in r["before"].keys() | r["after"].keys() if r["before"].get(k) != r["after"].get(k)))


def test_hub_ids_are_checked_in_the_cache_first_then_with_one_short_request(monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    from common.hub import hub_problem

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert "HF_HUB_OFFLINE" in hub_problem("nobody-sift/no-such-model")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    asked = []

    def unreachable(repo_id, timeout):
        asked.append(timeout)
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    assert "cannot be reached (this machine seems offline" in hub_problem("nobody-sift/no-such-model")
    assert asked == [10]
    monkeypatch.setattr(huggingface_hub, "dataset_info", lambda repo_id, timeout: object())
    assert hub_problem("somebody/some-data", "dataset") is None  # reachable: loading will download it


# ----------------------------------------------------------------------------- exports, eval and data_prep
# Outputs that would replace what an export reads, devices this machine lacks, files where directories
# are expected and back, a model without tokenizer files, an empty question range. These run in the same
# pool as the cases above (`results` runs every entry of CASES), from files the extended _setup adds.

def _export(*extra):
    return lambda c: [sys.executable, "-m", "sift.export", *[x.format(**c) for x in extra]]


INC = "{dir}/run/sift_increment.safetensors"
NO_CUDA = {"CUDA_VISIBLE_DEVICES": ""}  # so the case reads the same on a machine with a GPU
EXPORT_EVAL_PREP_CASES = {
    "export_merged_into_its_base": (_export("merged", "--increment", INC, "--output_dir", "{dir}/base", "--overwrite"),
                                    2, [["--output_dir", "is the increment's recorded base model"]], {}),
    "export_peft_into_its_base": (_export("peft", "--increment", INC, "--output_dir", "{dir}/base/", "--overwrite"),
                                  2, [["--output_dir", "is the increment's recorded base model"]], {}),
    "export_into_a_parent_of_its_base": (_export("merged", "--increment", INC, "--output_dir", "{dir}", "--overwrite"),
                                         2, [["--output_dir", "holds --increment"]], {}),
    "export_shard_size": (_export("merged", "--increment", INC, "--output_dir", "{dir}/m", "--max_shard_size", "lots"),
                          2, [["--max_shard_size", "'lots' is not a size"]], {}),
    "export_increment_is_a_directory": (_export("gguf", "--increment", "{dir}/run", "--output", "{dir}/m.gguf"), 2,
                                        [["--increment", "run: is a directory, expected a file"]], {}),
    "export_model_is_a_file": (_export("peft", "--increment", INC, "--output_dir", "{dir}/p", "--model",
                                       "{dir}/user.txt"), 2, [["--model", "user.txt: is a file"]], {}),
    "mmlu_cuda_without_cuda": (_eval("mmlu.py", "--device", "cuda"), 2, [["--device cuda", "no CUDA device"]], NO_CUDA),
    "mt_bench_gen_cuda_without_cuda": (_eval("mt_bench.py", "gen", "--device", "cuda", "--output_dir", "{dir}/bench"),
                                       2, [["--device cuda", "no CUDA device"]], NO_CUDA),
    "mmlu_hub_dataset_offline": (_eval("mmlu.py", "--hf_dataset", "nobody-sift/no-such-data"), 2,
                                 [["--hf_dataset nobody-sift/no-such-data", "HF_HUB_OFFLINE"]], {}),
    "mmlu_model_without_tokenizer": (_eval("mmlu.py", "--model", "{dir}/no_tokenizer"), 2,
                                     [["--model", "no_tokenizer", "no tokenizer files (tokenizer.json"]], {}),
    "mmlu_output_dir_is_a_file": (_eval("mmlu.py", "--output_dir", "{dir}/user.txt", "--subjects", "anatomy"), 2,
                                  [["--output_dir", "user.txt: is a file, expected a directory"]], {}),
    "mmlu_files_and_directories_swapped": (_eval("mmlu.py", "--data_dir", "{dir}/user.txt", "--increment", "{dir}/run",
                                                 "--device", "gpu"), 2,
                                           [["--data_dir", "user.txt: is a file, expected a directory"],
                                            ["--increment", "run: is a directory, expected a file"],
                                            ["--device gpu", "expected auto, cpu, cuda or cuda:N"]], {}),
    "mt_bench_gen_empty_question_range": (_eval("mt_bench.py", "gen", "--question_begin", "5", "--question_end", "2",
                                                "--output_dir", "{dir}/bench"), 2,
                                          [["--question_begin 5 is not below --question_end 2"]], {}),
    "mt_bench_judge_directory_as_file": (_eval("mt_bench.py", "judge", "--question_file", "{dir}/run",
                                               "--output_dir", "{dir}/bench"), 2,
                                         [["--question_file", "run: is a directory, expected a file"]], {}),
    "mt_bench_show_directory_as_file": (_eval("mt_bench.py", "show", "--input_file", "{dir}/bench",
                                              "--output_dir", "{dir}/user.txt"), 2,
                                        [["--input_file", "bench: is a directory, expected a file"],
                                         ["--output_dir", "user.txt: is a file, expected a directory"]], {}),
    "sharegpt_tokenizer_not_there": (lambda c: [sys.executable, "-m", "data_prep.sharegpt", f"{c['dir']}/rows.json",
                                                "-o", f"{c['dir']}/s.jsonl", "--max_tokens", "64",
                                                "--model_name_or_path", "/nonexistent"], 2,
                                     [["--model_name_or_path /nonexistent", "no such directory"]], {}),
    "prep_output_below_a_file": (_prep("{dir}/rows.json", "-o", "{dir}/user.txt/out.jsonl"), 2,
                                 [["-o", "user.txt is a file, so nothing can be created below it"]], {}),
}
CASES.update(EXPORT_EVAL_PREP_CASES)
_setup_catalogue = _setup


def _setup(case_dir: Path, alpaca_40: str) -> None:  # noqa: F811  the catalogue's files, and those below
    """Adds a base model directory (stand-in files: every case is refused before a weight loads), an
    increment that records it, and a model directory without tokenizer files."""
    from sift.increment import write_increment

    _setup_catalogue(case_dir, alpaca_40)
    for name in ("base", "no_tokenizer"):
        (case_dir / name).mkdir()
        (case_dir / name / "config.json").write_text('{"model_type": "llama"}')
        (case_dir / name / "model.safetensors").write_bytes(b"the base's weights")
    (case_dir / "base" / "tokenizer.json").write_text("{}")
    (case_dir / "run").mkdir()
    write_increment(str(case_dir / "run" / "sift_increment.safetensors"), {"model.norm.weight.delta": torch.zeros(4)},
                    {"base_model": str(case_dir / "base"), "dtype": "float32"})


@pytest.mark.parametrize("name", list(EXPORT_EVAL_PREP_CASES))
def test_export_eval_prep_bad_input_gets_one_clear_line(results, name):
    test_bad_input_gets_one_clear_line(results, name)


# ----------------------------------------------------------------------------- train_sft.py's options
# Values once taken silently (a negative count used as a Python slice, a path as a run name, the
# training file as the held-out one, an explicit value --step_in_backward cannot use), misspelled and
# abbreviated options, LoRA's ranges, the regrow's ranges and a regrow without entries, warm-up given
# twice, a file listed twice in --data_path: each one line naming the option, exit status 2, before
# anything is read or written. Same pool as above.
OPTION_CASES = {
    "negative_counts_and_paths": (_train("--max_train_samples", "-30", "--max_steps", "-5", "--save_steps", "-1",
                                         "--save_total_limit", "-1", "--eval_data_path", "{data}", "--run_name",
                                         "../../x"), 2,
                                  [["--max_train_samples -30", "must be >= 0"], ["--max_steps -5", "must be >= 1"],
                                   ["--save_steps -1", "must be >= 0"], ["--save_total_limit -1", "must be >= 0"],
                                   ["--eval_data_path", "is also a --data_path file", "training data"],
                                   ["--run_name '../../x'", "a name, not a path"]], {}),
    "misspelled_option": (_train("--learnin_rate", "1e-3"), 2,
                          [["unknown option --learnin_rate: did you mean --learning_rate?"]], {}),
    "abbreviated_options": (_train("--lora_r", "4", "--max_step", "3"), 2,
                            [["unknown option --lora_r: did you mean --lora_rank?"],
                             ["unknown option --max_step: did you mean --max_steps?"]], {}),
    "not_a_number": (_train("--sift_rate", "lots"), 2, [["--sift_rate", "invalid float value: 'lots'"]], {}),
    "lora_ranges": (_train("--finetuning_type", "lora", "--lora_rank", "0", "--lora_dropout", "1.5"), 2,
                    [["--lora_rank 0", "must be >= 1"], ["--lora_dropout 1.5", "must be in [0, 1)"]], {}),
    "tile_tokens": (_train("--tile_tokens", "-1"), 2, [["--tile_tokens -1", "must be >= 0"]], {}),
    "tile_tokens_with_lora_dropout": (_train("--tile_tokens", "64", "--finetuning_type", "lora", "--lora_dropout",
                                             "0.1"), 2, [["--tile_tokens 64", "not with --lora_dropout 0.1"]], {}),
    "warmup_given_twice": (_train("--warmup_steps", "2", "--warmup_ratio", "0.2"), 2,
                           [["--warmup_steps 2 and --warmup_ratio 0.2", "give one of them"]], {}),
    "step_in_backward_given_values": (_train("--step_in_backward", "--gradient_accumulation_steps", "2",
                                             "--max_grad_norm", "1.0"), 2,
                                      [["--step_in_backward cannot accumulate", "(got 2)"],
                                       ["--step_in_backward: cannot clip by the global norm"]], {}),
    "regrow_ranges": (_train("--sift_regrow_steps", "4", "--sift_regrow_fraction", "1.5", "--sift_regrow_window", "5"), 2,
                      [["--sift_regrow_fraction 1.5", "must be in (0, 1]"],
                       ["--sift_regrow_window 5", "[1, --sift_regrow_steps 4]"]], {}),
    "regrow_without_entries": (_train("--finetuning_type", "full", "--sift_regrow_steps", "10"), 2,
                               [["--sift_regrow_steps 10", "full fine-tuning", "use --finetuning_type sift"]], {}),
    "regrow_misspelled": (_train("--sift_regrow_step", "3"), 2,
                          [["unknown option --sift_regrow_step: did you mean --sift_regrow_steps?"]], {}),
    "data_file_listed_twice": (_train("--data_path", "{data},{data}"), 2, [["--data_path", "listed twice"]], {}),
    "data_list_with_a_missing_file": (_train("--data_path", "{data},{dir}/absent.jsonl"), 2,
                                      [["--data_path", "absent.jsonl: no such file"]], {}),
}
CASES.update(OPTION_CASES)


@pytest.mark.parametrize("name", list(OPTION_CASES))
def test_option_bad_input_gets_one_clear_line(results, name):
    test_bad_input_gets_one_clear_line(results, name)


def test_a_run_says_what_it_sets_and_ignores_before_loading_and_summarises_its_data(tiny_dir, tmp_path):
    """--step_in_backward alone trains (accumulation 1, no clipping, said in one line); an option of
    another method and a length past the model's positions are one warning each, before the weights
    load; the bundled data's skipped records are counts by reason, not lines."""
    out = tmp_path / "run"
    argv = [sys.executable, "train_sft.py", "--model_name_or_path", tiny_dir, "--output_dir", str(out), "--max_steps",
            "1", "--per_device_train_batch_size", "2", "--eval_samples", "4", "--generate_tokens", "0",
            "--step_in_backward", "--lora_rank", "4", "--model_max_length", "200"]
    done = subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    context = f"rc={done.returncode}\nstdout:\n{done.stdout[-2000:]}\nstderr:\n{done.stderr[-3000:]}"
    assert done.returncode == 0 and "Traceback" not in done.stderr, context
    said = ["--step_in_backward: using --gradient_accumulation_steps 1 and --max_grad_norm 0 (no clipping), which "
            "it needs", "warning: --lora_rank 4 is ignored: SIFT (--finetuning_type sift) does not read it; LoRA, "
            "QLoRA do", "warning: --model_max_length 200 is beyond the model's 128 positions"]
    lines = done.stderr.splitlines()
    for text in said:
        assert len([line for line in lines if line.startswith(text)]) == 1, (text, context)
        assert done.stderr.index(text) < done.stderr.index("Loading weights"), (text, context)
    records = [line for line in (done.stdout + done.stderr).splitlines()
               if line.startswith("skipped ") and not line.startswith("skipped steps")]
    assert not records, context
    assert re.search(r"^  dropped +14  duplicate_content$", done.stdout, re.M), context
    assert "(--verbose lists every skipped record)" in done.stdout
    train = json.loads((out / "args.json").read_text())["train"]
    assert (train["gradient_accumulation_steps"], train["max_grad_norm"]) == (1, 0.0)


# ----------------------------------------------------------------------------- the trainer's output and inputs
# An empty or dangling --output_dir and an empty held-out file (in the pool above, from files the extended
# _setup adds); then resumes whose inputs changed under the same option, or whose checkpoint was edited:
# each refused in one line naming what changed, exit 2, before any weight loads, nothing in the run changed.
# And QSIFT increments applied onto another base of the same shapes, through the export and eval CLIs.
RUN_CASES = {
    "output_dir_empty": (_train("--output_dir", ""), 2, [["--output_dir is empty", "name the directory"]], {}),
    "output_dir_dangling_symlink": (_train("--output_dir", "{dir}/dangling"), 2,
                                    [["--output_dir", "dangling: is a symlink to", "gone, which does not exist"]], {}),
    "output_dir_below_a_dangling_symlink": (_train("--output_dir", "{dir}/dangling/run"), 2,
                                            [["--output_dir", "dangling is a symlink to", "which does not exist"]], {}),
    "eval_data_empty": (_train("--eval_data_path", "{dir}/empty.json"), 2,
                        [["--eval_data_path", "no usable samples in", "empty.json"]], {}),
}
CASES.update(RUN_CASES)
_setup_exports = _setup


def _setup(case_dir: Path, alpaca_40: str) -> None:  # noqa: F811  the files above, and a dangling symlink
    _setup_exports(case_dir, alpaca_40)
    (case_dir / "dangling").symlink_to(case_dir / "gone")


@pytest.mark.parametrize("name", list(RUN_CASES))
def test_output_and_held_out_data_bad_input_gets_one_clear_line(results, name):
    test_bad_input_gets_one_clear_line(results, name)
    argv = results[name]["argv"]
    out = argv[len(argv) - argv[::-1].index("--output_dir")]  # the last one given
    assert not out or out.endswith("dangling") or not os.path.lexists(out), "an output directory was left behind"


RESUME = ["--max_steps", "4", "--per_device_train_batch_size", "2", "--model_max_length", "96", "--eval_samples", "4",
          "--generate_tokens", "0", "--save_steps", "2", "--save_total_limit", "1"]


def _finished_run(root: Path, tiny_dir: str, alpaca_40: str) -> None:
    """A 4-step run in `root`, with its own model and data copies (each case edits its own)."""
    import shutil

    import train_sft

    shutil.copytree(tiny_dir, root / "model")
    shutil.copy(alpaca_40, root / "data.json")
    train_sft.main(["--model_name_or_path", str(root / "model"), "--data_path", str(root / "data.json"),
                    "--output_dir", str(root / "run"), *RESUME])


def _edit_data(root: Path) -> None:
    rows = json.loads((root / "data.json").read_text())
    rows[7]["output"] += " (edited)"
    (root / "data.json").write_text(json.dumps(rows))


def _replace_weights(root: Path) -> None:
    from conftest import tiny_llama
    from transformers import AutoConfig

    model = tiny_llama(seed=5, vocab=AutoConfig.from_pretrained(root / "model").vocab_size)  # same shapes, new values
    model.save_pretrained(root / "model")


def _edit_checkpoint_args(root: Path) -> None:
    args = root / "run" / "checkpoint-4" / "args.json"
    args.write_text(args.read_text().replace('"seed": 42', '"seed": 41'))  # the same size


def _remove_optimizer_state(root: Path) -> None:
    (root / "run" / "checkpoint-4" / "optimizer.pt").unlink()


# id: (what changes, [what the one line must say])
RESUME_CASES = {
    "resume_data_edited_in_place": (_edit_data, ["--resume_from_checkpoint", "--data_path", "data.json: its content "
                                                 "changed since the checkpoint was written (sha256:"]),
    "resume_weights_replaced_in_place": (_replace_weights, ["--resume_from_checkpoint", "--model_name_or_path",
                                                            "model: its weights changed since the checkpoint"]),
    "resume_checkpoint_args_edited": (_edit_checkpoint_args, ["--resume_from_checkpoint latest",
                                                              "checkpoint-4: args.json was edited after the checkpoint"]),
    "resume_checkpoint_lacks_a_file": (_remove_optimizer_state, ["--resume_from_checkpoint latest",
                                                                 "checkpoint-4: optimizer.pt is missing"]),
}


def _resume_case(name: str, case: Path) -> dict:
    RESUME_CASES[name][0](case)
    before = _snapshot(case / "run")
    argv = [sys.executable, "train_sft.py", "--model_name_or_path", str(case / "model"), "--data_path",
            str(case / "data.json"), "--output_dir", str(case / "run"), *RESUME, "--max_steps", "6",
            "--resume_from_checkpoint", "latest"]
    done = subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    return {"rc": done.returncode, "out": done.stdout, "err": done.stderr, "before": before,
            "after": _snapshot(case / "run"), "argv": argv}


@pytest.fixture(scope="module")
def resumed(tiny_dir, alpaca_40, tmp_path_factory):
    root = tmp_path_factory.mktemp("resumes")
    for name in RESUME_CASES:  # in this process, one after the other (a few seconds each)
        _finished_run(root / name, tiny_dir, alpaca_40)
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(_resume_case, name, root / name) for name in RESUME_CASES}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("name", list(RESUME_CASES))
def test_resume_refuses_changed_inputs_and_edited_checkpoints(resumed, name):
    r, needles = resumed[name], RESUME_CASES[name][1]
    context = f"{' '.join(map(str, r['argv']))}\nrc={r['rc']}\nstdout:\n{r['out'][-1500:]}\nstderr:\n{r['err'][-3000:]}"
    assert r["rc"] == 2 and "Traceback" not in r["err"] + r["out"], context
    assert len([line for line in r["err"].splitlines() if all(n in line for n in needles)]) == 1, context
    assert "before:" not in r["out"], context  # refused before the model was evaluated, i.e. before it loaded
    assert r["after"] == r["before"], "files changed in the run directory"


@pytest.fixture(scope="module")
def qsift_increment(tiny_dir, tmp_path_factory):
    """A QSIFT increment of the tiny model (random entries, non-zero deltas: no training needed) and
    another model of the same shapes."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_llama
    from sift.quantize import attach, layers, quantize, save_increment

    root = tmp_path_factory.mktemp("qsift")
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    params = dict(base.named_parameters())
    model = quantize(AutoModelForCausalLM.from_pretrained(tiny_dir))
    attach(model, 0.05, "random", seed=0)
    with torch.no_grad():
        for layer in layers(model).values():
            layer.delta.fill_(1e-3)
    path = root / "sift_increment.safetensors"
    save_increment(model, str(path), base_model=tiny_dir, base_values=lambda n, at: params[n].detach().view(-1)[at])
    other = tiny_llama(seed=3, vocab=base.config.vocab_size)
    other.save_pretrained(root / "other")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (root / "other" / name).write_bytes((Path(tiny_dir) / name).read_bytes())
    return path, root / "other"


@pytest.mark.parametrize("command", ["export", "mmlu"])
def test_qsift_increment_onto_another_base_is_refused_naming_both_fingerprints(qsift_increment, tmp_path, command):
    from safetensors import safe_open

    path, other = qsift_increment
    with safe_open(str(path), "pt") as f:
        recorded = f.metadata()["base_fingerprint"]
    argv = {"export": [sys.executable, "-m", "sift.export", "merged", "--increment", str(path), "--model", str(other),
                       "--output_dir", str(tmp_path / "merged")],
            "mmlu": [sys.executable, "eval/mmlu.py", "--model", str(other), "--increment", str(path), "--subjects",
                     "anatomy", "--limit", "1", "--ntrain", "0", "--output_dir", str(tmp_path / "mmlu")]}[command]
    done = subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    context = f"rc={done.returncode}\n{done.stderr[-3000:]}"
    assert done.returncode == 2 and "Traceback" not in done.stderr, context
    lines = [line for line in done.stderr.splitlines() if "is not the base the increment was trained from" in line]
    assert len(lines) == 1 and f"the file records {recorded}" in lines[0] and "--force" in lines[0], context
    assert len(re.findall(r"[0-9a-f]{32}", lines[0])) == 2, lines[0]
    assert not (tmp_path / "merged").exists() and not (tmp_path / "mmlu").exists()
    if command == "export":  # --force: applied anyway, with the warning
        forced = subprocess.run(argv + ["--force"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
        assert forced.returncode == 0 and "applying anyway" in forced.stderr, forced.stderr[-3000:]
        assert (tmp_path / "merged" / "config.json").exists()
