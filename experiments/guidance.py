"""Classifier-free guidance scale: prompt accuracy against sample diversity.

Question: how does the guidance scale w trade prompt adherence for diversity? Expected
(Ho & Salimans 2022, Fig. 1/Table 1: IS rises and FID first falls then rises with w; Saharia et
al. 2022): accuracy rises from w = 1 (no guidance) and saturates, while the diversity of samples
for one prompt falls as w grows; very high w over-saturates and starts to hurt.

One training run of configs/base.py; each point samples with 20-step DPM-Solver++ at one scale.
Metrics: prompt accuracy (256 captions each of `test` and `heldout`) and `diversity` (mean
pairwise feature distance of several samples per caption, relative to real images' own).

Expected cost on a 2-core CPU: ~12 minutes of training, ~10 minutes of evaluation.
    python -m ldm_jax.experiments run experiments/guidance.py --root runs/guidance
"""
from ldm_jax.experiments import Sweep, product

BASE = "configs/base.py"


def sweep():
    return Sweep(points=product({"evaluate.guidance": [1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0]}),
                 metrics=["prompt_accuracy", "diversity"],
                 evaluate={"num_samples": 256},
                 columns=["prompt_accuracy/test/ok", "prompt_accuracy/heldout/ok", "diversity/test/diversity_ratio"],
                 x="evaluate.guidance")
