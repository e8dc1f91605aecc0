"""prompt_accuracy: shapes samples judged by the shapes checker against their captions."""
from __future__ import annotations

from ldm_jax.evaluation import shapes as shapes_checker
from ldm_jax.evaluation.run import Evaluator, Run


def _prompt_accuracy_unavailable(run: Run):
    if run.dataset != "shapes" or run.conditioning != "text":
        return (f"prompt_accuracy scores text-conditional models of the shapes dataset; this run is "
                f"{run.conditioning!r}-conditional on {run.dataset!r}")
    if run.config.data.caption_key != "caption":
        return ("prompt_accuracy parses the shapes captions; this run reads "
                f"data.caption_key={run.config.data.caption_key!r}")
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


EVALUATOR = Evaluator("prompt_accuracy", compute_prompt_accuracy, _prompt_accuracy_unavailable, samples=True,
                      headline="ok")
