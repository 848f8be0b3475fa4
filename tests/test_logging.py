"""What a run reports: held-out rows during training, TensorBoard events read back with
tensorboard's own reader, W&B offline, the loss plot, "before" across resumes, LoRA's adapter."""
import json
import os

import pytest

import train_sft
from conftest import train_args


def rows(out):
    with open(os.path.join(out, "train_log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_eval_rows_tensorboard_events_plot_and_before_across_a_resume(tiny_dir, alpaca_40, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    extra = ("--eval_steps", "2", "--report_to", "tensorboard", "--run_name", "tb-check", "--generate_tokens", "0")
    before, after = train_sft.main(train_args(tiny_dir, alpaca_40, out, *extra, "--save_steps", "2"))
    log = rows(out)
    evals = [(r["step"], r["eval_loss"]) for r in log if "eval_loss" in r]
    assert [s for s, _ in evals] == [0, 2, 4]
    assert evals[0][1] == before["heldout_loss"] and evals[-1][1] == after["heldout_loss"]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]

    runs = out / "runs" / "tb-check"
    acc = EventAccumulator(str(runs))
    acc.Reload()
    assert [(e.step, pytest.approx(e.value)) for e in acc.Scalars("eval/loss")] == evals
    assert [(e.step, pytest.approx(e.value)) for e in acc.Scalars("train/loss")] == \
        [(r["step"], r["loss"]) for r in log if "loss" in r]
    assert {"train/lr", "train/grad_norm", "train/label_tokens_per_s"} <= set(acc.Tags()["scalars"])

    with open(out / "loss.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    resumed = tmp_path / "resumed"
    again = train_sft.main(train_args(tiny_dir, alpaca_40, resumed, *extra,
                                      "--resume_from_checkpoint", str(out / "checkpoint-2")))
    assert again[0] == before  # the base model's figures, not the checkpoint's
    assert json.loads((resumed / "results.json").read_text())["before"] == before
    assert [r for r in rows(resumed) if "eval_loss" in r][-1]["eval_loss"] == pytest.approx(after["heldout_loss"])


def test_wandb_offline_run_is_finished(tiny_dir, alpaca_40, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    finished = []
    real_finish = wandb.sdk.wandb_run.Run.finish

    def finish(self, *a, **k):
        finished.append(self.name)
        return real_finish(self, *a, **k)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "finish", finish)
    out = tmp_path / "run"
    train_sft.main(train_args(tiny_dir, alpaca_40, out, "--report_to", "wandb", "--run_name", "wb-check",
                              "--eval_steps", "2", "--generate_tokens", "0", "--max_steps", "2"))
    assert finished == ["wb-check"]
    assert wandb.run is None
    offline = list((out / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))


def test_eval_data_path_and_lora_adapter(tiny_dir, alpaca_40, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    held = tmp_path / "held.json"
    data = json.loads(open(alpaca_40).read())
    held.write_text(json.dumps(data[:5]))
    out = tmp_path / "lora"
    train_sft.main(train_args(tiny_dir, alpaca_40, out, "--finetuning_type", "lora", "--optim", "adamw",
                              "--eval_data_path", str(held), "--eval_samples", "0", "--generate_tokens", "0",
                              "--max_steps", "2"))
    report = json.loads((out / "args.json").read_text())["data_report"]
    assert report["heldout_samples"] == 5 and report["train_samples"] == 40  # nothing split off the data
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    adapted = PeftModel.from_pretrained(base, out / "adapter").merge_and_unload()
    for (name, a), b in zip(adapted.state_dict().items(), merged.state_dict().values()):
        assert (a - b).abs().max() < 1e-6, name


def test_loss_figure_has_both_curves_a_legend_and_integer_step_ticks():
    from trainer.report import loss_figure

    rows = [{"step": 0, "eval_loss": 2.0}] + [{"step": s, "loss": 2.0 - 0.1 * s, "lr": 1e-4} for s in (1, 2, 3)] + \
        [{"step": 3, "eval_loss": 1.8}]
    fig = loss_figure(rows, "t")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train loss", "held-out loss", "learning rate"]
    assert [list(line.get_xdata()) for line in ax.get_lines()] == [[1, 2, 3], [0, 3]]
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
