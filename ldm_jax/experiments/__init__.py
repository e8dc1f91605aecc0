"""Ablation sweeps declared as data: `experiments/<name>.py` files and the helpers they use.

An experiment file states its question and expected cost in its docstring, names its base config
and returns its points from `sweep()`:

    '''Does the objective matter? ... Expected cost: ~50 minutes on a 2-core CPU.'''
    from ldm_jax.experiments import Sweep, product, zip_

    BASE = "configs/pixel_ddpm.py"

    def sweep():
        return Sweep(
            points=zip_({"diffusion.objective": ["simple", "vlb", "hybrid"],
                         "diffusion.variance": ["fixed_large", "learned_range", "learned_range"]}),
            metrics=["bpd"],
            common={"train.steps": 3000},          # every point; sized for the CPU, not in the names
        )

A point is a dict of overrides. Keys are config keys ("diffusion.objective"), given to
`python -m ldm_jax.train` as `--config.<key>=<value>`, or `evaluate.<flag>` keys
("evaluate.sampler", "evaluate.steps", "evaluate.guidance", ...), given to
`python -m ldm_jax.evaluate` as `--<flag>=<value>`. Points that differ only in `evaluate.*` keys
share one training run. A `seed` key makes repeats; the report averages over it.

`python -m ldm_jax.experiments run|report` (see `ldm_jax.experiments.__main__`) runs and reports
them; `ldm_jax.experiments.runner` and `.report` are the library behind it. Importing an
experiment file has no side effects.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import itertools
import os
from typing import Any, Sequence

from ldm_jax.runtime.files import no_bytecode

EVALUATE_PREFIX = "evaluate."
SEED_KEY = "seed"


def product(axes: dict[str, Sequence]) -> list[dict]:
    """Every combination of the axes' values, the last axis varying fastest:
    product({"a": [1, 2], "b": ["x", "y"]}) -> [{a:1,b:x}, {a:1,b:y}, {a:2,b:x}, {a:2,b:y}]."""
    keys = list(axes)
    for key in keys:
        _check_values(key, axes[key])
    return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]


def zip_(axes: dict[str, Sequence]) -> list[dict]:
    """The axes' values taken together, position by position (all axes the same length):
    zip_({"a": [1, 2], "b": ["x", "y"]}) -> [{a:1,b:x}, {a:2,b:y}]."""
    keys = list(axes)
    for key in keys:
        _check_values(key, axes[key])
    lengths = {key: len(axes[key]) for key in keys}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"zip_ needs axes of one length, got {lengths}")
    return [dict(zip(keys, values)) for values in zip(*(axes[k] for k in keys))]


def cross(points: Sequence[dict], other: Sequence[dict]) -> list[dict]:
    """Every point of `points` combined with every point of `other` (e.g. a zip_ times seeds)."""
    out = []
    for a in points:
        for b in other:
            clash = set(a) & set(b)
            if clash:
                raise ValueError(f"cross: both sides set {sorted(clash)}")
            out.append({**a, **b})
    return out


def _check_values(key: str, values) -> None:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"axis {key!r} needs a non-empty list of values, got {values!r}")


@dataclasses.dataclass
class Sweep:
    """What an experiment runs.

    points: the overrides of each point (see the module docstring).
    metrics: `python -m ldm_jax.evaluate` metrics computed for every point.
    common: overrides applied to every point (sizing for the machine at hand); not part of the
      points' names, recorded in each run's experiment/spec.json.
    evaluate: evaluate flags for every point (e.g. {"num_samples": 256}), under the points' own.
    share_autoencoder: train the autoencoder once (the base config + `common`, stages
      ("autoencoder",)) in <root>/_autoencoder and give it to every point
      (autoencoder.source=workdir:...), for sweeps over the diffusion stage only.
    columns: the report's table columns ("metric/key/..." paths into the metrics' results;
      default: each metric's headline numbers); x: the numeric axis to plot against (default:
      the one varying numeric key, if there is exactly one); xscale: "linear" or "log".
    """

    points: list[dict]
    metrics: list[str]
    common: dict[str, Any] = dataclasses.field(default_factory=dict)
    evaluate: dict[str, Any] = dataclasses.field(default_factory=dict)
    share_autoencoder: bool = False
    columns: list[str] | None = None
    x: str | None = None
    xscale: str = "linear"

    def __post_init__(self):
        if not self.points:
            raise ValueError("a sweep needs at least one point")
        if not self.metrics:
            raise ValueError("a sweep needs at least one metric")
        names = [point_name(p) for p in self.points]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"points repeat: {dupes}")
        for key in self.evaluate:
            if key.startswith(EVALUATE_PREFIX):
                raise ValueError(f"Sweep.evaluate takes flag names without the prefix: {key!r}")
        if self.xscale not in ("linear", "log"):
            raise ValueError(f"xscale must be 'linear' or 'log', got {self.xscale!r}")


def train_overrides(point: dict) -> dict:
    """The point's config keys (what its training run depends on)."""
    return {k: v for k, v in point.items() if not k.startswith(EVALUATE_PREFIX)}


def eval_overrides(point: dict) -> dict:
    """The point's evaluate flags, without the prefix."""
    return {k[len(EVALUATE_PREFIX):]: v for k, v in point.items() if k.startswith(EVALUATE_PREFIX)}


def format_value(value) -> str:
    """A value as the command lines take it: strings bare, the rest as Python literals."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):  # double quotes: shell-quoted commands stay readable
        items = [f'"{v}"' if isinstance(v, str) else format_value(v) for v in value]
        return "(" + ", ".join(items) + ("," if len(value) == 1 else "") + ")"
    return repr(value)


def _name_value(value) -> str:
    if isinstance(value, (list, tuple)):
        return "-".join(_name_value(v) for v in value)
    return format_value(value)


def name_of(overrides: dict, empty: str) -> str:
    """A stable, filesystem-safe name for a set of overrides: "key=value,key=value" in their
    order, each key by its last part where that is unambiguous ("schedule=cosine"); long names
    are shortened with a hash of the whole."""
    if not overrides:
        return empty
    last = [k.rsplit(".", 1)[-1] for k in overrides]
    keys = [short if last.count(short) == 1 else k for k, short in zip(overrides, last)]
    name = ",".join(f"{k}={_name_value(v)}" for k, v in zip(keys, overrides.values()))
    name = "".join(c if c.isalnum() or c in "=,.-+_" else "_" for c in name)
    if len(name) > 150:
        name = name[:130] + "~" + hashlib.sha1(name.encode()).hexdigest()[:10]
    return name


def point_name(point: dict) -> str:
    """The point's name: its training run's name, then its evaluate settings."""
    train, ev = train_overrides(point), {EVALUATE_PREFIX + k: v for k, v in eval_overrides(point).items()}
    return name_of({**train, **ev}, "base")


@dataclasses.dataclass
class Experiment:
    """A loaded experiment file."""

    name: str
    path: str
    question: str
    base: str
    sweep: Sweep
    findings: str | None = None


def load_experiment(path: str) -> Experiment:
    """Import `experiments/<name>.py` (no side effects) and call its sweep()."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"experiment file {path} does not exist")
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"ldm_jax_experiment_{name}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        with no_bytecode():  # nothing written beside the user's file
            spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - any mistake in the file is the user's to fix, named
        raise ValueError(f"experiment file {path} does not import ({type(e).__name__}: {e})") from None
    for attr in ("BASE", "sweep"):
        if not hasattr(module, attr):
            raise ValueError(f"experiment file {path} defines no {attr} (needs BASE = 'configs/...' and sweep())")
    if not module.__doc__:
        raise ValueError(f"experiment file {path} has no docstring (the question and the expected cost)")
    try:
        sweep = module.sweep()
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: sweep() failed ({type(e).__name__}: {e})") from None
    if not isinstance(sweep, Sweep):
        raise ValueError(f"{path}: sweep() must return ldm_jax.experiments.Sweep, got {type(sweep).__name__}")
    return Experiment(name=name, path=path, question=module.__doc__.strip(), base=resolve_base(module.BASE, path),
                      sweep=sweep, findings=getattr(module, "FINDINGS", None))


def resolve_base(base: str, experiment_path: str) -> str:
    """The base config's path: as given if it exists from the working directory, else relative to
    the repository the experiment file lives in (experiments/../)."""
    candidates = [os.path.abspath(os.path.expanduser(base)),
                  os.path.join(os.path.dirname(os.path.dirname(experiment_path)), base)]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return os.path.normpath(candidate)
    raise FileNotFoundError(f"base config {base!r} of {experiment_path} not found (looked at {candidates})")
