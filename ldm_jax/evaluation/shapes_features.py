"""Offline feature metrics for the `shapes` dataset: a small CNN trained once on real shapes images.

`shapes_fid` is a dataset-specific FID (Heusel et al. 2017) in the network's penultimate-layer
features: it works offline, but is not comparable with Inception FID. `diversity` is the mean
pairwise feature distance between images of the same caption (generated, and real for reference),
for any feature network (this one, or the digit classifier's for `digits`).

The network predicts the three attributes of a caption "a <colour> <shape> <position>" (three
softmax heads: 6 colours, 3 shapes, 5 positions), so its features separate what the captions
name. It is trained for one image size S (a multiple of 32): images are rendered at S by the
dataset's own generator (`ldm_jax.data.shapes.render`, all 90 combinations, the held-out ones
included: the network is a judge, not the model under test) and block-averaged to 32 x 32, so an
S = 64 network sees 64-pixel shapes' edges as the data has them, at the same cost as S = 32.
Training and test images come from seeds of their own (`DATA_SEED`), unrelated to any dataset
build. AdamW (cosine decay) on fixed minibatches from a fixed numpy initialisation: the same network on
every machine up to float round-off, in a few seconds on one CPU core. Its accuracy on `NUM_TEST`
fresh real images (per attribute, and all three at once; 100% on a CPU at S = 32 and 64) is the
ceiling of what its features can tell and is reported with the metrics.

Trained once per image size and cached as `<cache>/shapes_classifier/v<RECIPE_VERSION>_s<S>.npz`
(parameters, test accuracies, recipe version, image size; no pickles), `<cache>` being
`$LDM_JAX_CACHE` or `~/.cache/ldm_jax` (as the digit classifier's). A cache file that cannot be
read is retrained with a warning.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from ldm_jax.data import shapes as shapes_data
from ldm_jax.evaluation import network_cache
from ldm_jax.evaluation.network_cache import default_cache_dir
from ldm_jax.evaluation.frechet import frechet_distance_of_features

# Bump when anything below changes the trained network (architecture, data, optimiser, steps):
# the version names the cache file, so an old cache is never read by a new recipe.
RECIPE_VERSION = 1
INPUT_SIZE = 32  # the network's input; images of size S = k * 32 are block-averaged to it
DATA_SEED = 101  # the builds use [seed, 0..2]; these images are drawn from [DATA_SEED, 0 / 1]
TRAIN_SEED = 0
TRAIN_BATCH, TRAIN_STEPS = 32, 400
NUM_TEST = 900  # 10 per combination on average
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 1e-4
NUM_FEATURES = 64
BATCH = 256  # fixed inference batch (the last one padded): one compiled program for any N
ATTRIBUTES = {"colour": tuple(shapes_data.COLOURS), "shape": tuple(shapes_data.SHAPES),
              "position": tuple(shapes_data.PLACES)}


class ShapesCNN(nn.Module):
    """Images [B, 32, 32, 3] in [0, 1] -> ({attribute: logits [B, classes]}, features [B, NUM_FEATURES]).

    A 4x4 stride-4 convolution (one embedding per 4x4 patch, a matmul on a CPU), a 3x3 stride-2
    convolution (to 4x4), a 64-unit hidden layer (the features) and one softmax head per attribute.
    (Three 3x3 stride-2 convolutions took twice as long per training step on a CPU.)
    """

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(32, (4, 4), strides=(4, 4), padding="VALID", name="conv_0")(x))  # [B, 8, 8, 32]
        x = nn.relu(nn.Conv(32, (3, 3), strides=(2, 2), name="conv_1")(x))  # [B, 4, 4, 32]
        features = nn.relu(nn.Dense(NUM_FEATURES, name="hidden")(x.reshape(x.shape[0], -1)))  # [B, 64]
        logits = {name: nn.Dense(len(classes), name=name)(features) for name, classes in ATTRIBUTES.items()}
        return logits, features


def check_image_size(image_size) -> int:
    """`image_size` as an int if the network can read images of that size (a multiple of 32, or a
    divisor of it of at least 8); ValueError otherwise."""
    ok = isinstance(image_size, (int, np.integer)) and image_size > 0 and (
        image_size % INPUT_SIZE == 0 or (image_size >= 8 and INPUT_SIZE % image_size == 0))
    if not ok:
        raise ValueError(f"image_size must be a positive multiple of {INPUT_SIZE}, or 8 or 16 (the shapes "
                         f"feature network reads {INPUT_SIZE}x{INPUT_SIZE} images), got {image_size!r}")
    return int(image_size)


def to_input(images) -> np.ndarray:
    """Images [N, S, S, 3] uint8 -> [N, 32, 32, 3] float32 in [0, 1]: the mean of each S/32 x S/32
    block for S a multiple of 32, nearest upscaling for S = 8 or 16 (pixel-space runs at low
    resolution; the network is then trained on upscaled images of that size)."""
    images = network_cache.check_images(images, "shapes")
    n, s = images.shape[:2]
    if check_image_size(s) < INPUT_SIZE:
        up = INPUT_SIZE // s
        return np.repeat(np.repeat(images, up, axis=1), up, axis=2).astype(np.float32) / 255.0
    f = s // INPUT_SIZE
    blocks = images.reshape(n, INPUT_SIZE, f, INPUT_SIZE, f, 3).astype(np.float32)
    return blocks.mean(axis=(2, 4)) / 255.0


@dataclasses.dataclass(frozen=True)
class ShapesClassifier:
    """A trained `ShapesCNN` for images of one size, with its accuracy on fresh real images
    (`test_accuracy`: {"colour", "shape", "position", "all"}). `from_cache` says whether the
    parameters were read from `cache_path` (True) or trained by the call that made this object."""

    params: dict
    image_size: int
    test_accuracy: dict
    cache_path: str | None = None
    from_cache: bool = False

    def apply(self, images) -> tuple[dict, np.ndarray]:
        """({attribute: logits [N, classes]}, features [N, NUM_FEATURES]) of images
        [N, image_size, image_size, 3] uint8, in batches of BATCH."""
        images = np.asarray(images)
        if images.ndim == 4 and images.shape[1] != self.image_size:
            raise ValueError(f"this shapes classifier reads {self.image_size}x{self.image_size} images, got "
                             f"{images.shape[1]}x{images.shape[2]}; load_classifier({images.shape[1]}) gives "
                             "one for that size")
        x = to_input(images)
        logits, features = {name: [] for name in ATTRIBUTES}, []
        for start in range(0, len(x), BATCH):
            chunk = x[start:start + BATCH]
            padded = np.concatenate([chunk, np.zeros((BATCH - len(chunk),) + chunk.shape[1:], np.float32)])
            out_logits, out_features = _apply(self.params, padded)
            for name in ATTRIBUTES:
                logits[name].append(np.asarray(out_logits[name])[:len(chunk)])
            features.append(np.asarray(out_features)[:len(chunk)])
        if not features:
            return ({name: np.zeros((0, len(c)), np.float32) for name, c in ATTRIBUTES.items()},
                    np.zeros((0, NUM_FEATURES), np.float32))
        return {name: np.concatenate(v) for name, v in logits.items()}, np.concatenate(features)

    def predict(self, images) -> dict[str, np.ndarray]:
        """{attribute: predicted class index [N]} (indices into ATTRIBUTES[attribute])."""
        return {name: v.argmax(axis=-1) for name, v in self.apply(images)[0].items()}


@jax.jit
def _apply(params, x):
    return ShapesCNN().apply({"params": params}, x)


def real_shapes(image_size: int, count: int, split: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(images [count, S, S, 3] uint8, {attribute: class index [count]}): real shapes images of
    uniformly drawn combinations (all 90), rendered by the dataset's generator from the seed
    [DATA_SEED, split] (0: the classifier's training images, 1: its test images)."""
    image_size = check_image_size(image_size)
    rng = np.random.default_rng([DATA_SEED, split])
    combos = rng.integers(len(shapes_data.ALL_COMBINATIONS), size=count)
    images = np.empty((count, image_size, image_size, 3), np.uint8)
    for i, c in enumerate(combos):
        images[i] = shapes_data.render(image_size, *shapes_data.ALL_COMBINATIONS[c], rng)
    labels = {name: np.array([classes.index(shapes_data.ALL_COMBINATIONS[c][k]) for c in combos], np.int32)
              for k, (name, classes) in enumerate(ATTRIBUTES.items())}
    return images, labels


@functools.cache
def _param_shapes() -> dict:
    return jax.tree.map(lambda a: a.shape, jax.eval_shape(
        lambda: ShapesCNN().init(jax.random.PRNGKey(0), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3)))["params"]))


def _init_params() -> dict:
    return network_cache.he_normal_params(_param_shapes(), TRAIN_SEED)


@functools.cache
def _unravel() -> Callable:
    """Flat parameter vector [P] -> the ShapesCNN parameter tree (AdamW runs on the one vector:
    a fraction of the compile time of per-array updates)."""
    zeros = jax.tree.map(lambda s: np.zeros(s, np.float32), _param_shapes(), is_leaf=network_cache.is_shape)
    return ravel_pytree(zeros)[1]


def _unflatten(flat: np.ndarray) -> dict:
    """`_unravel` in numpy, for the trained vector (eager jax ops would compile one by one)."""
    shapes, treedef = jax.tree.flatten(_param_shapes(), is_leaf=network_cache.is_shape)
    chunks = np.split(flat, np.cumsum([math.prod(s) for s in shapes])[:-1])
    return treedef.unflatten([c.reshape(s) for c, s in zip(chunks, shapes, strict=True)])


def _loss(flat, x, labels):
    """The sum of the three heads' mean cross-entropies."""
    logits, _ = ShapesCNN().apply({"params": _unravel()(flat)}, x)
    return sum(optax.softmax_cross_entropy_with_integer_labels(logits[k], labels[k]).mean() for k in ATTRIBUTES)


# Cosine decay to 0: the last steps settle instead of hopping between the few hard triangles
# and circles (a constant rate ended anywhere between 99.2% and 100% shape accuracy).
_OPTIMIZER = optax.adamw(optax.cosine_decay_schedule(LEARNING_RATE, TRAIN_STEPS), weight_decay=WEIGHT_DECAY)


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _train_step(flat, opt_state, x, labels):
    """One AdamW step on a batch x [TRAIN_BATCH, 32, 32, 3] with labels {attribute: [TRAIN_BATCH]}.

    A jitted step driven from Python, not a `lax.scan` over the steps: XLA:CPU runs these
    convolutions' gradients ~10x slower inside a loop body than as a top-level program.
    """
    loss, grads = jax.value_and_grad(_loss)(flat, x, labels)
    updates, opt_state = _OPTIMIZER.update(grads, opt_state, flat)
    return optax.apply_updates(flat, updates), opt_state, loss


def train_classifier(image_size: int) -> ShapesClassifier:
    """Train the classifier on TRAIN_STEPS x TRAIN_BATCH real images of size `image_size` (about
    five seconds on one CPU core, most of it compiling) and measure it on NUM_TEST others."""
    image_size = check_image_size(image_size)
    # Fresh images for every step (the generator is cheap), so no image is seen twice.
    images, labels = real_shapes(image_size, TRAIN_STEPS * TRAIN_BATCH, split=0)
    flat = ravel_pytree(_init_params())[0]
    opt_state = _OPTIMIZER.init(flat)
    for start in range(0, len(images), TRAIN_BATCH):
        rows = slice(start, start + TRAIN_BATCH)
        flat, opt_state, _ = _train_step(flat, opt_state, to_input(images[rows]),
                                         {k: v[rows] for k, v in labels.items()})
    params = _unflatten(np.asarray(flat))
    untested = ShapesClassifier(params=params, image_size=image_size, test_accuracy={})
    test_images, test_labels = real_shapes(image_size, NUM_TEST, split=1)
    predicted = untested.predict(test_images)
    correct = {k: predicted[k] == test_labels[k] for k in ATTRIBUTES}
    accuracy = {k: float(v.mean()) for k, v in correct.items()}
    accuracy["all"] = float(np.logical_and.reduce(list(correct.values())).mean())
    return dataclasses.replace(untested, test_accuracy=accuracy)


def cache_file(image_size: int, cache_dir: str | None = None) -> str:
    """Where the classifier for `image_size` images is cached."""
    return os.path.join(cache_dir or default_cache_dir(), "shapes_classifier",
                        f"v{RECIPE_VERSION}_s{check_image_size(image_size)}.npz")


def _save(classifier: ShapesClassifier, path: str):
    network_cache.save(path, classifier.params, {
        **{f"test_accuracy/{k}": np.float64(v) for k, v in classifier.test_accuracy.items()},
        "recipe_version": np.int64(RECIPE_VERSION), "image_size": np.int64(classifier.image_size)})


def _load(path: str, image_size: int) -> ShapesClassifier:
    """The cached classifier; ValueError if the file is not one this recipe wrote for this size."""
    params, scalars = network_cache.load(path, RECIPE_VERSION)
    if int(scalars["image_size"]) != image_size:
        raise ValueError(f"image size {int(scalars['image_size'])}, expected {image_size}")
    accuracy = {k[len("test_accuracy/"):]: float(v) for k, v in scalars.items() if k.startswith("test_accuracy/")}
    if jax.tree.map(lambda a: a.shape, params) != _param_shapes():
        raise ValueError("parameters do not match ShapesCNN")
    if set(accuracy) != {*ATTRIBUTES, "all"} or not all(0.0 <= v <= 1.0 for v in accuracy.values()):
        raise ValueError(f"test accuracies {accuracy} are not the four fractions expected")
    return ShapesClassifier(params=params, image_size=image_size, test_accuracy=accuracy, cache_path=path,
                            from_cache=True)


def load_classifier(image_size: int, cache_dir: str | None = None) -> ShapesClassifier:
    """The shapes classifier for `image_size` images: read from the cache, or trained (seconds on
    a CPU) and cached. A cache file that cannot be read is retrained, with a warning. `cache_dir`
    defaults to `$LDM_JAX_CACHE` or `~/.cache/ldm_jax`."""
    image_size = check_image_size(image_size)
    path = cache_file(image_size, cache_dir)
    if os.path.exists(path):
        try:
            return _load(path, image_size)
        except Exception as e:  # a truncated or foreign file: never fatal, the cache can be rebuilt
            warnings.warn(f"shapes classifier cache {path} is unreadable ({type(e).__name__}: {e}); "
                          "retraining it", stacklevel=2)
    classifier = train_classifier(image_size)
    _save(classifier, path)
    return dataclasses.replace(classifier, cache_path=path, from_cache=False)


def _classifier_for(images, classifier: ShapesClassifier | None) -> ShapesClassifier:
    if classifier is not None:
        return classifier
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"shapes images must be [N, S, S, 3], got shape {images.shape}")
    return load_classifier(images.shape[1])


def features(images, classifier: ShapesClassifier | None = None) -> np.ndarray:
    """The classifier's penultimate-layer features [N, NUM_FEATURES] of images [N, S, S, 3] uint8
    (default classifier: `load_classifier(S)`)."""
    return _classifier_for(images, classifier).apply(images)[1]


def shapes_fid(generated, real, classifier: ShapesClassifier | None = None) -> float:
    """The Fréchet distance between two image sets [N, S, S, 3] uint8 in the shapes classifier's
    feature space (FID, Heusel et al. 2017, eq. 6, with these features in place of Inception's).
    Symmetric in its arguments; like FID it is biased upwards at small N."""
    classifier = _classifier_for(real, classifier)
    return frechet_distance_of_features(features(generated, classifier), features(real, classifier))


# ----------------------------------------------------------------------------------- diversity


def mean_pairwise_distance(grouped_features) -> np.ndarray:
    """Features [N, K, D] (K >= 2 per group) -> [N]: each group's mean Euclidean distance over its
    K (K - 1) / 2 pairs, in float64. For i.i.d. members this is an unbiased estimate of
    E||f - f'|| whatever K, so groups of different sizes measure the same thing."""
    f = np.asarray(grouped_features, np.float64)
    if f.ndim != 3 or f.shape[1] < 2:
        raise ValueError(f"need features [N, K >= 2, D] (K images per caption), got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("features contain NaN or infinity")
    k = f.shape[1]
    i, j = np.triu_indices(k, 1)
    return np.linalg.norm(f[:, i] - f[:, j], axis=-1).mean(axis=1)


def diversity(generated_features, real_features) -> dict:
    """Sample diversity: features [N, K, D] of K generated images for each of N captions (same
    caption, different seeds) and [M, K', D] of K' real images per caption.

    Returns `diversity` (the mean over captions of `mean_pairwise_distance`, with `diversity_ci95`
    over captions), `real_diversity` (the same statistic of the real images: the data's own
    spread within a caption) and `diversity_ratio` = diversity / real_diversity (1: as varied as
    the data; 0: one image per caption, whatever the seed; NaN if the real images do not vary),
    with `num_captions` and `samples_per_caption`.
    """
    per_caption = mean_pairwise_distance(generated_features)
    real = float(mean_pairwise_distance(real_features).mean())
    value = float(per_caption.mean())
    n = len(per_caption)
    ci95 = 1.959964 * per_caption.std(ddof=1) / math.sqrt(n) if n > 1 else float("nan")
    return dict(diversity=value, diversity_ci95=float(ci95), real_diversity=real,
                diversity_ratio=value / real if real > 0 else float("nan"),
                num_captions=n, samples_per_caption=int(np.shape(generated_features)[1]))
