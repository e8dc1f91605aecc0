"""diversity: the spread of samples of one caption in the dataset's feature network, against the data's."""
from __future__ import annotations

import functools
from typing import Callable

import numpy as np

from ldm_jax.evaluation.evaluators.shapes_fid import shapes_fid_unavailable
from ldm_jax.evaluation.run import Evaluator, Run, sampling_conditions


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
        return shapes_fid_unavailable(run)
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
    for condition, image in zip(sampling_conditions(run, data), data["image"]):
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


EVALUATOR = Evaluator("diversity", compute_diversity, _diversity_unavailable, samples=True,
                      headline="diversity_ratio")
