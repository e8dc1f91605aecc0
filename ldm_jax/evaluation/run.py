"""A training run as the metrics see it: its config, checkpoint step, data and pipeline
(`Run`), the evaluation options, and the `Evaluator` interface every metric implements."""
from __future__ import annotations

import abc
import dataclasses
import numbers
import os
from typing import Callable, Sequence

import jax
import numpy as np

from ldm_jax.data import pipeline as data_pipeline
from ldm_jax.diffusion import samplers
from ldm_jax.runs.workdir import checkpoint_steps, load_workdir_config

Z_95 = 1.959964  # two-sided 95% normal quantile


class MetricUnavailable(ValueError):
    """A metric that cannot be computed for this run or without a missing input (says why)."""


@dataclasses.dataclass
class EvalOptions:
    """Settings shared by the metrics (`python -m ldm_jax.evaluate`'s flags).

    sampler / num_steps / guidance / spacing: the sampling metrics' sampler (default: the run's
    config; spacing: which timesteps it visits, see `samplers.timesteps`).
    num_samples: generated images per split for the sampling metrics (and real images for fid).
    splits: the dataset splits to evaluate on (default: the config's `eval.splits`).
    bpd_examples: held-out examples for bpd (each costs T model calls) and ode_bpd.
    ode_steps: ode_bpd's solver steps (Heun: two evaluations of the network and its linearisation
    each; fewer is cheaper and its discretisation error larger).
    diversity_samples: samples per caption for diversity (num_samples // diversity_samples captions).
    """

    step: int | None = None
    ema: bool = True
    sampler: str | None = None
    num_steps: int | None = None
    guidance: float | None = None
    spacing: str | None = None
    num_samples: int = 256
    splits: tuple | None = None
    batch_size: int = 64
    seed: int = 0
    bpd_examples: int = 64
    bpd_batch_size: int = 16
    ode_steps: int = 100
    inception_weights: str | None = None
    clip_model: str | None = None
    progress: bool = False
    diversity_samples: int = 4


def check_options(options: EvalOptions) -> None:
    """ValueError naming the first option out of range (before any model or data is loaded)."""
    o = options
    for name in ("num_samples", "batch_size", "bpd_examples", "bpd_batch_size", "ode_steps",
                 "diversity_samples"):
        value = getattr(o, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"--{name} must be a positive integer, got {value!r}")
    if o.num_steps is not None and (isinstance(o.num_steps, bool) or not isinstance(o.num_steps, numbers.Integral)
                                    or o.num_steps < 1):
        raise ValueError(f"--steps must be a positive integer, got {o.num_steps!r}")
    if o.sampler is not None and o.sampler not in samplers.SAMPLERS:
        raise ValueError(f"--sampler={o.sampler!r} is unknown; allowed: {', '.join(samplers.SAMPLERS)}")
    if o.guidance is not None and not o.guidance >= 0:  # also refuses NaN
        raise ValueError(f"--guidance must be >= 0, got {o.guidance}")
    if o.spacing is not None and o.spacing not in samplers.SPACINGS:
        raise ValueError(f"--spacing={o.spacing!r} is unknown; allowed: {', '.join(samplers.SPACINGS)}")
    if o.splits is not None and (not o.splits or not all(isinstance(s, str) and s for s in o.splits)):
        raise ValueError(f"--splits must name dataset splits (e.g. test,heldout), got {list(o.splits)}")


class RunData(abc.ABC):
    """What every evaluator reads of a run: its config, splits, options and data (`examples`);
    subclasses add `generate` (the pipeline's, or the training loop's own sampler)."""

    def __init__(self, config, options: EvalOptions, splits=None):
        self.config, self.options = config, options
        self.splits = tuple(splits or options.splits or config.eval.splits or ("test",))
        self._sources = {}

    @property
    def dataset(self) -> str:
        return self.config.data.name

    @property
    def conditioning(self) -> str:
        return self.config.conditioning.kind

    def source(self, split: str):
        if split not in self._sources:
            from ldm_jax.config import data_config

            self._sources[split] = data_pipeline.load_source(data_config(self.config, split=split))
        return self._sources[split]

    def examples(self, split: str, count: int) -> dict:
        """`count` examples of a split (all of it if smaller), drawn without replacement with a
        fixed seed (the same for every metric and the training loop's own evaluation):
        {"image": uint8 [N, S, S, 3], "caption": [N] (if any), "label": [N] (if the config has a
        label key)}."""
        source, d = self.source(split), self.config.data
        idx = np.random.default_rng(0).choice(len(source), size=min(count, len(source)), replace=False)
        records = [source[int(i)] for i in idx]
        out = {"image": np.stack([data_pipeline.resize_and_crop(np.asarray(r[d.image_key]), d.image_size)
                                  for r in records])}
        if d.caption_key:
            out["caption"] = [_text(r[d.caption_key]) for r in records]
        if d.label_key:
            out["label"] = np.asarray([int(r[d.label_key]) for r in records], np.int32)
        return out

    @abc.abstractmethod
    def generate(self, conditions: Sequence, *, seed_offset: int = 0, **settings) -> np.ndarray:
        """uint8 images [N, S, S, 3], one per condition (a caption, or a class label)."""


class Run(RunData):
    """A workdir's config, its checkpoint step and (built on first use) its pipeline."""

    def __init__(self, workdir: str, options: EvalOptions):
        check_options(options)
        self.workdir = os.path.abspath(os.path.expanduser(workdir))
        if not os.path.isdir(self.workdir):
            raise FileNotFoundError(f"workdir {self.workdir} does not exist")
        steps = checkpoint_steps(self.workdir, "ldm")
        if not steps:
            raise FileNotFoundError(f"workdir {self.workdir} has no diffusion (ldm) checkpoint to evaluate; "
                                    "train it first (python -m ldm_jax.train ... --workdir)")
        if options.step is not None and options.step not in steps:
            raise ValueError(f"workdir {self.workdir} has no ldm checkpoint at step {options.step}; it has {steps}")
        self.step = steps[-1] if options.step is None else options.step
        super().__init__(load_workdir_config(self.workdir), options)
        self._pipe = None

    @property
    def pipe(self):
        if self._pipe is None:
            from ldm_jax.pipeline import LatentDiffusionPipeline

            pipe = LatentDiffusionPipeline.from_workdir(self.workdir, step=self.step, ema=self.options.ema,
                                                        progress=self.options.progress)
            self._pipe = pipe.with_spacing(self.options.spacing) if self.options.spacing else pipe
        return self._pipe

    def sampler_settings(self) -> dict:
        s, o = self.config.sampler, self.options
        return dict(sampler=o.sampler or s.name, num_steps=int(o.num_steps or s.num_steps),
                    guidance=float(s.guidance_scale if o.guidance is None else o.guidance),
                    spacing=o.spacing or s.spacing)

    def generate(self, conditions: Sequence, *, seed_offset: int = 0, **settings) -> np.ndarray:
        """uint8 images [N, S, S, 3], one per condition (a caption, or a class label), sampled in
        fixed-size batches (the last padded) so that one program is compiled."""
        s = dict(self.sampler_settings(), **settings)
        b = self.options.batch_size
        out = []
        for start in range(0, len(conditions), b):
            chunk = list(conditions[start:start + b])
            n = len(chunk)
            chunk += [chunk[-1]] * (b - n)
            seeds = self.options.seed + seed_offset + start + np.arange(b)
            images = self.pipe.text_to_image(chunk, num_steps=s["num_steps"], guidance_scale=s["guidance"],
                                             sampler=s["sampler"], seed=seeds)
            out.append(images[:n])
        return np.concatenate(out)


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# ----------------------------------------------------------------------------------- metrics


def jsonable(tree):
    """Arrays -> lists, numpy scalars -> Python numbers (for json.dump)."""
    if isinstance(tree, dict):
        return {str(k): jsonable(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [jsonable(v) for v in tree]
    if isinstance(tree, (np.ndarray, jax.Array)):
        return np.asarray(tree).tolist()
    if isinstance(tree, np.generic):
        return tree.item()
    return tree


def conditions_of(run: Run, data: dict, idx) -> np.ndarray:
    """The condition arrays (token ids or labels) of the examples of `data` at idx."""
    conditioning = run.pipe.model.conditioning
    return conditioning.conditions(conditioning.of_examples(data, idx))[0]


def sampling_conditions(run: Run, data: dict) -> list:
    """What to generate for each example of `data`: its caption, its label, or nothing."""
    return run.pipe.model.conditioning.of_examples(data, range(len(data["image"])))


@dataclasses.dataclass(frozen=True)
class Evaluator:
    """One metric (a module of `evaluation.evaluators`): `unavailable(run)` gives the reason it
    cannot run for this run (or None), `compute(run)` its results ({split: {...}} or a dict);
    `samples`: it draws samples with the run's sampler settings (a steps sweep can vary them);
    `headline`: the number of each split that the terminal and the steps sweeps show."""

    name: str
    compute: Callable
    unavailable: Callable
    samples: bool
    headline: str | None = None
