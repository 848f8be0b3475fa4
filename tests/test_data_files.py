"""Several training files in one run (each read in its own format and summarised, joined before the
shuffle, a conversation repeated from an earlier file dropped, each compared on resume), --train_on_prompt
against the assistant-only label masks, and the data summary that replaces per-record lines unless
--verbose."""
import json
import logging

import pytest
import torch

from common.modeling import load_tokenizer
from data_prep import IGNORE_INDEX, load_dataset_for_training
from trainer.args import DataArguments
from trainer.data import build_datasets
from trainer.rundir import resume_differences


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return load_tokenizer(tiny_dir)


@pytest.fixture(scope="module")
def three_files(alpaca_40, tmp_path_factory):
    """Alpaca rows 0-19 (JSON), Alpaca rows 15-29 as JSON Lines (15-19 repeat the first file), and two
    ShareGPT conversations."""
    root = tmp_path_factory.mktemp("several")
    rows = json.loads(open(alpaca_40).read())
    first, second, third = root / "a.json", root / "b.jsonl", root / "c.json"
    first.write_text(json.dumps(rows[:20]))
    second.write_text("".join(json.dumps(r) + "\n" for r in rows[15:30]))
    third.write_text(json.dumps([{"id": f"c{i}", "conversations": [{"from": "human", "value": f"Count to {i}."},
                                                                   {"from": "gpt", "value": " ".join(map(str, range(1, i + 1)))}]}
                                 for i in (3, 5)]))
    return [str(first), str(second), str(third)]


def data(path, **kw):
    return DataArguments(data_path=path, model_max_length=96, eval_samples=4, **kw)


def test_several_files_are_each_read_summarised_and_joined_before_the_shuffle(three_files, tokenizer, capsys):
    train, held, report = build_datasets(data(",".join(three_files)), tokenizer, seed=7)
    alone = [load_dataset_for_training(p, tokenizer, max_length=96) for p in three_files]
    assert [r.kept for _, r in alone] == [20, 15, 2]
    joined = alone[0][0] + alone[1][0][5:] + alone[2][0]  # b.jsonl's first 5 are a.json's last 5
    order = torch.randperm(len(joined), generator=torch.Generator().manual_seed(7)).tolist()
    assert [s["input_ids"] for s in held] == [joined[i]["input_ids"] for i in order[:4]]
    assert [s["input_ids"] for s in train] == [joined[i]["input_ids"] for i in order[4:]]
    files = report["files"]
    assert list(files) == three_files and (report["train_samples"], report["heldout_samples"]) == (28, 4)
    assert [(f["read"], f["kept"], f["dropped"]) for f in files.values()] == [
        (20, 20, {}), (15, 10, {"duplicate_content": 5}), (2, 2, {})]
    out = capsys.readouterr().out
    for path, line in zip(three_files, ("read 20, kept 20, dropped 0", "read 15, kept 10, dropped 5",
                                        "read 2, kept 2, dropped 0")):
        assert f"data {path}: {line}" in out
    assert "  dropped      5  duplicate_content" in out and "train 28, held-out 4" in out


def test_resume_compares_each_data_file(three_files):
    def record(paths):
        return {"data": {"data_path": ",".join(paths)}}

    moved = ["/elsewhere/checkout/data_prep/samples/alpaca_en_demo.json", three_files[1]]
    here = ["/work/sift/data_prep/samples/alpaca_en_demo.json", three_files[1]]
    assert resume_differences(record(moved), record(here)) == []  # the bundled sample, in any checkout
    assert resume_differences(record(here), record([here[0], three_files[2]])) == [
        f"--data_path (bundled) /data_prep/samples/alpaca_en_demo.json,{three_files[1]} -> "
        f"(bundled) /data_prep/samples/alpaca_en_demo.json,{three_files[2]}"]


def test_train_on_prompt_labels_every_training_token_and_leaves_the_held_out_masks(alpaca_40, tokenizer):
    plain_train, plain_held, _ = build_datasets(data(alpaca_40), tokenizer, seed=3, verbose=False)
    train, held, report = build_datasets(data(alpaca_40, train_on_prompt=True), tokenizer, seed=3, verbose=False)
    assert [s["input_ids"] for s in train] == [s["input_ids"] for s in plain_train]
    for sample, plain in zip(train, plain_train):
        assert sample["labels"] == sample["input_ids"]  # the prompt's tokens too
        assert all(p in (IGNORE_INDEX, label) for p, label in zip(plain["labels"], sample["labels"]))
        assert IGNORE_INDEX in plain["labels"]  # there was a prompt to add
    assert held == plain_held  # the held-out loss stays on the assistant's tokens, prompt_ids as before
    assert report["train_samples"] == len(plain_train)
    rows, _, _ = build_datasets(data(alpaca_40, train_on_prompt=True, packing=True), tokenizer, seed=3, verbose=False)
    for row in rows:  # packed: each sample's first label is dropped, so none is learnt across a boundary
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert len(starts) == row["n_samples"]
        assert [i for i, x in enumerate(row["labels"]) if x == IGNORE_INDEX] == starts
        assert all(row["labels"][i] == row["input_ids"][i] for i in range(len(row["labels"])) if i not in starts)


def test_skipped_records_are_counted_per_file_and_listed_only_with_verbose(alpaca_40, tmp_path, tokenizer, capsys,
                                                                           caplog):
    rows = json.loads(open(alpaca_40).read())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(rows[:12] + rows[:3] + [{"instruction": "no output"}, {"output": 5}]))
    caplog.set_level(logging.WARNING, logger="data_prep.report")
    build_datasets(data(str(bad)), tokenizer, seed=0)
    out = capsys.readouterr().out
    assert not [r for r in caplog.records if r.getMessage().startswith("skipped ")]
    assert f"data {bad}: read 17, kept 12, dropped 5" in out and "  dropped      3  duplicate_content" in out
    assert "e.g." not in out and "(--verbose lists every skipped record)" in out
    build_datasets(data(str(bad)), tokenizer, seed=0, records=True)
    listed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped ")]
    assert len(listed) == 5 and all(str(bad) in line for line in listed)
    assert "(--verbose" not in capsys.readouterr().out


def test_verbose_lists_every_skipped_record_of_the_run(tiny_dir, alpaca_40, tmp_path, caplog):
    """--verbose reaches the data loading of train_sft.py's recipe."""
    from conftest import train_args
    from trainer import args as targs
    from trainer import validate
    from trainer.recipe import Recipe

    rows = json.loads(open(alpaca_40).read())
    repeats = tmp_path / "repeats.json"
    repeats.write_text(json.dumps(rows[:10] + rows[:3]))
    caplog.set_level(logging.WARNING, logger="data_prep.report")
    for verbose, listed in (([], 0), (["--verbose"], 3)):
        args = targs.parse(train_args(tiny_dir, repeats, tmp_path / "run", *verbose))
        caplog.clear()
        recipe = Recipe(args, validate.resolve(args))
        recipe.setup_data()
        assert recipe.data_report["dropped"] == {"duplicate_content": 3}
        assert len([r for r in caplog.records if r.getMessage().startswith("skipped ")]) == listed
