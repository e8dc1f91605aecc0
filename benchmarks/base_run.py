"""configs/base.py's training run, timed: the evidence for the time and accuracy its docstring quotes.

    python benchmarks/base_run.py [--workdir runs/base_run] [--out benchmarks/results/base_run.json]
                                  [--config configs/base.py] [--config.train.steps=1600 ...]

Runs the README's training command,

    python -m ldm_jax.train --config configs/base.py --workdir DIR [--config.x=y ...]

in a subprocess from the repository root, passes its output through (and into DIR/base_run.log),
and writes a JSON file with:

* `command` (how this file was made), `train_command` (the training command exactly as run), `git`
  (commit, and whether tracked files differed from it), `machine` (CPU model, cores, memory,
  platform, the date) with the package versions (jax, jaxlib, flax, optax, numpy, ...), and the
  run's resolved config (`settings.config`, the DIR/config.json the run wrote);
* `wall_s` (the whole command) and `peak_rss_mib` (the training process's peak resident memory);
* `stages`: `autoencoder_s` and `ldm_s` from the run's own summary (stage 1 includes building the
  dataset on first use and the reconstruction check; stage 2 the latent table, training, the
  sample grid and the prompt-accuracy evaluation), and, from when their log lines appeared:
  `dataset_build_s` (when the run built the dataset), `latent_table_s`, `ldm_training_s`,
  `samples_and_prompt_accuracy_s`; `startup_and_exit_s` is the rest of the wall time;
* `images_per_s`: each stage's median training throughput over its logging windows
  (DIR/metrics.jsonl; the first window, which holds the compilation, left out when there are more);
* `autoencoder_recon`: the share of reconstructions that keep the captioned shape (shapes checker);
* `prompt_accuracy`: DIR/eval/prompt_accuracy_<train.steps>.json (the EMA model, per eval split:
  overall, colour, shape and position), each `ok` with `ok_interval95`, its 95% (Wilson) interval
  over the split's `eval.num_samples` captions: the noise a comparison with another run faces.

DIR must be new or empty (default runs/base_run): a resumed run would time only what was left.
The time measured is the training command's, not the README line's `pip install` before it.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import pathlib
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402

DEFAULT_OUT = common.RESULTS_DIR / "base_run.json"

# Log lines of the training command that mark the end of a part of the run (ldm_jax/training/loop.py
# and tensorflow_datasets); each is matched anywhere in a line, after the logger's own prefix.
MARKERS = {
    "dataset_start": re.compile(r"Generating dataset"),
    "dataset_end": re.compile(r"downloaded and prepared to"),
    "latent_table": re.compile(r"encoded the \d+ training images' latents in ([0-9.]+) s"),
    "ldm_done": re.compile(r"\bldm: done at step\b"),
    "prompt_accuracy": re.compile(r"\bprompt accuracy: "),
    "summary": re.compile(r"\bfinished: (\{.*\})\s*$"),
}


def train_command(config: str, workdir: str, overrides: list[str]) -> list[str]:
    """The README's training command (with this interpreter) for `config`, `workdir` and overrides."""
    return [sys.executable, "-m", "ldm_jax.train", "--config", config, "--workdir", workdir, *overrides]


def run_logged(cmd: list[str], log_path: pathlib.Path) -> tuple[int, float, list[tuple[float, str]]]:
    """Run `cmd` from the repository root, echoing its output and writing it to `log_path`.
    Returns (exit code, wall seconds, [(seconds since start, line)])."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # lines arrive when they are written
    lines = []
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log, subprocess.Popen(
            cmd, cwd=common.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            bufsize=1) as proc:
        for line in proc.stdout:  # universal newlines: tqdm's \r updates arrive as lines too
            lines.append((time.perf_counter() - start, line.rstrip("\n")))
            sys.stdout.write(line)
            log.write(line)
        code = proc.wait()
    return code, time.perf_counter() - start, lines


def marker_times(lines: list[tuple[float, str]]) -> dict:
    """{marker: (seconds, match)} for the first line matching each of MARKERS (the last for the summary)."""
    found = {}
    for t, line in lines:
        for name, pattern in MARKERS.items():
            m = pattern.search(line)
            if m and (name not in found or name == "summary"):
                found[name] = (t, m)
    return found


def stage_times(found: dict, summary: dict, wall_s: float) -> dict:
    """The `stages` block of the results (see the module docstring); None where a part did not log."""
    def at(name):
        return found[name][0] if name in found else None

    def between(a, b):
        return at(b) - at(a) if at(a) is not None and at(b) is not None else None

    latent_table_s = float(found["latent_table"][1].group(1)) if "latent_table" in found else None
    ae_s, ldm_s = summary.get("autoencoder_s"), summary.get("ldm_s")
    return dict(
        autoencoder_s=ae_s,
        ldm_s=ldm_s,
        dataset_build_s=between("dataset_start", "dataset_end"),
        latent_table_s=latent_table_s,
        ldm_training_s=between("latent_table", "ldm_done"),
        samples_and_prompt_accuracy_s=between("ldm_done", "prompt_accuracy"),
        startup_and_exit_s=wall_s - ae_s - ldm_s if ae_s is not None and ldm_s is not None else None,
    )


def read_metrics(workdir: pathlib.Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def throughput(records: list[dict], stage: str) -> dict | None:
    """Median images/s of `stage` over its logging windows (the first left out when there are more)."""
    rates = [r[f"{stage}/images_per_s"] for r in records if f"{stage}/images_per_s" in r]
    if not rates:
        return None
    timed = rates[1:] if len(rates) > 1 else rates
    return dict(median=float(statistics.median(timed)), windows=len(timed))


def recon_accuracy(records: list[dict], num_samples: int) -> dict | None:
    """The autoencoder's reconstruction check ({colour_ok, shape_ok, position_ok, ok} over
    `num_samples` test captions), if logged."""
    prefix = "autoencoder/recon_"
    found = {k[len(prefix):]: v for r in records for k, v in r.items() if k.startswith(prefix)}
    return dict(found, num_captions=num_samples) if found else None


def wilson_interval(p: float, n: int, z: float = 1.96) -> list[float]:
    """The 95% Wilson score interval [low, high] of a proportion `p` observed over `n` trials
    (unlike p +- z sqrt(p (1 - p) / n), it does not shrink to a point at p = 0 or 1)."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def prompt_accuracy(workdir: pathlib.Path, steps: int, num_samples: int) -> dict | None:
    """eval/prompt_accuracy_<steps>.json, each split's `ok` with its 95% interval over the captions."""
    path = workdir / "eval" / f"prompt_accuracy_{steps}.json"
    if not path.exists():
        return None
    results = json.loads(path.read_text(encoding="utf-8"))
    for split in results.values():
        split.update(num_captions=num_samples, ok_interval95=wilson_interval(split["ok"], num_samples))
    return results


def collect(workdir: pathlib.Path, lines: list[tuple[float, str]], wall_s: float) -> dict:
    """Everything the results file says about the finished run in `workdir` (see the module docstring)."""
    found = marker_times(lines)
    summary = {}
    if "summary" in found:
        try:
            summary = ast.literal_eval(found["summary"][1].group(1))
        except (ValueError, SyntaxError):  # a value without a literal repr: the stage times stay None
            pass
    config = json.loads((workdir / "config.json").read_text(encoding="utf-8"))
    records = read_metrics(workdir)
    num_samples = int(config["eval"]["num_samples"])
    return dict(
        wall_s=wall_s,
        stages=stage_times(found, summary, wall_s),
        images_per_s={stage: throughput(records, stage) for stage in ("autoencoder", "ldm")},
        autoencoder_recon=recon_accuracy(records, num_samples),
        prompt_accuracy=prompt_accuracy(workdir, int(config["train"]["steps"]), num_samples),
        summary=summary,
        config=config,
    )


def repo_path(path) -> str:
    """`path` (relative to this process's directory) as the training command, run from the
    repository root, must name it: relative to the root when inside it, else absolute."""
    path = pathlib.Path(path).expanduser().resolve()
    try:
        return str(path.relative_to(common.REPO))
    except ValueError:
        return str(path)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--workdir", default="runs/base_run", help="the run's directory; must be new or empty")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="the results file to write")
    parser.add_argument("--config", default="configs/base.py", help="the config file (the README's: configs/base.py)")
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if not (a.startswith("--config.") and "=" in a)]
    if bad:
        parser.error(f"unrecognized arguments {bad}: overrides must be written --config.key=value")
    return parser, args, extra


def main(argv=None) -> dict:
    parser, args, overrides = parse_args(argv)
    workdir = pathlib.Path(args.workdir).expanduser()
    if workdir.exists() and any(workdir.iterdir()):
        parser.error(f"--workdir {args.workdir} is not empty: a timed run starts from scratch "
                     "(delete it, or choose another)")
    workdir.mkdir(parents=True, exist_ok=True)
    git = common.git_state()  # the commit the run starts from
    cmd = train_command(repo_path(args.config), repo_path(workdir), overrides)
    shown = shlex.join(["python", *cmd[1:]])
    print(f"base_run: {shown}", flush=True)
    code, wall_s, lines = run_logged(cmd, workdir / "base_run.log")
    peak_rss_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    if code != 0:
        print(f"base_run: the training command failed (exit {code}); nothing written. Log: {workdir / 'base_run.log'}",
              file=sys.stderr)
        sys.exit(code)
    result = collect(workdir.resolve(), lines, wall_s)
    config = result.pop("config")
    payload = {"benchmark": "base_run", "command": common.command_line(__file__, argv), "train_command": shown,
               "git": git, "machine": common.machine_info(),
               "settings": {"config_file": args.config, "overrides": overrides, "workdir": args.workdir,
                            "config": config},
               "peak_rss_mib": peak_rss_mib, **result}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    acc = payload["prompt_accuracy"] or {}
    print(f"\nbase_run: {wall_s:.0f} s wall, peak RSS {peak_rss_mib / 1024:.2f} GiB; prompt accuracy "
          + (", ".join(f"{split} {v['ok']:.1%} (95% interval {v['ok_interval95'][0]:.1%}-{v['ok_interval95'][1]:.1%})"
                       for split, v in acc.items()) or "not written")
          + f"\nwrote {out}")
    return payload


if __name__ == "__main__":
    main()
