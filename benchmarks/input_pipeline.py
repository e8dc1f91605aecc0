"""Batches/s of the input pipeline on the shapes set (default: batch 256, 32x32), by worker count.

    python benchmarks/input_pipeline.py [--batch_size 256] [--workers 0,2,4] [--batches 40]

Prints a markdown table and writes benchmarks/results/input_pipeline.json. Compare the img/s with
the training step's img/s (benchmarks/train_step.py) to see whether input is the bottleneck.
"""
import argparse
import json
import os
import platform
import time

from ldm_jax.data import pipeline


def measure(config: pipeline.DataConfig, batches: int, warmup: int = 3) -> float:
    it = pipeline.make_batches(config, process_index=0, process_count=1)
    for _ in range(warmup):  # worker start-up and the first tokenizer build are not throughput
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--workers", default="0,2,4")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--data_dir", default="~/.cache/ldm_jax/datasets")
    args = parser.parse_args()
    rows = []
    for workers in [int(w) for w in args.workers.split(",")]:
        config = pipeline.DataConfig(data_dir=args.data_dir, batch_size=args.batch_size, num_workers=workers)
        rate = measure(config, args.batches)
        rows.append({"workers": workers, "batch_size": args.batch_size, "batches_per_s": rate, "images_per_s": rate * args.batch_size})
    print(f"\nshapes 32x32, batch {args.batch_size}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()})\n")
    print("| workers | batches/s | images/s |\n|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['batches_per_s']:.2f} | {r['images_per_s']:.0f} |")
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    with open(os.path.join(os.path.dirname(__file__), "results", "input_pipeline.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
