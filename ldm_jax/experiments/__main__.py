"""python -m ldm_jax.experiments run experiments/<name>.py --root runs/<name> [--jobs N] [--dry_run] [--set key=value ...]
python -m ldm_jax.experiments report runs/<name> [--out experiments/results]

`run` trains and evaluates every point of the sweep, one workdir per training run under --root,
skipping what is complete and resuming what was interrupted; `--dry_run` prints the exact
`python -m ldm_jax.train` / `python -m ldm_jax.evaluate` commands instead (for a cluster
scheduler or a TPU-pod launcher), one per line. `--set` overrides a config key for every point
(e.g. `--set train.steps=100000` to scale a CPU-sized sweep up); it is recorded, not named.

`report` writes the table (markdown, mean ± std over seeds), a CSV and a plot; see
`ldm_jax.experiments.report`. Bad input (an unknown key or metric, a workdir trained with other
overrides) fails with one `error:` line and exit status 1, before anything runs.
"""
from __future__ import annotations

import argparse
import ast
import sys


def _parse_set(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"--set takes key=value, got {text!r}")
    try:
        return key.strip(), ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        return key.strip(), value.strip()


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"--jobs takes a positive integer, got {text!r}")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldm_jax.experiments", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="train and evaluate every point of an experiment")
    p_run.add_argument("experiment", help="an experiments/<name>.py file")
    p_run.add_argument("--root", required=True, help="the folder of the experiment's workdirs (e.g. runs/<name>)")
    p_run.add_argument("--jobs", type=_positive_int, default=1, help="training runs at a time (default 1)")
    p_run.add_argument("--dry_run", action="store_true", help="print the commands instead of running them")
    p_run.add_argument("--set", type=_parse_set, action="append", default=[], metavar="KEY=VALUE",
                       help="a config override for every point (repeatable)")
    p_report = sub.add_parser("report", help="collect an experiment's results into a table, CSV and plot")
    p_report.add_argument("root", help="the experiment's --root")
    p_report.add_argument("--out", default=None, help="write <name>.md/.csv/.png here (default: report.* in the root)")
    args = parser.parse_args(argv)

    from ldm_jax.experiments import load_experiment, report, runner

    try:
        if args.command == "report":
            paths = report.report(args.root, args.out)
            for kind, path in paths.items():
                print(f"wrote {path}")
            return 0
        experiment = load_experiment(args.experiment)
        sets = dict(args.set)
        jobs = runner.plan(experiment, args.root, sets)
        if args.dry_run:
            print("\n".join(runner.dry_run(jobs)))
            return 0
        runner.write_experiment_record(experiment, args.root, sets)
        outcome = runner.run(jobs, args.jobs)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    if outcome["failed"]:
        print(f"error: {len(outcome['failed'])} runs failed: {', '.join(outcome['failed'])}", file=sys.stderr)
        return 1
    print(f"all {len(jobs)} runs complete; report: python -m ldm_jax.experiments report {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
