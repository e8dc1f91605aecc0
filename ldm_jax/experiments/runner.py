"""Running an experiment: one workdir per training run, train then evaluate each point.

    jobs = plan(load_experiment("experiments/objective.py"), "runs/objective")
    print("\\n".join(dry_run(jobs)))        # the exact commands, for a scheduler
    run(jobs, jobs_in_parallel=2)         # or run them here

Layout under the root:

    <root>/experiment.json                the experiment as run (file, base, sweep, command-line sets)
    <root>/_autoencoder/                  the shared stage-1 run (Sweep.share_autoencoder)
    <root>/<train name>/                  a `python -m ldm_jax.train` workdir, named from its overrides
    <root>/<train name>/experiment/spec.json      the base and overrides it was trained with
    <root>/<train name>/experiment/<eval name>.json  a point's metrics (eval name: its evaluate
                                          settings, "default" for none)
    <root>/<train name>/experiment/*.log  the commands' output

Training and evaluation run as subprocesses (the very commands `--dry_run` prints), so a point
is the same whether run here or by a cluster scheduler. A training run whose final checkpoint
exists is not run again, and a point whose result file is there is skipped; an interrupted
training run is resumed by running its command again (the training loop resumes from the latest
checkpoint). A workdir trained with other overrides than the plan's is an error, never
overwritten.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import threading
import time

from ldm_jax.experiments import (Experiment, EVALUATE_PREFIX, eval_overrides, format_value, name_of, point_name,
                                 train_overrides)
from ldm_jax.ldm import sources

AUTOENCODER_RUN = "_autoencoder"
# python -m ldm_jax.evaluate's flags a sweep may set (tests/test_experiments.py checks the list
# against ldm_jax/evaluate.py).
EVALUATE_FLAGS = ("step", "ema", "sampler", "steps", "guidance", "spacing", "num_samples", "splits", "batch_size",
                  "seed", "bpd_examples", "bpd_batch_size", "ode_steps", "inception_weights", "clip_model",
                  "diversity_samples")
# The flags only sampling metrics read: a metric that draws no samples (bpd, ode_bpd, recon) gives
# the same result for two evaluations of a run that differ only in these, so it is computed once.
SAMPLER_FLAGS = ("sampler", "steps", "guidance", "spacing", "num_samples", "batch_size", "diversity_samples")


@dataclasses.dataclass
class Evaluation:
    """One point's evaluation of a training run."""

    point: dict
    name: str  # the result file's stem
    flags: dict


@dataclasses.dataclass
class Job:
    """One training run (workdir) and the evaluations of the points that share it."""

    name: str
    workdir: str
    base: str
    overrides: dict  # everything given to the training command: common, sets, the point's own
    final: dict  # stage -> the step its last checkpoint has when the run is complete
    metrics: list
    evaluations: list
    after: str | None = None  # a job that must finish first (the shared autoencoder)

    def train_command(self, python: str = "python") -> list[str]:
        return [python, "-m", "ldm_jax.train", "--config", _shown(self.base), "--workdir", _shown(self.workdir),
                *(f"--config.{k}={format_value(v)}" for k, v in self.overrides.items())]

    def eval_command(self, evaluation: Evaluation, python: str = "python", metrics: list | None = None) -> list[str]:
        flags = [f"--{k}={_flag_value(v)}" for k, v in evaluation.flags.items()]
        return [python, "-m", "ldm_jax.evaluate", "--workdir", _shown(self.workdir), "--metrics",
                ",".join(self.metrics if metrics is None else metrics), *flags]

    @property
    def experiment_dir(self) -> str:
        return os.path.join(self.workdir, "experiment")

    def result_path(self, evaluation: Evaluation) -> str:
        return os.path.join(self.experiment_dir, f"{evaluation.name}.json")


def _flag_value(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)  # absl list flags
    return format_value(value)


def _shown(path: str) -> str:
    """Paths under the working directory relative to it (commands that run from the checkout)."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def plan(experiment: Experiment, root: str, sets: dict | None = None) -> list[Job]:
    """The jobs of `experiment` under `root`, validated: every point's config loads and passes
    `validate` with its overrides, every metric and evaluate flag exists, and no existing workdir
    was trained with other overrides. `sets` (the CLI's --set) override every point, e.g. to scale
    a sweep up ({"train.steps": 100000}); they are not part of the names."""
    from ldm_jax.evaluation.runner import METRICS

    sweep, root = experiment.sweep, os.path.abspath(os.path.expanduser(root))
    _check_root(experiment, root)
    unknown = [m for m in sweep.metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"{experiment.path}: unknown metrics {unknown}; known: {', '.join(METRICS)}")
    shared = {**sweep.common, **(sets or {})}
    jobs: dict[str, Job] = {}
    ae_job = None
    if sweep.share_autoencoder:
        ae_overrides = {**shared, "stages": ("autoencoder",)}
        config = _config(experiment, ae_overrides, AUTOENCODER_RUN)
        if not sources.trains_autoencoder(config):
            raise ValueError(f"{experiment.path}: share_autoencoder needs a base that trains its autoencoder")
        ae_job = Job(AUTOENCODER_RUN, os.path.join(root, AUTOENCODER_RUN), experiment.base, ae_overrides,
                     {"autoencoder": config.autoencoder.steps}, [], [])
    for point in sweep.points:
        bad = [k for k in eval_overrides(point) if k not in EVALUATE_FLAGS]
        if bad:
            raise ValueError(f"point {point_name(point)}: unknown evaluate flags {bad}; allowed: "
                             f"{', '.join(EVALUATE_PREFIX + f for f in EVALUATE_FLAGS)}")
        train = train_overrides(point)
        name = name_of(train, "base")
        if name not in jobs:
            overrides = {**shared, **train}
            if ae_job is not None:
                overrides.update({"stages": ("ldm",), "autoencoder.source": f"workdir:{_shown(ae_job.workdir)}"})
            config = _config(experiment, overrides, name)
            final = {"ldm": config.train.steps} if "ldm" in config.stages else {"autoencoder": config.autoencoder.steps}
            jobs[name] = Job(name, os.path.join(root, name), experiment.base, overrides, final, list(sweep.metrics),
                             [], after=ae_job.name if ae_job else None)
        ev = eval_overrides(point)
        jobs[name].evaluations.append(Evaluation(point, name_of(ev, "default"), {**sweep.evaluate, **ev}))
    out = ([ae_job] if ae_job else []) + list(jobs.values())
    for job in out:
        _check_spec(job)
    return out


def _check_root(experiment: Experiment, root: str) -> None:
    """`root` is new, empty, or this experiment's own root: never a training run's workdir or
    another experiment's root, whose files a run would write among."""
    if not os.path.exists(root):
        return
    if not os.path.isdir(root):
        raise ValueError(f"--root {root} is a file, not a folder")
    if os.path.exists(os.path.join(root, "config.json")):
        raise ValueError(f"--root {root} is a training run's workdir (it has config.json); an experiment root "
                         "holds one workdir per point: give a new folder")
    record = os.path.join(root, "experiment.json")
    if os.path.exists(record):
        try:
            with open(record, encoding="utf-8") as f:
                name = json.load(f).get("name")
        except (OSError, ValueError, AttributeError) as e:
            raise ValueError(f"{record} cannot be read ({type(e).__name__}: {e}); "
                             f"is {root} an experiment root?") from None
        if name != experiment.name:
            raise ValueError(f"--root {root} holds experiment {name!r}, not {experiment.name!r}: give a new folder")


def _config(experiment: Experiment, overrides: dict, name: str):
    from ldm_jax import config as config_lib

    try:
        config = config_lib.load_config(experiment.base, [f"{k}={format_value(v)}" for k, v in overrides.items()])
        config_lib.validate(config)
    except ValueError as e:
        raise ValueError(f"{experiment.path}, point {name}: {e}") from None
    return config


def _spec(job: Job) -> dict:
    return {"base": job.base, "overrides": {k: format_value(v) for k, v in job.overrides.items()}}


def _check_spec(job: Job) -> None:
    path = os.path.join(job.experiment_dir, "spec.json")
    if not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            stored = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: {e}); "
                         f"move {job.workdir} away to retrain it") from None
    if stored != _spec(job):
        raise ValueError(f"{job.workdir} was trained with {stored}, not with this plan's {_spec(job)}; "
                         "use another --root, or move that workdir away to retrain it")


def dry_run(jobs: list[Job]) -> list[str]:
    """The commands `run` would execute, in order (training, then each point's evaluation)."""
    lines = []
    for job in jobs:
        lines.append(shlex.join(job.train_command()))
        lines.extend(shlex.join(job.eval_command(ev)) for ev in job.evaluations)
    return lines


def write_experiment_record(experiment: Experiment, root: str, sets: dict | None = None) -> str:
    """<root>/experiment.json: what the report needs to know about the sweep."""
    root = os.path.abspath(os.path.expanduser(root))
    os.makedirs(root, exist_ok=True)
    s = experiment.sweep
    record = {"name": experiment.name, "path": experiment.path, "question": experiment.question,
              "base": experiment.base, "metrics": s.metrics, "columns": s.columns, "x": s.x, "xscale": s.xscale,
              "common": _jsonable(s.common), "evaluate": _jsonable(s.evaluate), "sets": _jsonable(sets or {}),
              "points": [_jsonable(p) for p in s.points]}
    path = os.path.join(root, "experiment.json")
    _write_json(path, record)
    return path


def is_trained(job: Job) -> bool:
    """Whether the job's final checkpoint(s) exist."""
    from ldm_jax.runs.workdir import checkpoint_steps

    return all(step in checkpoint_steps(job.workdir, stage) for stage, step in job.final.items())


def is_evaluated(job: Job, evaluation: Evaluation) -> bool:
    path = job.result_path(evaluation)
    if not os.path.isfile(path):
        return False
    try:
        with open(path) as f:
            return json.load(f).get("step") == job.final.get("ldm")
    except (OSError, json.JSONDecodeError):
        return False


class _Console:
    """Progress lines from several job threads."""

    def __init__(self, stream=None):
        self.stream, self.lock = stream or sys.stdout, threading.Lock()

    def __call__(self, message: str) -> None:
        with self.lock:
            print(f"[{time.strftime('%H:%M:%S')}] {message}", file=self.stream, flush=True)


def _execute(command: list[str], log_path: str, say) -> None:
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        with open(log_path) as log:
            tail = "".join(log.readlines()[-15:])
        raise RuntimeError(f"exit status {proc.returncode} from {shlex.join(command)}\n(last lines of {log_path}):\n{tail}")
    say(f"  done in {time.perf_counter() - start:.0f} s: {os.path.basename(log_path)}")


def run_job(job: Job, say=None) -> list[str]:
    """Train (unless complete) and evaluate (each point not yet done). Returns the result files."""
    say = say or _Console()
    os.makedirs(job.experiment_dir, exist_ok=True)
    _write_json(os.path.join(job.experiment_dir, "spec.json"), _spec(job))
    if is_trained(job):
        say(f"{job.name}: trained, skipping training")
    else:
        say(f"{job.name}: training")
        _execute(job.train_command(sys.executable), os.path.join(job.experiment_dir, "train.log"), say)
        if not is_trained(job):
            raise RuntimeError(f"{job.name}: training exited without its final checkpoint {job.final} "
                               f"(see {os.path.join(job.experiment_dir, 'train.log')})")
    from ldm_jax.evaluation.evaluators import EVALUATORS

    sample_free = [m for m in job.metrics if not EVALUATORS[m].samples]
    computed = {}  # the flags a sample-free metric reads -> a result file of this job that has it
    written = []
    for ev in job.evaluations:
        key = _sample_free_key(ev)
        if is_evaluated(job, ev):
            say(f"{job.name} [{ev.name}]: evaluated, skipping")
            computed.setdefault(key, job.result_path(ev))
            continue
        reused = computed.get(key) if sample_free else None
        metrics = [m for m in job.metrics if not (reused and m in sample_free)]
        if metrics:
            say(f"{job.name} [{ev.name}]: evaluating {','.join(metrics)}"
                + (f" ({','.join(sample_free)} from {os.path.basename(reused)})" if reused else ""))
            _execute(job.eval_command(ev, sys.executable, metrics),
                     os.path.join(job.experiment_dir, f"evaluate-{ev.name}.log"), say)
        written.append(_collect(job, ev, metrics, reused))
        computed.setdefault(key, job.result_path(ev))
    return written


def _sample_free_key(evaluation: Evaluation) -> str:
    return json.dumps({k: v for k, v in _jsonable(evaluation.flags).items() if k not in SAMPLER_FLAGS},
                      sort_keys=True)


def _collect(job: Job, evaluation: Evaluation, computed: list, reused: str | None) -> str:
    """Bundle the metric files `evaluate` just wrote (`computed`) into the point's result file (the
    next point on the same workdir overwrites them), and the other metrics from the result file
    `reused`: an earlier point of this run whose sample-free metrics read the same flags."""
    step = job.final["ldm"]
    metrics, reused_from = {}, {}
    earlier = None
    if reused:
        with open(reused) as f:
            earlier = json.load(f)
    for metric in job.metrics:
        if metric in computed:
            with open(os.path.join(job.workdir, "eval", str(step), f"{metric}.json")) as f:
                metrics[metric] = json.load(f)
        else:
            metrics[metric] = earlier["metrics"][metric]
            reused_from[metric] = os.path.basename(reused)
    record = {"point": point_name(evaluation.point), "overrides": _jsonable(evaluation.point),
              "train": job.name, "evaluate": _jsonable(evaluation.flags), "step": step, "metrics": metrics}
    if reused_from:
        record["reused"] = reused_from  # metric -> the result file it was computed for
    path = job.result_path(evaluation)
    _write_json(path, record)
    return path


def run(jobs: list[Job], jobs_in_parallel: int = 1, say=None) -> dict:
    """Run every job, `jobs_in_parallel` at a time (a job waits for the one it comes `after`).
    Returns {"done": [...], "failed": {name: error}}; a failed job does not stop the others."""
    say = say or _Console()
    say(f"{len(jobs)} training runs, {sum(len(j.evaluations) for j in jobs)} points")
    done, failed = [], {}
    finished = {job.name: threading.Event() for job in jobs}

    def work(job: Job):
        try:
            if job.after:
                finished[job.after].wait()
                if job.after in failed:
                    raise RuntimeError(f"needs {job.after}, which failed")
            run_job(job, say)
            done.append(job.name)
        except Exception as e:  # noqa: BLE001  (reported, and the other jobs go on)
            failed[job.name] = str(e)
            say(f"{job.name}: FAILED: {e}")
        finally:
            finished[job.name].set()

    # Jobs that others wait for go first, so waiting never holds every worker.
    order = sorted(jobs, key=lambda j: j.after is not None)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs_in_parallel)) as pool:
        list(pool.map(work, order))
    return {"done": done, "failed": failed}


def _jsonable(tree):
    if isinstance(tree, dict):
        return {str(k): _jsonable(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_jsonable(v) for v in tree]
    return tree


def _write_json(path: str, record: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)
