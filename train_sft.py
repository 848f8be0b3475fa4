"""Instruction-tune a LLaMA-family model with SIFT (or full / LoRA baselines) on one device.

    python train_sft.py                                   # embedded SmolLM2-135M on bundled Alpaca
    python train_sft.py --model_name_or_path meta-llama/Llama-2-7b-hf --data_path alpaca.json --bf16 ...
    deepspeed train_sft.py ... --deepspeed ds_configs/zero3_offload.json

setup (arguments, data, model, method) → train loop → save; the parts are trainer.recipe.Recipe's
methods. See docs/DESIGN.md for the output directory.
"""
from __future__ import annotations

import os
import sys

# bitsandbytes' CPU optimizer kernels each wait ~7.5 ms on spinning OpenMP threads otherwise
# (benchmarks/README.md); must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:  # the imports take seconds (torch, transformers): Ctrl-C here is one line, not a traceback
    from common.quiet import silence_unrelated_warnings

    silence_unrelated_warnings(sys.argv[1:])  # before bitsandbytes / DeepSpeed load and log

    from common import cli
    from trainer import args as targs
    from trainer import methods, validate
    from trainer.recipe import Recipe
except KeyboardInterrupt:
    print("train_sft.py: SIGINT while starting: nothing was done", file=sys.stderr)
    sys.exit(130)


def main(argv=None):
    """One run; returns (before, after): the held-out figures of the base and the trained model. A
    usage or input problem raises `common.cli.UsageError` (one message, exit status 2)."""
    args = targs.parse(argv, choices=methods.flag_choices())  # args.model, .method, .data, .train, .output
    plan = validate.resolve(args)  # every problem at once, before any weight is read

    recipe = Recipe(args, plan)
    with recipe.running():  # the output directory is this run's (a second one is refused); an early end says so
        # -------------------------------------------------------------- setup
        recipe.setup()  # ranks, data, model and method, schedule, output directory, resume, the "before" figures

        # -------------------------------------------------------------- train
        recipe.train()  # steps, log rows, held-out losses, checkpoints; a signal or divergence stops here

        # -------------------------------------------------------------- save
        recipe.save()  # the increment / adapter, merged/, results.json, loss.png; run.json "finished" last
    return recipe.before, recipe.after


if __name__ == "__main__":
    sys.exit(cli.run(main))
