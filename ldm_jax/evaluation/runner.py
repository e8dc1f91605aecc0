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
import functools
import json
import math
import numbers
import os
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from ldm_jax.data import pipeline as data_pipeline
from ldm_jax.diffusion import likelihood, samplers
from ldm_jax.evaluation import shapes as shapes_checker
from ldm_jax.workdir import checkpoint_steps, load_workdir_config

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
    bpd_examples: held-out examples for bpd (each costs T model calls).
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
    inception_weights: str | None = None
    clip_model: str | None = None
    progress: bool = False
    diversity_samples: int = 4


def check_options(options: EvalOptions) -> None:
    """ValueError naming the first option out of range (before any model or data is loaded)."""
    o = options
    for name in ("num_samples", "batch_size", "bpd_examples", "bpd_batch_size", "diversity_samples"):
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



class Run:
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
        self.options = options
        self.step = steps[-1] if options.step is None else options.step
        self.config = load_workdir_config(self.workdir)
        self.splits = tuple(options.splits or self.config.eval.splits or ("test",))
        self._pipe = None
        self._sources = {}

    @property
    def dataset(self) -> str:
        return self.config.data.name

    @property
    def conditioning(self) -> str:
        return self.config.conditioning.kind

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

    # ------------------------------------------------------------------------- data

    def source(self, split: str):
        if split not in self._sources:
            self._sources[split] = data_pipeline.load_source(self._data_config(split))
        return self._sources[split]

    def _data_config(self, split: str):
        from ldm_jax.training.loop import data_config

        return data_config(self.config, split=split)

    def examples(self, split: str, count: int) -> dict:
        """`count` examples of a split (all of it if smaller), drawn without replacement with a
        fixed seed, as the training loop's own evaluation does: {"image": uint8 [N, S, S, 3],
        "caption": [N] (if any), "label": [N] (if the config has a label key)}."""
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


@dataclasses.dataclass(frozen=True)
class Metric:
    """compute(run) -> dict of results; unavailable(run) -> a reason, or None if it can run."""

    compute: Callable
    unavailable: Callable
    samples: bool  # uses the sampler settings (a steps_sweep can vary them)


_SERIES = ("terms_mean", "per_example_total")  # kept in the JSON, not logged as scalars


def _bpd_unavailable(run: Run):
    return None


def compute_bpd(run: Run) -> dict:
    """The full variational bound of held-out examples with all T terms (Improved DDPM's
    `calc_bpd_loop`, through `likelihood.bits_per_dim`), in bits per dimension: per pixel
    dimension for pixel-space runs (the discretized decoder on 8-bit data, comparable with DDPM /
    Improved DDPM / VDM), per latent dimension for latent runs (a continuous Gaussian decoder on
    the scaled posterior means; a bound on the latents, not on the images). Conditional models are
    evaluated on each example's own caption or label (no guidance). Reports the mean of each part
    (prior L_T, decoder L_0, diffusion sum_{t>=1} L_{t-1}) and a 95% interval over examples."""
    from ldm_jax.training import config as config_lib

    config, pipe, o = run.config, run.pipe, run.options
    split = run.splits[0]
    data = run.examples(split, o.bpd_examples)
    decoder = config_lib.likelihood_decoder(config)
    pixel = config.autoencoder.kind == "identity"
    context_fn = jax.jit(pipe._context)
    b, n = o.bpd_batch_size, len(data["image"])
    parts = {k: [] for k in ("total", "prior", "decoder", "diffusion")}
    terms = []
    for start in range(0, n, b):
        idx = np.arange(start, start + b).clip(max=n - 1)  # pad with the last example
        images = data["image"][idx]
        x0 = images.astype(np.float32) / 127.5 - 1.0 if pixel else pipe.encode(images)
        cond = _conditions_of(run, data, idx)
        context = context_fn(pipe.params, jnp.asarray(cond))
        out = likelihood.bits_per_dim(
            conditional_model(pipe, context), pipe.noise_schedule, x0,
            jax.random.fold_in(jax.random.PRNGKey(o.seed), start),
            prediction=config.diffusion.prediction, variance=config.diffusion.variance, decoder=decoder,
            clip_x0=1.0 if pixel else None)
        keep = min(b, n - start)
        for k in parts:
            parts[k].append(np.asarray(out[k])[:keep])
        terms.append(np.asarray(out["terms"])[:keep])
    result = {"split": split, "num_examples": n, "unit": "bits/dim" if pixel else "bits/latent-dim",
              "decoder_type": decoder, "num_timesteps": int(pipe.noise_schedule.num_timesteps)}
    for k, values in parts.items():
        v = np.concatenate(values).astype(np.float64)
        result[k] = float(v.mean())
        result[f"{k}_ci95"] = float(Z_95 * v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    result["per_example_total"] = np.concatenate(parts["total"]).tolist()
    result["terms_mean"] = np.concatenate(terms).mean(axis=0).tolist()  # L_t per t, bits/dim
    return result


def _apply_unet(unet, unet_params, context, x_t, t):
    return unet.apply({"params": unet_params}, x_t, t, context)


def conditional_model(pipe, context) -> Partial:
    """model_fn(x_t, t) of a pipeline's UNet for a fixed context [B, L, D] (no guidance), with the
    parameters and context as traced leaves (not baked into the program as constants)."""
    return Partial(functools.partial(_apply_unet, pipe.unet), pipe.params["unet"], context)


def _conditions_of(run: Run, data: dict, idx) -> np.ndarray:
    pipe = run.pipe
    if run.conditioning == "text":
        return pipe._conditions([data["caption"][i] for i in idx], None)[0]
    if run.conditioning == "class":
        return np.asarray(data["label"])[idx]
    return np.zeros((len(idx),), np.int32)


def _prompt_accuracy_unavailable(run: Run):
    if run.dataset != "shapes" or run.conditioning != "text":
        return (f"prompt_accuracy scores text-conditional models of the shapes dataset; this run is "
                f"{run.conditioning!r}-conditional on {run.dataset!r}")
    return None


def compute_prompt_accuracy(run: Run) -> dict:
    """Shapes: a sample for each of `num_samples` captions of every split, judged by the shapes
    checker; overall and per attribute (colour, shape, position)."""
    result = {}
    for k, split in enumerate(run.splits):
        captions = run.examples(split, run.options.num_samples)["caption"]
        images = run.generate(captions, seed_offset=100_000 * k)
        result[split] = shapes_checker.accuracy(images, captions)
        result[split]["num_samples"] = len(captions)
    return result


def _digits_unavailable(run: Run):
    if run.dataset != "digits":
        return f"digit metrics score models of the digits dataset; this run's dataset is {run.dataset!r}"
    if run.conditioning not in ("text", "class"):
        return "digit_accuracy needs a text- or class-conditional model"
    return None


def _digit_conditions(run: Run, data: dict):
    """What to generate: the real examples' captions, or their labels for a class model."""
    from ldm_jax.evaluation import digits

    if run.conditioning == "class":
        labels = np.asarray(data["label"])
        return [int(v) for v in labels], labels
    return list(data["caption"]), np.asarray([digits.parse_caption(c) for c in data["caption"]])


def compute_digit_accuracy(run: Run) -> dict:
    """Digits: a sample per test example's prompt, classified by the small digit classifier
    (trained once on the real digits and cached); also reports that classifier's own accuracy
    on the real test digits, the ceiling of this metric."""
    from ldm_jax.evaluation import digits

    classifier = digits.load_classifier(run.config.data.image_size)
    result = {}
    for k, split in enumerate(run.splits):
        data = run.examples(split, run.options.num_samples)
        conditions, labels = _digit_conditions(run, data)
        images = run.generate(conditions, seed_offset=100_000 * k)
        result[split] = _jsonable(digits.digit_accuracy(images, labels, classifier))
        result[split]["num_samples"] = len(labels)
    return result


def compute_digits_fid(run: Run) -> dict:
    """Digits: the Fréchet distance between real and generated images in the digit classifier's
    feature space (works offline; a dataset-specific FID, not comparable with Inception FID)."""
    from ldm_jax.evaluation import digits

    classifier = digits.load_classifier(run.config.data.image_size)
    result = {}
    for k, split in enumerate(run.splits):
        data = run.examples(split, run.options.num_samples)
        conditions, _ = _digit_conditions(run, data)
        images = run.generate(conditions, seed_offset=100_000 * k)
        result[split] = {"digits_fid": float(digits.digits_fid(data["image"], images, classifier)),
                         "num_samples": len(images)}
    return result


def _fid_unavailable(run: Run):
    from ldm_jax.evaluation import fid

    try:
        fid.check_weights(run.options.inception_weights)
    except fid.FIDUnavailable as e:
        return str(e)
    return None


def compute_fid(run: Run) -> dict:
    """FID (Inception-v3 pool features, the standard FID network's weights from a local file)
    between `num_samples` real images of each split and as many samples for their conditions."""
    from ldm_jax.evaluation import fid

    extractor = fid.InceptionFeatures(run.options.inception_weights)
    result = {}
    for k, split in enumerate(run.splits):
        data = run.examples(split, run.options.num_samples)
        images = run.generate(_sampling_conditions(run, data), seed_offset=100_000 * k)
        result[split] = {"fid": float(fid.fid(data["image"], images, extractor)), "num_samples": len(images)}
    return result


def _sampling_conditions(run: Run, data: dict) -> list:
    if run.conditioning == "text":
        return list(data["caption"])
    if run.conditioning == "class":
        return [int(v) for v in data["label"]]
    return [0] * len(data["image"])


def _shapes_fid_unavailable(run: Run):
    from ldm_jax.evaluation import shapes_features

    if run.dataset != "shapes":
        return (f"shapes_fid scores models of the shapes dataset (its feature network is trained on shapes "
                f"images); this run's dataset is {run.dataset!r}")
    try:
        shapes_features.check_image_size(run.config.data.image_size)
    except ValueError as e:
        return f"data.image_size: {e}"
    return None


def compute_shapes_fid(run: Run) -> dict:
    """Shapes: the Fréchet distance between `num_samples` real images of each split and as many
    samples for their captions, in the features of a small CNN trained once on real shapes images
    to name their colour, shape and position (cached; works offline; a dataset-specific FID, not
    comparable with Inception FID). Also reports that network's accuracy on fresh real images."""
    from ldm_jax.evaluation import shapes_features

    classifier = shapes_features.load_classifier(run.config.data.image_size)
    result = {}
    for k, split in enumerate(run.splits):
        data = run.examples(split, run.options.num_samples)
        images = run.generate(_sampling_conditions(run, data), seed_offset=100_000 * k)
        result[split] = {"shapes_fid": float(shapes_features.shapes_fid(images, data["image"], classifier)),
                         "num_samples": len(images),
                         "classifier_test_accuracy": dict(classifier.test_accuracy)}
    return result


DIVERSITY_DATASETS = ("shapes", "digits")  # the datasets with a feature network of their own


def _diversity_unavailable(run: Run):
    if run.dataset not in DIVERSITY_DATASETS:
        return (f"diversity needs a feature network for the dataset ({', '.join(DIVERSITY_DATASETS)}); "
                f"this run's dataset is {run.dataset!r}")
    if run.conditioning not in ("text", "class"):
        return (f"diversity compares samples of one caption or class; this run is "
                f"{run.conditioning!r}-conditional")
    k = run.options.diversity_samples
    if not isinstance(k, (int, np.integer)) or k < 2:
        return f"diversity_samples must be an integer >= 2 (samples per caption), got {k!r}"
    if run.options.num_samples < k:
        return (f"diversity needs num_samples ({run.options.num_samples}) >= diversity_samples ({k}): "
                f"num_samples // diversity_samples captions are sampled")
    if run.dataset == "shapes":
        return _shapes_fid_unavailable(run)
    if run.config.data.image_size % 8:
        return f"data.image_size must be a multiple of 8 for the digit classifier, got {run.config.data.image_size}"
    return None


def _feature_extractor(run: Run) -> Callable:
    """images [N, S, S, 3] uint8 -> features [N, D] of the run's dataset's own feature network."""
    size = run.config.data.image_size
    if run.dataset == "shapes":
        from ldm_jax.evaluation import shapes_features

        return functools.partial(shapes_features.features, classifier=shapes_features.load_classifier(size))
    from ldm_jax.evaluation import digits

    return functools.partial(digits.features, classifier=digits.load_classifier(size))


def repeated_conditions(run: Run, split: str, num_conditions: int, per_condition: int) -> tuple[list, np.ndarray]:
    """Up to `num_conditions` conditions (captions, or labels for a class model) of a split that
    have at least `per_condition` examples, and those examples' images [n, per_condition, S, S, 3]:
    the first conditions to reach `per_condition` images and their first images, in the split's
    fixed-seed order (`Run.examples`). Reads the whole split (the built-in sets are small)."""
    data = run.examples(split, len(run.source(split)))
    groups = {}
    for condition, image in zip(_sampling_conditions(run, data), data["image"]):
        groups.setdefault(condition, []).append(image)
    full = [c for c, images in groups.items() if len(images) >= per_condition][:num_conditions]
    if not full:
        raise ValueError(f"diversity: no caption of split {split!r} has {per_condition} images "
                         f"(diversity_samples); the most any has is {max(map(len, groups.values()), default=0)}")
    return full, np.stack([np.stack(groups[c][:per_condition]) for c in full])


def compute_diversity(run: Run) -> dict:
    """Sample diversity (shapes and digits): `num_samples // diversity_samples` captions of each
    split, `diversity_samples` samples each (same caption, different seeds); the mean pairwise
    distance between one caption's samples in the dataset's feature network (the shapes CNN, or
    the digit classifier), averaged over captions, next to the same statistic for as many real
    images of each caption (the data's own diversity) and their ratio. Higher guidance is
    expected to lower it (Ho & Salimans 2021, classifier-free guidance trades diversity for
    fidelity)."""
    from ldm_jax.evaluation import shapes_features

    extract = _feature_extractor(run)
    per = int(run.options.diversity_samples)
    result = {}
    for k, split in enumerate(run.splits):
        conditions, real = repeated_conditions(run, split, run.options.num_samples // per, per)
        images = run.generate([c for c in conditions for _ in range(per)], seed_offset=100_000 * k)
        generated = extract(images).reshape(len(conditions), per, -1)  # [N, K, D]
        real = extract(real.reshape((-1,) + real.shape[2:])).reshape(len(conditions), per, -1)
        result[split] = shapes_features.diversity(generated, real)
    return result


def _clip_unavailable(run: Run):
    if run.conditioning != "text":
        return f"clip_score needs a text-conditional model; this run is {run.conditioning!r}-conditional"
    if not run.options.clip_model:
        return ("clip_score needs a local CLIP checkpoint folder (transformers format, e.g. "
                "openai/clip-vit-base-patch32 saved with save_pretrained): pass --clip_model DIR")
    if not os.path.isdir(os.path.expanduser(run.options.clip_model)):
        return f"--clip_model {run.options.clip_model}: no such folder"
    return None


def compute_clip_score(run: Run) -> dict:
    """CLIP score, 100 * max(cos(image, text), 0) averaged, of a sample per caption."""
    from ldm_jax.evaluation.clip_score import CLIPScorer

    scorer = CLIPScorer.from_pretrained(run.options.clip_model)
    result = {}
    for k, split in enumerate(run.splits):
        captions = run.examples(split, run.options.num_samples)["caption"]
        images = run.generate(captions, seed_offset=100_000 * k)
        scores = np.asarray(scorer.score(images, captions), np.float64)
        result[split] = {"clip_score": float(scores.mean()),
                         "clip_score_ci95": float(Z_95 * scores.std(ddof=1) / math.sqrt(len(scores))),
                         "num_samples": len(captions)}
    return result


def _recon_unavailable(run: Run):
    if run.config.autoencoder.kind == "identity":
        return "recon measures the autoencoder; this run is pixel-space (autoencoder.kind='identity')"
    return None


def compute_recon(run: Run) -> dict:
    """The autoencoder on held-out images: PSNR and SSIM of its reconstructions, the std of the
    scaled latents (the LDM wants ~1), and codebook usage / perplexity for a VQ model."""
    from ldm_jax.evaluation import recon

    pipe, result = run.pipe, {}
    for split in run.splits:
        images = run.examples(split, run.options.num_samples)["image"]
        metrics = recon.reconstruction_metrics(pipe.autoencoder, pipe.params["autoencoder"], images,
                                               scale_factor=pipe.scale_factor, batch_size=run.options.batch_size)
        result[split] = _jsonable(metrics)
        result[split]["num_images"] = len(images)
    return result


METRICS = {
    "bpd": Metric(compute_bpd, _bpd_unavailable, samples=False),
    "prompt_accuracy": Metric(compute_prompt_accuracy, _prompt_accuracy_unavailable, samples=True),
    "digit_accuracy": Metric(compute_digit_accuracy, _digits_unavailable, samples=True),
    "digits_fid": Metric(compute_digits_fid, _digits_unavailable, samples=True),
    "shapes_fid": Metric(compute_shapes_fid, _shapes_fid_unavailable, samples=True),
    "diversity": Metric(compute_diversity, _diversity_unavailable, samples=True),
    "fid": Metric(compute_fid, _fid_unavailable, samples=True),
    "clip_score": Metric(compute_clip_score, _clip_unavailable, samples=True),
    "recon": Metric(compute_recon, _recon_unavailable, samples=False),
}


def _jsonable(tree):
    """Arrays -> lists, numpy scalars -> Python numbers (for json.dump)."""
    if isinstance(tree, dict):
        return {str(k): _jsonable(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_jsonable(v) for v in tree]
    if isinstance(tree, (np.ndarray, jax.Array)):
        return np.asarray(tree).tolist()
    if isinstance(tree, np.generic):
        return tree.item()
    return tree


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
        if name == "bpd":
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
    from ldm_jax.training.writer import MetricWriter

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


HEADLINE = {"prompt_accuracy": "ok", "digit_accuracy": "accuracy", "digits_fid": "digits_fid", "fid": "fid",
            "clip_score": "clip_score", "shapes_fid": "shapes_fid", "diversity": "diversity_ratio"}


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
