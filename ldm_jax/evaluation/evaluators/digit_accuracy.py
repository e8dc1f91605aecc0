"""digit_accuracy: digits samples classified by the small digit classifier."""
from __future__ import annotations

import numpy as np

from ldm_jax.evaluation.run import Evaluator, Run, jsonable


def digits_unavailable(run: Run):
    if run.dataset != "digits":
        return f"digit metrics score models of the digits dataset; this run's dataset is {run.dataset!r}"
    if run.conditioning not in ("text", "class"):
        return "digit_accuracy needs a text- or class-conditional model"
    return None


def digit_conditions(run: Run, data: dict):
    """What to generate: the real examples' captions, or their labels for a class model."""
    from ldm_jax.evaluation import digits

    if run.conditioning == "class":
        labels = np.asarray(data["label"])
        return [int(v) for v in labels], labels
    return list(data["caption"]), np.asarray([digits.parse_caption(c) for c in data["caption"]])


def digit_samples(run: Run):
    """(split, real examples, their digits, a sample for each) for every split, and the digit
    classifier (trained once on the real digits and cached) that judges them."""
    from ldm_jax.evaluation import digits

    classifier = digits.load_classifier(run.config.data.image_size)
    for k, split in enumerate(run.splits):
        data = run.examples(split, run.options.num_samples)
        conditions, labels = digit_conditions(run, data)
        yield split, data, labels, run.generate(conditions, seed_offset=100_000 * k), classifier


def compute_digit_accuracy(run: Run) -> dict:
    """Digits: a sample per test example's prompt, classified by the small digit classifier; also
    reports that classifier's own accuracy on the real test digits, the ceiling of this metric."""
    from ldm_jax.evaluation import digits

    result = {}
    for split, _, labels, images, classifier in digit_samples(run):
        result[split] = jsonable(digits.digit_accuracy(images, labels, classifier))
        result[split]["num_samples"] = len(labels)
    return result


EVALUATOR = Evaluator("digit_accuracy", compute_digit_accuracy, digits_unavailable, samples=True,
                      headline="accuracy")
