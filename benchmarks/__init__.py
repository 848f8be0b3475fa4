"""Memory, speed, quality and gradient-sparsity benchmarks of SIFT against its baselines.

Entry points: `python -m benchmarks.run [EXPERIMENT ...]` (the driver: experiments/ -> results/,
plots/, README tables) and `python -m benchmarks.memory_plan ...` (the memory planner). How to read
the results: benchmarks/README.md.
"""
