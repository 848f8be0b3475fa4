"""Run by tests/test_sift_regrow.py under `deepspeed --num_gpus 2` (gloo, ZeRO-2): train_sft.py's recipe
with drop and regrow, then every rank writes the entries it trains and their values to
<output_dir>/rank<r>.pt, so the test sees that the ranks chose alike."""
import os
import sys

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from trainer import args as targs  # noqa: E402
from trainer import validate  # noqa: E402
from trainer.recipe import Recipe  # noqa: E402

args = targs.parse(sys.argv[1:])
recipe = Recipe(args, validate.resolve(args))
recipe.setup()
recipe.train()
recipe.save()
opt = recipe.method.opt
torch.save({"indices": opt.selected_indices(), "values": opt.trained_values(), "regrow_steps": opt.regrow.steps},
           os.path.join(args.output.output_dir, f"rank{recipe.rank}.pt"))
