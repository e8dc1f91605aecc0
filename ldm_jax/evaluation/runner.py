"""`python -m ldm_jax.evaluate`'s library: the metrics of a training run's checkpoint.

    results = evaluate("runs/base", ["bpd", "prompt_accuracy"], EvalOptions(num_samples=256))
    table = steps_sweep("runs/base", "prompt_accuracy", ["ddim", "dpm_solver++"], [5, 10, 20])

Each metric writes `eval/<step>/<metric>.json` in the workdir (its numbers, the settings that
produced them and its wall time), the scalars go to the run's TensorBoard events and
`metrics.jsonl` under `eval/<metric>/...`, and `eval/<step>/summary.md` is rewritten from every
metric file of that step. Availability is checked for every requested metric before anything is
computed, so a bad request fails at once, with the reason.

Metrics (see each function's docstring): bpd, prompt_accuracy (shapes), digit_accuracy and
digits_fid (digits), shapes_fid (shapes), diversity (shapes and digits: the spread of samples of
one caption, against the data's), fid (Inception-v3 weights from a local file), clip_score (a
local CLIP checkpoint), recon (the autoencoder).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Sequence

import jax

from ldm_jax.diffusion import samplers
from ldm_jax.evaluation.evaluators import EVALUATORS
from ldm_jax.evaluation.evaluators.bpd import compute_bpd  # noqa: F401 (the metrics' functions, by name)
from ldm_jax.evaluation.evaluators.clip_score import compute_clip_score  # noqa: F401
from ldm_jax.evaluation.evaluators.digit_accuracy import compute_digit_accuracy  # noqa: F401
from ldm_jax.evaluation.evaluators.digits_fid import compute_digits_fid  # noqa: F401
from ldm_jax.evaluation.evaluators.diversity import compute_diversity, repeated_conditions  # noqa: F401
from ldm_jax.evaluation.evaluators.fid import compute_fid  # noqa: F401
from ldm_jax.evaluation.evaluators.prompt_accuracy import compute_prompt_accuracy  # noqa: F401
from ldm_jax.evaluation.evaluators.recon import compute_recon  # noqa: F401
from ldm_jax.evaluation.evaluators.shapes_fid import compute_shapes_fid  # noqa: F401
from ldm_jax.evaluation.run import (EvalOptions, MetricUnavailable, Run, check_options,  # noqa: F401
                                    conditions_of as _conditions_of, jsonable as _jsonable,
                                    sampling_conditions as _sampling_conditions)

METRICS = EVALUATORS
HEADLINE = {name: e.headline for name, e in EVALUATORS.items() if e.headline}
_SERIES = ("terms_mean", "per_example_total")  # kept in the JSON, not logged as scalars


def conditional_model(pipe, context):
    """model_fn(x_t, t) of a pipeline's model for a fixed context [B, L, D] (no guidance)."""
    return pipe.model.model_fn(pipe.params, context)


def check_metrics(run: Run, metrics: Sequence[str]) -> None:
    """Every requested metric is known and available for this run, or one error listing why not."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; allowed: {', '.join(METRICS)}")
    if not metrics:
        raise ValueError(f"no metrics requested; allowed: {', '.join(METRICS)}")
    reasons = [f"{m}: {r}" for m in metrics if (r := METRICS[m].unavailable(run))]
    if reasons:
        raise MetricUnavailable("cannot evaluate " + "; ".join(reasons))


# ----------------------------------------------------------------------------------- driver


def eval_dir(run: Run) -> str:
    path = os.path.join(run.workdir, "eval", str(run.step))
    os.makedirs(path, exist_ok=True)
    return path


def _scalars(prefix: str, tree, out: dict) -> dict:
    """Flatten the numeric leaves of a result into {"eval/<metric>/<split>/<key>": value}."""
    for k, v in tree.items():
        name = f"{prefix}/{k}"
        if isinstance(v, dict):
            _scalars(name, v, out)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[name] = v
    return out


def evaluate(workdir: str, metrics: Sequence[str], options: EvalOptions | None = None) -> dict:
    """Compute `metrics` for the run in `workdir` (its latest ldm checkpoint unless options.step);
    writes eval/<step>/<metric>.json, the scalars and eval/<step>/summary.md. Returns
    {metric: result}."""
    options = options or EvalOptions()
    run = Run(workdir, options)
    metrics = list(dict.fromkeys(metrics))
    check_metrics(run, metrics)
    results = {}
    for name in metrics:
        metric = METRICS[name]
        t0 = time.perf_counter()
        result = metric.compute(run)
        record = {"metric": name, "step": run.step, "ema": options.ema, "splits": list(run.splits),
                  "wall_s": round(time.perf_counter() - t0, 2), "result": _jsonable(result)}
        if metric.samples:
            record["sampler"] = run.sampler_settings()
        if name in ("bpd", "ode_bpd"):  # held-out examples of the first split only
            record["splits"] = [result["split"]]
        _write_json(os.path.join(eval_dir(run), f"{name}.json"), record)
        _log_scalars(run, _scalars(f"eval/{name}", {k: v for k, v in record["result"].items()
                                                    if k not in _SERIES}, {}))
        results[name] = record
    write_summary(run)
    return results


def _write_json(path: str, record: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)  # never a half-written result


def _log_scalars(run: Run, scalars: dict) -> None:
    if not scalars or jax.process_index() != 0:
        return
    from ldm_jax.runs.writer import MetricWriter

    with MetricWriter(run.workdir) as writer:
        writer.write_scalars(run.step, scalars)


def headline(name: str, result: dict) -> str:
    """One line for the terminal: the metric's main numbers."""
    if name == "bpd":
        return (f"{result['total']:.4f} ± {result['total_ci95']:.4f} {result['unit']} on {result['split']} "
                f"(prior {result['prior']:.4f}, decoder {result['decoder']:.4f}, "
                f"diffusion {result['diffusion']:.4f}; {result['num_examples']} examples)")
    key = HEADLINE.get(name)
    parts = []
    for split, values in result.items():
        if isinstance(values, dict):
            shown = {k: v for k, v in values.items() if (k == key if key else isinstance(v, float))}
            parts.append(f"{split}: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
    return "; ".join(parts)


def write_summary(run: Run) -> str:
    """eval/<step>/summary.md: one table row per number of every metric file of that step."""
    folder = eval_dir(run)
    lines = [f"# Evaluation of {run.workdir} at step {run.step}", "",
             "| metric | value | settings | wall time |", "|---|---|---|---|"]
    for name in sorted(f"{m}.json" for m in METRICS):  # not the steps sweeps' tables
        if not os.path.exists(os.path.join(folder, name)):
            continue
        with open(os.path.join(folder, name)) as f:
            record = json.load(f)
        settings = ", ".join(f"{k} {v}" for k, v in record.get("sampler", {}).items())
        rows = _scalars(record["metric"], {k: v for k, v in record["result"].items() if k not in _SERIES}, {})
        for key, value in rows.items():
            lines.append(f"| {key} | {value:.4g} | {settings} | {record['wall_s']:.0f} s |")
    path = os.path.join(folder, "summary.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------------- quality vs steps


def steps_sweep(workdir: str, metric: str, sampler_names: Sequence[str], steps: Sequence[int],
                options: EvalOptions | None = None, plot: bool = True) -> dict:
    """A sampling metric for every sampler x step count (the quality-vs-steps curve of the sampler
    papers), on the first split. Writes eval/<step>/steps_<metric>.json, .md (a table: rows
    samplers, columns step counts) and .png (one curve per sampler). Returns the table as
    {sampler: {steps: value}}."""
    options = dataclasses.replace(options or EvalOptions())
    run = Run(workdir, options)
    if metric not in HEADLINE:
        raise ValueError(f"steps_sweep needs a sampling metric; allowed: {', '.join(HEADLINE)}")
    check_metrics(run, [metric])
    bad = [s for s in sampler_names if s not in samplers.SAMPLERS]
    if bad or not sampler_names:
        raise ValueError(f"unknown sampler(s) {bad}; allowed: {', '.join(samplers.SAMPLERS)}")
    if not steps or any(int(n) < 1 for n in steps):
        raise ValueError(f"step counts must be positive integers, got {list(steps)}")
    run.splits = run.splits[:1]
    table, timings = {}, {}
    for name in sampler_names:
        for n in steps:
            run.options.sampler, run.options.num_steps = name, int(n)
            t0 = time.perf_counter()
            result = METRICS[metric].compute(run)[run.splits[0]]
            timings[f"{name}/{n}"] = round(time.perf_counter() - t0, 2)
            table.setdefault(name, {})[int(n)] = float(result[HEADLINE[metric]])
    folder = eval_dir(run)
    stem = os.path.join(folder, f"steps_{metric}")
    _write_json(stem + ".json", {"metric": metric, "key": HEADLINE[metric], "split": run.splits[0], "step": run.step,
                                 "guidance": run.sampler_settings()["guidance"], "table": table, "wall_s": timings})
    cols = sorted({n for row in table.values() for n in row})
    md = [f"{metric} ({HEADLINE[metric]}) on {run.splits[0]} vs sampler steps, step {run.step}", "",
          "| sampler | " + " | ".join(str(n) for n in cols) + " |", "|---|" + "---|" * len(cols)]
    md += [f"| {name} | " + " | ".join(f"{row[n]:.4g}" if n in row else "" for n in cols) + " |"
           for name, row in table.items()]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    if plot:
        plot_curves(table, stem + ".png", xlabel="sampler steps", ylabel=f"{metric} ({HEADLINE[metric]})")
    return table


def plot_curves(table: dict, path: str, *, xlabel: str, ylabel: str) -> str:
    """{curve: {x: y}} -> a PNG with one line per curve (log x axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    for name, row in table.items():
        xs = sorted(row)
        ax.plot(xs, [row[x] for x in xs], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
