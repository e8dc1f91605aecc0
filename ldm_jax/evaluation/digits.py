"""Digit metrics for the `digits` dataset: a small CNN classifier trained once on the real digits.

`digit_accuracy` asks whether a generated digit is the digit its prompt names; `digits_fid` is a
dataset-specific FID (Heusel et al. 2017) in the classifier's penultimate-layer features, which
works offline but is not comparable with Inception FID.

The classifier first averages each S/8 x S/8 block and the three channels, so it sees the data's
own 8x8 grey levels: for S a multiple of 8, nearest upscaling (`ldm_jax.data.digits.to_image`)
followed by that average recovers the 8x8 digit exactly, and a generated image is judged at the
resolution the data has. One network therefore serves every image size. It is trained on the
`train` split of `split_indices(seed=0, test_size=300)` (the default digits build; a build with
another seed or test size shares some of its test digits with this training set), with AdamW on
fixed minibatches from a fixed numpy initialisation, so it is the same network on every machine
up to float round-off, in a few seconds on one CPU core. Its accuracy on the 300 `test` digits
(99.3% on a CPU) is the ceiling of `digit_accuracy` and is reported with it.

Trained once and cached as `<cache>/digit_classifier/v<RECIPE_VERSION>.npz` (parameters, test
accuracy, recipe version; no pickles), `<cache>` being `$LDM_JAX_CACHE` or `~/.cache/ldm_jax`.
A cache file that cannot be read is retrained with a warning.
"""
from __future__ import annotations

import dataclasses
import os
import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ldm_jax.data import digits as digits_data
from ldm_jax.evaluation import network_cache
from ldm_jax.evaluation.frechet import frechet_distance_of_features
from ldm_jax.evaluation.network_cache import default_cache_dir

# Bump when anything below changes the trained network (architecture, data, optimiser, steps):
# the version names the cache file, so an old cache is never read by a new recipe.
RECIPE_VERSION = 1
SPLIT_SEED, TEST_SIZE = 0, 300  # the default digits build's split
TRAIN_SEED = 0
NUM_TRAIN = digits_data.NUM_DIGITS - TEST_SIZE
TRAIN_BATCH, EPOCHS = 64, 20
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 1e-4
NUM_CLASSES = 10
NUM_FEATURES = 64
BATCH = 256  # fixed inference batch (the last one padded): one compiled program for any N
_CAPTION = re.compile(rf"^a handwritten digit ({'|'.join(digits_data.NUMBER_WORDS)})$")


class DigitCNN(nn.Module):
    """8x8 grey digits [B, 8, 8, 1] in [0, 1] -> (logits [B, 10], features [B, NUM_FEATURES]).

    Two 3x3 convolutions (the second with stride 2, to 4x4), a 64-unit hidden layer (the
    features `digits_fid` uses) and the logits.
    """

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), name="conv_0")(x))  # [B, 8, 8, 8]
        x = nn.relu(nn.Conv(16, (3, 3), strides=(2, 2), name="conv_1")(x))  # [B, 4, 4, 16]
        features = nn.relu(nn.Dense(NUM_FEATURES, name="hidden")(x.reshape(x.shape[0], -1)))  # [B, 64]
        return nn.Dense(NUM_CLASSES, name="logits")(features), features


def to_grey8(images) -> np.ndarray:
    """Images [N, S, S, 3] uint8 (S a multiple of 8) -> [N, 8, 8, 1] float32 in [0, 1]: the mean
    of each S/8 x S/8 block and of the channels (exactly the 8x8 digit for a real image)."""
    images = network_cache.check_images(images, "digit")
    n, s = images.shape[:2]
    if s == 0 or s % 8:
        raise ValueError(f"digit image size must be a positive multiple of 8, got {s}")
    f = s // 8
    blocks = images.reshape(n, 8, f, 8, f, 3).astype(np.float32)
    return (blocks.mean(axis=(2, 4, 5)) / 255.0)[..., None]


@dataclasses.dataclass(frozen=True)
class DigitClassifier:
    """A trained `DigitCNN` (for images of any size S a multiple of 8) with its accuracy on the
    real test digits. `from_cache` says whether the parameters were read from `cache_path` (True)
    or trained by the call that made this object (False).
    """
    params: dict
    test_accuracy: float
    cache_path: str | None = None
    from_cache: bool = False

    def apply(self, images) -> tuple[np.ndarray, np.ndarray]:
        """(logits [N, 10], features [N, NUM_FEATURES]) of images [N, S, S, 3] uint8, in batches of BATCH."""
        x = to_grey8(images)
        logits, features = [], []
        for start in range(0, len(x), BATCH):
            chunk = x[start:start + BATCH]
            padded = np.concatenate([chunk, np.zeros((BATCH - len(chunk),) + chunk.shape[1:], np.float32)])
            out_logits, out_features = _apply(self.params, padded)
            logits.append(np.asarray(out_logits)[:len(chunk)])
            features.append(np.asarray(out_features)[:len(chunk)])
        if not logits:
            return np.zeros((0, NUM_CLASSES), np.float32), np.zeros((0, NUM_FEATURES), np.float32)
        return np.concatenate(logits), np.concatenate(features)

    def predict(self, images) -> np.ndarray:
        """The predicted digit [N] of images [N, S, S, 3] uint8."""
        return self.apply(images)[0].argmax(axis=-1)


@jax.jit
def _apply(params, x):
    return DigitCNN().apply({"params": params}, x)


def real_digits(image_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (images [N, S, S, 3] uint8, labels [N])}: the default digits build's splits
    (`train`, `test`), rendered as its builder does."""
    from sklearn.datasets import load_digits  # imported here: scikit-learn is slow to import

    data = load_digits()
    out = {}
    for split, rows in digits_data.split_indices(SPLIT_SEED, TEST_SIZE).items():
        images = np.stack([digits_data.to_image(data.images[r], image_size) for r in rows])
        out[split] = (images, data.target[rows].astype(np.int32))
    return out


def _param_shapes() -> dict:
    return jax.tree.map(lambda a: a.shape, jax.eval_shape(
        lambda: DigitCNN().init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))["params"]))


def _init_params() -> dict:
    return network_cache.he_normal_params(_param_shapes(), TRAIN_SEED)


def _batch_order() -> np.ndarray:
    """[EPOCHS * steps_per_epoch, TRAIN_BATCH] row indices into the train split: a fresh fixed
    permutation each epoch, the last partial batch dropped (a different one each epoch)."""
    rng = np.random.default_rng(TRAIN_SEED)
    per_epoch = NUM_TRAIN // TRAIN_BATCH
    return np.concatenate([rng.permutation(NUM_TRAIN)[:per_epoch * TRAIN_BATCH].reshape(per_epoch, TRAIN_BATCH)
                           for _ in range(EPOCHS)])


@jax.jit
def _fit(params, x, labels, order):
    """Minibatch AdamW on cross-entropy over the fixed batch order (a scan: one compiled program)."""
    tx = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)

    def loss_fn(p, rows):
        logits, _ = DigitCNN().apply({"params": p}, x[rows])
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels[rows]).mean()

    def step(carry, rows):
        p, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(p, rows)
        updates, opt_state = tx.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), loss

    (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), order)
    return params, losses


def train_classifier() -> DigitClassifier:
    """Train the classifier on the real `train` digits and measure it on `test`.

    At S = 8 (`to_image` is then the identity upscaling): every multiple of 8 gives the network
    the same input, and so the same parameters.
    """
    real = real_digits(8)
    train_images, train_labels = real["train"]
    params, _ = _fit(_init_params(), jnp.asarray(to_grey8(train_images)), jnp.asarray(train_labels),
                     jnp.asarray(_batch_order()))
    params = jax.device_get(params)
    test_images, test_labels = real["test"]
    untested = DigitClassifier(params=params, test_accuracy=float("nan"))
    accuracy = float(np.mean(untested.predict(test_images) == test_labels))
    return dataclasses.replace(untested, test_accuracy=accuracy)


def cache_file(cache_dir: str | None = None) -> str:
    """Where the classifier is cached."""
    return os.path.join(cache_dir or default_cache_dir(), "digit_classifier", f"v{RECIPE_VERSION}.npz")


def _save(classifier: DigitClassifier, path: str):
    network_cache.save(path, classifier.params, {"test_accuracy": np.float64(classifier.test_accuracy),
                                                 "recipe_version": np.int64(RECIPE_VERSION)})


def _load(path: str) -> DigitClassifier:
    """The cached classifier; ValueError if the file is not one this recipe wrote."""
    params, scalars = network_cache.load(path, RECIPE_VERSION)
    test_accuracy = float(scalars["test_accuracy"])
    if jax.tree.map(lambda a: a.shape, params) != _param_shapes():
        raise ValueError("parameters do not match DigitCNN")
    if not 0.0 <= test_accuracy <= 1.0:
        raise ValueError(f"test accuracy {test_accuracy} out of range")
    return DigitClassifier(params=params, test_accuracy=test_accuracy, cache_path=path, from_cache=True)


def load_classifier(image_size: int, cache_dir: str | None = None) -> DigitClassifier:
    """The digit classifier, checked to read `image_size` images: read from the cache, or trained
    (a few seconds on a CPU) and cached. A cache file that cannot be read is retrained, with a
    warning. `cache_dir` defaults to `$LDM_JAX_CACHE` or `~/.cache/ldm_jax`."""
    if not isinstance(image_size, (int, np.integer)) or image_size <= 0 or image_size % 8:
        raise ValueError(f"image_size must be a positive multiple of 8 (digits are 8x8), got {image_size!r}")
    path = cache_file(cache_dir)
    if os.path.exists(path):
        try:
            return _load(path)
        except Exception as e:  # a truncated or foreign file: never fatal, the cache can be rebuilt
            warnings.warn(f"digit classifier cache {path} is unreadable ({type(e).__name__}: {e}); "
                          "retraining it", stacklevel=2)
    classifier = train_classifier()
    _save(classifier, path)
    return dataclasses.replace(classifier, cache_path=path, from_cache=False)


def parse_caption(caption: str) -> int:
    """"a handwritten digit seven" -> 7; ValueError naming the caption for anything else."""
    match = _CAPTION.match(str(caption).strip())
    if match is None:
        raise ValueError(f"not a digits caption: {caption!r} (expected 'a handwritten digit <zero..nine>')")
    return digits_data.NUMBER_WORDS.index(match.group(1))


def _as_label(value) -> int:
    """A digit from an int label or a caption (str, or bytes as TFDS returns text)."""
    if isinstance(value, bytes):
        value = value.decode()
    return parse_caption(value) if isinstance(value, str) else int(value)


def _as_labels(labels_or_captions, n: int) -> np.ndarray:
    items = list(labels_or_captions)
    if len(items) != n:
        raise ValueError(f"got {n} images but {len(items)} labels/captions")
    labels = np.array([_as_label(v) for v in items], np.int64)
    bad = labels[(labels < 0) | (labels >= NUM_CLASSES)]
    if bad.size:
        raise ValueError(f"digit labels must be in 0..9, got {bad[0]}")
    return labels


def digit_accuracy(images, labels, classifier: DigitClassifier) -> dict:
    """How often the classifier sees the intended digit in images [N, S, S, 3] uint8.

    `labels`: the digits [N] (ints) or their captions ("a handwritten digit seven"). Returns
    accuracy, per_digit (10 entries; None for a digit with no images) and
    classifier_test_accuracy (the classifier's own accuracy on real test digits: the ceiling).
    """
    images = np.asarray(images)
    want = _as_labels(labels, len(images))
    if not len(want):
        raise ValueError("digit_accuracy needs at least one image")
    correct = classifier.predict(images) == want
    per_digit = [float(correct[want == d].mean()) if (want == d).any() else None for d in range(NUM_CLASSES)]
    return dict(accuracy=float(correct.mean()), per_digit=per_digit,
                classifier_test_accuracy=float(classifier.test_accuracy))


def features(images, classifier: DigitClassifier) -> np.ndarray:
    """The classifier's penultimate-layer features [N, NUM_FEATURES] of images [N, S, S, 3] uint8."""
    return classifier.apply(images)[1]


def digits_fid(images_a, images_b, classifier: DigitClassifier) -> float:
    """The Fréchet distance between two image sets in the classifier's feature space (FID,
    Heusel et al. 2017, eq. 6, with these features in place of Inception's)."""
    return frechet_distance_of_features(features(images_a, classifier), features(images_b, classifier))
