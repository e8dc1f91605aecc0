"""digits_fid: the Fréchet distance of digits samples in the digit classifier's features."""
from __future__ import annotations

from ldm_jax.evaluation.evaluators.digit_accuracy import digit_conditions, digits_unavailable
from ldm_jax.evaluation.run import Evaluator, Run


def compute_digits_fid(run: Run) -> dict:
    """Digits: the Fréchet distance between real and generated images in the digit classifier's
    feature space (works offline; a dataset-specific FID, not comparable with Inception FID)."""
    from ldm_jax.evaluation import digits

    classifier = digits.load_classifier(run.config.data.image_size)
    result = {}
    for k, split in enumerate(run.splits):
        data = run.examples(split, run.options.num_samples)
        conditions, _ = digit_conditions(run, data)
        images = run.generate(conditions, seed_offset=100_000 * k)
        result[split] = {"digits_fid": float(digits.digits_fid(data["image"], images, classifier)),
                         "num_samples": len(images)}
    return result


EVALUATOR = Evaluator("digits_fid", compute_digits_fid, digits_unavailable, samples=True, headline="digits_fid")
