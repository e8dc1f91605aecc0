"""shapes_fid: the Fréchet distance of shapes samples in a small shapes CNN's features."""
from __future__ import annotations

from ldm_jax.evaluation.run import Evaluator, Run, sampling_conditions


def shapes_fid_unavailable(run: Run):
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
        images = run.generate(sampling_conditions(run, data), seed_offset=100_000 * k)
        result[split] = {"shapes_fid": float(shapes_features.shapes_fid(images, data["image"], classifier)),
                         "num_samples": len(images),
                         "classifier_test_accuracy": dict(classifier.test_accuracy)}
    return result


EVALUATOR = Evaluator("shapes_fid", compute_shapes_fid, shapes_fid_unavailable, samples=True,
                      headline="shapes_fid")
