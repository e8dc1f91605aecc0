"""Batches/s of the input pipeline on the shapes set (default: batch 256, 32x32), by worker count.

    python benchmarks/input_pipeline.py [--batch_size 256] [--workers 0,2,4] [--batches 40]

Prints a markdown table and writes benchmarks/results/input_pipeline.json (or `--out DIR`), with
the machine, package versions, git commit and command line (`common.write_results`). Compare the
img/s with the training step's img/s (benchmarks/train_step.py) to see whether input is the
bottleneck.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402
from ldm_jax.data import pipeline  # noqa: E402


def measure(config: pipeline.DataConfig, batches: int, warmup: int = 3) -> float:
    it = pipeline.make_batches(config, process_index=0, process_count=1)
    for _ in range(warmup):  # worker start-up and the first tokenizer build are not throughput
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches / (time.perf_counter() - start)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--workers", default="0,2,4", help="comma-separated worker counts")
    parser.add_argument("--batches", type=int, default=40, help="timed batches per worker count")
    parser.add_argument("--data_dir", default="~/.cache/ldm_jax/datasets")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    rows = []
    for workers in [int(w) for w in args.workers.split(",")]:
        config = pipeline.DataConfig(data_dir=args.data_dir, batch_size=args.batch_size, num_workers=workers)
        rate = measure(config, args.batches)
        rows.append({"workers": workers, "batch_size": args.batch_size, "batches_per_s": rate,
                     "images_per_s": rate * args.batch_size})
    settings = dict(batch_size=args.batch_size, batches=args.batches, data="shapes 32x32")
    path = common.write_results("input_pipeline", rows, settings, args.out,
                                command=common.command_line(__file__, argv))
    print(f"\nshapes 32x32, batch {args.batch_size}; {common.machine_line(common.machine_info())}\n")
    print("| workers | batches/s | images/s |\n|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['batches_per_s']:.2f} | {r['images_per_s']:.0f} |")
    print(f"\nwrote {path}")
    return {"path": str(path), "rows": rows}


if __name__ == "__main__":
    main()
