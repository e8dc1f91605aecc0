"""digits_fid: the Fréchet distance of digits samples in the digit classifier's features."""
from __future__ import annotations

from ldm_jax.evaluation.evaluators.digit_accuracy import digit_samples, digits_unavailable
from ldm_jax.evaluation.run import Evaluator, Run


def compute_digits_fid(run: Run) -> dict:
    """Digits: the Fréchet distance between real and generated images in the digit classifier's
    feature space (works offline; a dataset-specific FID, not comparable with Inception FID)."""
    from ldm_jax.evaluation import digits

    result = {}
    for split, data, _, images, classifier in digit_samples(run):
        result[split] = {"digits_fid": float(digits.digits_fid(data["image"], images, classifier)),
                         "num_samples": len(images)}
    return result


EVALUATOR = Evaluator("digits_fid", compute_digits_fid, digits_unavailable, samples=True, headline="digits_fid")
