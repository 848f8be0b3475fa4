"""Memory, speed, quality and gradient-sparsity benchmarks of SIFT against its baselines (issue 6).

Entry points: `python -m benchmarks.run [--quick]`, `python -m benchmarks.memory_plan ...`,
`python -m benchmarks.report`. Results and how to read them: benchmarks/README.md.
"""
