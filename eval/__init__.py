"""Evaluation of base and SIFT-fine-tuned models: MMLU (eval/mmlu.py) and MT-bench (eval/mt_bench.py)."""
