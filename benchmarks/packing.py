"""--packing on the default run: the embedded SmolLM2-135M on the bundled Alpaca, with and without
packing, in one process one after the other (same machine state, same held-out samples).

    python -m benchmarks.packing [--max_steps N] [--json benchmarks/results/packing.json]

Reports per run: trained label tokens per second (label tokens of all logged windows / their
seconds, evaluation and saving left out; also per CPU second of the process, steadier than wall
time when other jobs share the cores), the padding share of the batches, the held-out loss
before and after, and the wall time of `train_sft.main`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as train_sft.py, before torch loads


def run_one(output_dir: str, packing: bool, extra: list[str]) -> dict:
    import train_sft
    from trainer.rundir import read_log

    argv = ["--output_dir", output_dir, "--overwrite_output_dir", "--generate_tokens", "0", *extra]
    if packing:
        argv.append("--packing")
    t0 = time.perf_counter()
    before, after = train_sft.main(argv)
    wall = time.perf_counter() - t0
    rows = [r for r in read_log(output_dir) if "loss" in r]
    labels, seconds = sum(r["label_tokens"] for r in rows), sum(r["seconds"] for r in rows)
    cpu = sum(r["cpu_seconds"] for r in rows)
    grid_share = sum(r["padding_share"] * r["seconds"] for r in rows) / seconds  # time-weighted
    return {"packing": packing, "steps": rows[-1]["step"], "label_tokens": labels, "train_seconds": seconds,
            "label_tokens_per_s": labels / seconds, "label_tokens_per_cpu_s": labels / cpu, "cpu_seconds": cpu,
            "padding_share": grid_share,
            "padding_share_per_window": [r["padding_share"] for r in rows],
            "heldout_loss_before": before["heldout_loss"], "heldout_loss_after": after["heldout_loss"],
            "wall_s": wall}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.packing", description=__doc__.split("\n\n")[0])
    ap.add_argument("--max_steps", type=int, default=None, help="shorten the runs (default: the demo's 20 steps)")
    ap.add_argument("--json", default=None, help="write the two rows here")
    ap.add_argument("--packed_first", action="store_true",
                    help="run the packed one first (a second run in the other order shows how much the "
                         "machine's load moved between the two)")
    args = ap.parse_args(argv)
    extra = ["--max_steps", str(args.max_steps)] if args.max_steps else []
    rows = []
    with tempfile.TemporaryDirectory(prefix="packing-bench-") as tmp:
        for packing in ((True, False) if args.packed_first else (False, True)):
            rows.append(run_one(os.path.join(tmp, "packed" if packing else "padded"), packing, extra))
    plain, packed = sorted(rows, key=lambda r: r["packing"])
    speedup = packed["label_tokens_per_s"] / plain["label_tokens_per_s"]
    cpu_speedup = packed["label_tokens_per_cpu_s"] / plain["label_tokens_per_cpu_s"]
    print("\n| run | steps | label tokens | label tokens / s | per CPU s | padding share | held-out loss before -> after "
          "| wall |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {'--packing' if r['packing'] else 'padded'} | {r['steps']} | {r['label_tokens']:,} | "
              f"{r['label_tokens_per_s']:.1f} | {r['label_tokens_per_cpu_s']:.1f} | {r['padding_share']:.1%} | "
              f"{r['heldout_loss_before']:.4f} -> {r['heldout_loss_after']:.4f} | {r['wall_s']:.0f} s |")
    print(f"\npacking: {speedup:.2f} x the trained label tokens per second ({cpu_speedup:.2f} x per CPU second)")
    if args.json:
        from common.atomic import atomic_write

        atomic_write(args.json, [json.dumps({"rows": rows, "label_tokens_per_s_ratio": speedup,
                                             "label_tokens_per_cpu_s_ratio": cpu_speedup}, indent=1)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
