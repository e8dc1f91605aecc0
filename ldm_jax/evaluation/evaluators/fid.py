"""fid: FID with the Inception-v3 network (weights from a local file)."""
from __future__ import annotations

from ldm_jax.evaluation.run import Evaluator, Run, sampling_conditions


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
        images = run.generate(sampling_conditions(run, data), seed_offset=100_000 * k)
        result[split] = {"fid": float(fid.fid(data["image"], images, extractor)), "num_samples": len(images)}
    return result


EVALUATOR = Evaluator("fid", compute_fid, _fid_unavailable, samples=True, headline="fid")
