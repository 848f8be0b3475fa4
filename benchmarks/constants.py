"""Units and names shared by every benchmark module."""
from __future__ import annotations

import torch

KIB, MIB, GIB = 2**10, 2**20, 2**30
# weight / activation dtypes by the names the planner's --dtype and the experiments use
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Song et al. 2024, LLaMA-7B, seq 2048, batch 1, gradient checkpointing (GB, as the paper prints them)
PAPER_7B = {"full": 76.12, "sift 5%": 16.50}
