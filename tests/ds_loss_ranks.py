"""Run by tests/test_loss.py under `deepspeed --num_gpus 2` (gloo): the trainer's window through the
ZeRO-2 engine on each rank's half of the rows, gradients summed over ranks, against HF's loss of the
whole window in one process. Writes the largest differences to the path argument."""
import copy
import json
import os
import sys

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from conftest import tiny_llama  # noqa: E402
from test_loss import grads, padded_batch  # noqa: E402
from trainer import ds  # noqa: E402
from trainer.loss import label_tokens, train_window  # noqa: E402

deepspeed.init_distributed(dist_backend="gloo")
rank, world = dist.get_rank(), dist.get_world_size()
model = tiny_llama(dtype=torch.float64)
ref = copy.deepcopy(model)
window = [padded_batch(0, rows=4), padded_batch(1, rows=4, length=14)]
cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "train_batch_size": 4 * world,
       "gradient_clipping": 0.0, "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
       "steps_per_print": 10**9}
engine = ds.initialize(model, cfg)
loss, _ = train_window(model, [{k: v[rank::world] for k, v in b.items()} for b in window], "cpu", engine)
ours = grads(model)
for g in ours.values():
    dist.all_reduce(g)
if rank == 0:
    n = sum(label_tokens(b["labels"]) for b in window)
    ref_loss = 0.0
    for b in window:
        out = ref(**b, num_items_in_batch=n).loss
        out.backward()
        ref_loss += float(out)
    theirs = grads(ref)
    with open([a for a in sys.argv[1:] if not a.startswith("--local_rank")][0], "w") as f:
        json.dump({"loss": loss, "ref_loss": ref_loss, "names": sorted(ours) == sorted(theirs),
                   "max_rel": max(float((ours[k] - theirs[k]).abs().max() / theirs[k].abs().max()) for k in theirs)}, f)
dist.barrier()
