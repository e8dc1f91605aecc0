"""clip_score: CLIP image-text similarity of samples and their captions (a local CLIP checkpoint)."""
from __future__ import annotations

import math
import os

import numpy as np

from ldm_jax.evaluation.run import Z_95, Evaluator, Run


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


EVALUATOR = Evaluator("clip_score", compute_clip_score, _clip_unavailable, samples=True, headline="clip_score")
