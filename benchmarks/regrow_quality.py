"""Does a mask that keeps learning pay? Static SIFT, SIFT with drop-and-regrow (sift.regrow), LoRA and
full fine-tuning at equal trainable counts, through the trainer users run (trainer.recipe).

    nice -n 10 python -m benchmarks.run regrow_quality/smollm2     # experiments/regrow_quality/smollm2.json

SmolLM2-135M-Instruct (the embedded model) on the bundled real Alpaca sample, split once with a fixed
seed into train / validation (the learning-rate sweep) / test (the held-out loss), plus a held-out set
of another distribution, the bundled ShareGPT sample (multi-turn identity chats: forgetting). Every run
is `trainer.recipe.Recipe` on `train_sft.py`'s flags, with one addition (`study_recipe`): wherever the
recipe measures the held-out loss (before, every `eval_every` steps, after) it measures the other set
too. Per method the learning rate is the one with the lowest validation loss after `sweep_steps` steps
(seed 0, the validation split as the held-out file), over a half-decade grid that grows past its end
while an end wins (choose_lr); then `steps` steps per seed on the test split.
Each run's result is kept in `workdir` as it finishes (a rerun skips finished runs, more methods or
seeds add runs, and an interrupted run resumes from its own checkpoint with the trainer's
--resume_from_checkpoint latest), so the study can span sessions.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import statistics
import time

import torch

from common.atomic import atomic_write
from data_prep import BUNDLED_ALPACA

SHAREGPT = os.path.join(os.path.dirname(str(BUNDLED_ALPACA)), "sharegpt_dummy_conversation.json")
# name -> train_sft.py flags of the method (the learning rate and the rate / rank come from the study)
METHODS = {
    "sift": ["--finetuning_type", "sift", "--optim", "adamw8bit"],
    "sift-regrow": ["--finetuning_type", "sift", "--optim", "adamw8bit", "--sift_regrow_steps", "20",
                    "--sift_regrow_fraction", "0.2", "--sift_regrow_window", "5"],
    "lora": ["--finetuning_type", "lora", "--optim", "adamw"],
    "full": ["--finetuning_type", "full", "--optim", "adamw"],
    "qsift": ["--finetuning_type", "sift", "--optim", "adamw8bit", "--quantization", "nf4"],
    "qsift-regrow": ["--finetuning_type", "sift", "--optim", "adamw8bit", "--quantization", "nf4",
                     "--sift_regrow_steps", "20", "--sift_regrow_fraction", "0.2", "--sift_regrow_window", "5"],
}
# The sweep's starting grid per method; choose_lr extends it past a winning end
SWEEP_EXTEND = 2
LR_GRID = {"sift": (3e-4, 1e-3, 3e-3), "lora": (3e-4, 1e-3, 3e-3), "full": (1e-5, 3e-5, 1e-4)}
# Methods that take another method's learning rate: regrow changes which entries SIFT trains, not how
# it steps them, so static and regrow SIFT share one rate and differ in the mask alone (QSIFT: SIFT's
# rate, as benchmarks/qsift_quality.py)
LR_FROM = {"sift-regrow": "sift", "qsift": "sift", "qsift-regrow": "sift"}


@dataclasses.dataclass
class StudyConfig:
    methods: tuple = ("sift", "sift-regrow", "lora", "full")
    seeds: tuple = (0, 1)
    steps: int = 150
    sweep_steps: int = 20
    batch: int = 4
    max_length: int = 128       # tokens per sample (longer ones cut: the bundled Alpaca's median is 160)
    lora_rank: int = 4          # the trainable budget: SIFT trains as many entries (sift_rate_for_rank)
    eval_every: int = 50
    n_test: int = 64
    n_val: int = 64
    n_other: int = 48
    lr_grid: dict = dataclasses.field(default_factory=lambda: dict(LR_GRID))


# -------------------------------------------------------------------- data
def split_data(workdir: str, cfg: StudyConfig) -> dict[str, str]:
    """train / val / test Alpaca files and the other-distribution file, split once with seed 0."""
    paths = {name: os.path.join(workdir, f"{name}.json") for name in ("train", "val", "test", "other")}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    with open(BUNDLED_ALPACA) as f:
        rows = json.load(f)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    a, b = cfg.n_test, cfg.n_test + cfg.n_val
    parts = {"test": order[:a], "val": order[a:b], "train": order[b:]}
    with open(SHAREGPT) as f:
        chats = json.load(f)
    other = torch.randperm(len(chats), generator=torch.Generator().manual_seed(0)).tolist()[:cfg.n_other]
    os.makedirs(workdir, exist_ok=True)
    for name, idx in parts.items():
        atomic_write(paths[name], [json.dumps([rows[i] for i in idx])])
    atomic_write(paths["other"], [json.dumps([chats[i] for i in other])])
    return paths


def sift_rate(rank: int) -> float:
    """The SIFT rate whose trainable count equals LoRA's at `rank` on the same targets (SmolLM2)."""
    from transformers import AutoConfig

    from common.modeling import resolve_model_path
    from trainer.validate import meta_model

    from .methods import sift_rate_for_rank

    return sift_rate_for_rank(meta_model(AutoConfig.from_pretrained(resolve_model_path(None))), rank)


# -------------------------------------------------------------------- one run, through the recipe
def study_recipe(args, plan, other_path: str, n_other: int):
    """trainer.recipe.Recipe that also measures the loss on `other_path` wherever it measures the held-out
    loss (n_other = 0: the recipe as it is)."""
    from trainer.data import build_datasets
    from trainer.loss import heldout_loss
    from trainer.recipe import Recipe

    if not n_other:
        return Recipe(args, plan)

    class StudyRecipe(Recipe):
        def setup_data(self):
            super().setup_data()
            data = dataclasses.replace(self.args.data, data_path=other_path, eval_data_path=other_path,
                                       eval_samples=n_other)
            self.other_set = build_datasets(data, self.tokenizer, 0, verbose=False)[1]

        def other(self) -> float:
            return heldout_loss(self.model, self.other_set, self.pad_id, self.args.train.per_device_eval_batch_size,
                                self.device)

        def measure(self):
            return {**super().measure(), "other_loss": self.other()}

        def evaluate(self, done):
            loss = super().evaluate(done)
            self.log.write({"step": done, "other_eval_loss": self.other()})
            self.meter.restart_clock()
            return loss

    return StudyRecipe(args, plan)


def run_flags(method: str, lr: float, seed: int, steps: int, heldout: str, paths: dict, out: str,
              cfg: StudyConfig, rate: float) -> list[str]:
    flags = ["--data_path", paths["train"], "--eval_data_path", heldout, "--eval_samples", str(cfg.n_test),
             "--output_dir", out, "--max_steps", str(steps), "--per_device_train_batch_size", str(cfg.batch),
             "--gradient_accumulation_steps", "1", "--model_max_length", str(cfg.max_length),
             "--eval_steps", str(cfg.eval_every), "--save_steps", str(cfg.eval_every), "--save_total_limit", "1",
             "--logging_steps", "5", "--generate_tokens", "0", "--seed", str(seed), "--learning_rate", str(lr),
             "--bf16", "false", *METHODS[method]]
    if method != "full":
        flags += ["--lora_rank", str(cfg.lora_rank), "--lora_alpha", str(2 * cfg.lora_rank)] if "lora" in method \
            else ["--sift_rate", f"{rate:.6f}"]
    return flags


def train(flags: list[str], paths: dict, n_other: int) -> dict:
    """One run (resumed from its own latest checkpoint if one is there); its curves and figures."""
    from trainer import args as targs
    from trainer import validate

    out = flags[flags.index("--output_dir") + 1]
    resumable = os.path.isdir(out) and any(d.startswith("checkpoint-") for d in os.listdir(out))
    flags = flags + (["--resume_from_checkpoint", "latest"] if resumable else ["--overwrite_output_dir"])
    args = targs.parse(flags)
    t0 = time.time()
    recipe = study_recipe(args, validate.resolve(args), paths["other"], n_other)
    recipe.setup()
    trained = recipe.method.trained_entries()  # before save: LoRA's merge folds its adapters away
    recipe.train()
    recipe.save()
    with open(os.path.join(out, "train_log.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    curve = {}
    for r in rows:
        for key, name in (("eval_loss", "heldout"), ("other_eval_loss", "other")):
            if key in r:
                curve.setdefault(r["step"], {})[name] = r[key]
    curve[0] = {"heldout": recipe.before["heldout_loss"], "other": recipe.before.get("other_loss")}
    curve[recipe.total_steps] = {"heldout": recipe.after["heldout_loss"], "other": recipe.after.get("other_loss")}
    result = {"before": recipe.before, "after": recipe.after, "seconds": time.time() - t0,
              "curve": [[s, c.get("heldout"), c.get("other")] for s, c in sorted(curve.items())],
              "train_loss": [[r["step"], r["loss"]] for r in rows if "loss" in r],
              "trained_entries": trained, "memory": recipe.method.memory_report()}
    recipe.method.close()
    for name in os.listdir(out):  # keep the logs and results; the models and checkpoints are GBs
        if name.startswith("checkpoint-") or name in ("merged", "adapter"):
            shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    return result


# -------------------------------------------------------------------- the study
class RunCache:
    """The finished runs, in one JSON file of the workdir, offered to a study whose fixed settings
    (everything but the methods, seeds and learning-rate grid) are the same."""

    def __init__(self, path: str, params: dict):
        self.path, self.params = path, params

    def load(self) -> dict | None:
        try:
            with open(self.path) as f:
                saved = json.load(f)
        except (OSError, json.JSONDecodeError):
            return None
        return saved["partial"] if saved.get("params") == self.params else None

    def save(self, partial: dict) -> None:
        atomic_write(self.path, [json.dumps({"params": self.params, "partial": partial}, indent=1)])


def study(cfg: StudyConfig, workdir: str, checkpoint, log=print) -> dict:
    """The sweep, then the runs; `checkpoint` keeps every finished run (a rerun skips it)."""
    paths = split_data(workdir, cfg)
    rate = sift_rate(cfg.lora_rank)
    partial = checkpoint.load() or {"sweep": {}, "runs": {}}
    log(f"[regrow_quality] SIFT rate {rate:.4%} = LoRA r={cfg.lora_rank}'s count; {len(cfg.methods)} methods, "
        f"seeds {list(cfg.seeds)}, {cfg.steps} steps (sweep {cfg.sweep_steps})")

    def once(kind: str, key: str, method: str, lr: float, seed: int, steps: int, heldout: str) -> dict:
        done = partial[kind]
        if key not in done or done[key]["lr"] != lr:  # a run kept at another learning rate is run again
            log(f"  {kind} {key} ...")
            flags = run_flags(method, lr, seed, steps, heldout, paths, os.path.join(workdir, kind, key), cfg, rate)
            n_other = cfg.n_other if kind == "runs" else 0  # the sweep scores the validation split alone
            done[key] = {"method": method, "lr": lr, "seed": seed, "steps": steps, **train(flags, paths, n_other)}
            checkpoint.save(partial)
            r = done[key]
            log(f"    {r['after']['heldout_loss']:.4f} held-out, {r['after'].get('other_loss', float('nan')):.4f} "
                f"other, {r['seconds'] / 60:.1f} min")
        return done[key]

    def lr_of(method: str) -> float:
        """The learning rate with the lowest validation loss after the sweep (or the one given)."""
        if method in LR_FROM:
            return lr_of(LR_FROM[method])
        return choose_lr(cfg.lr_grid[method], lambda lr: once("sweep", f"{method}-lr{lr:g}", method, lr, 0,
                                                                 cfg.sweep_steps, paths["val"])["after"]["heldout_loss"])

    lrs = {}
    for method in cfg.methods:  # method by method, in the order given: a partial study answers its first
        lrs[method] = lr_of(method)
        for seed in cfg.seeds:
            once("runs", f"{method}-seed{seed}", method, lrs[method], seed, cfg.steps, paths["test"])
    sweep = {k: r for k, r in partial["sweep"].items() if r["method"] in lrs}  # the work directory may hold more
    runs = {k: r for k, r in partial["runs"].items() if r["method"] in cfg.methods and r["seed"] in cfg.seeds}
    used = [*sweep.values(), *runs.values()]
    return {"config": dataclasses.asdict(cfg), "sift_rate": rate, "lrs": lrs, "sweep": sweep, "runs": runs,
            "summary": summarize(runs, cfg), "compute": {"runs": len(used), "seconds": sum(r["seconds"] for r in used)}}


def choose_lr(grid, score, extend: int = SWEEP_EXTEND) -> float:
    """The rate of `grid` with the lowest `score(lr)`; while the best is at an end of the grid, the grid
    grows by the next half-decade point past that end (1e-4, 3e-4, 1e-3, ...), at most `extend` times."""
    grid = sorted(grid)
    if len(grid) == 1:
        return grid[0]
    scored = {}
    for _ in range(extend + 1):
        scored.update({lr: score(lr) for lr in grid if lr not in scored})
        best = min(scored, key=scored.get)
        if grid[0] < best < grid[-1]:
            break
        half_decades = round(2 * math.log10(best)) + (1 if best == grid[-1] else -1)
        grid = sorted(grid + [float(f"{10 ** (half_decades / 2):.0e}")])
    return best


def static_of(method: str) -> str:
    """What a method is paired against: a regrow method against its static self, the rest against SIFT."""
    return method.removesuffix("-regrow") if method.endswith("-regrow") else "sift"


def summarize(runs: dict, cfg: StudyConfig) -> dict:
    """Per method: mean held-out / other loss after training over seeds, and paired differences (same
    seed: same data order) against its reference (static_of), with their spread (min, max over seeds)."""
    out = {}
    for method in cfg.methods:
        mine = {r["seed"]: r for r in runs.values() if r["method"] == method}
        if not mine:
            continue
        row = {"seeds": sorted(mine), "lr": next(iter(mine.values()))["lr"],
               "minutes": statistics.mean(r["seconds"] for r in mine.values()) / 60,
               "trained_entries": next(iter(mine.values()))["trained_entries"]}
        for key in ("heldout", "other"):
            after = [mine[s]["after"][f"{key}_loss"] for s in sorted(mine)]
            before = [mine[s]["before"][f"{key}_loss"] for s in sorted(mine)]
            row[f"{key}_before"] = statistics.mean(before)
            row[f"{key}_after"] = statistics.mean(after)
            row[f"{key}_after_spread"] = [min(after), max(after)]
            ref = {r["seed"]: r for r in runs.values() if r["method"] == static_of(method)}
            paired = [mine[s]["after"][f"{key}_loss"] - ref[s]["after"][f"{key}_loss"] for s in sorted(mine) if s in ref]
            if paired and method != "sift":
                row["vs"] = static_of(method)
                row[f"{key}_paired"] = statistics.mean(paired)
                row[f"{key}_paired_spread"] = [min(paired), max(paired)]
        out[method] = row
    return out


def run(setting: dict, workdir: str, log=print) -> dict:
    """The study of `setting` (StudyConfig's fields) in `workdir` (relative: to the repository)."""
    cfg = StudyConfig(**{**setting, "methods": tuple(setting["methods"]), "seeds": tuple(setting["seeds"])})
    unknown = sorted(set(cfg.methods) - set(METHODS))
    if unknown:
        from common.cli import UsageError

        raise UsageError(f"regrow_quality: methods {unknown}: choose among {', '.join(METHODS)}")
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), workdir)
    fixed = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("methods", "seeds", "lr_grid")}
    return study(cfg, root, RunCache(os.path.join(root, "partial.json"), fixed), log=log)
