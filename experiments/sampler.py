"""Which sampler, and how many steps? One model, every sampler at 5 to 100 steps.

Question: how does sample quality depend on the sampler and its number of steps? Expected (DDIM,
Song et al. 2021, Table 1; DPM-Solver++, Lu et al. 2022, Fig. 1/Table 2): the deterministic
solvers (ddim, plms, dpm_solver++, euler, heun) are near their best at 20-50 steps, dpm_solver++
at ~20 steps about as good as ddim at ~100; the ancestral ddpm sampler needs many steps (poor at
5-20, its best at 1000).

One training run of configs/base.py (text-conditioned latent diffusion on `shapes`), then each
(sampler, steps) point evaluates prompt accuracy (the shapes checker on 256 `test` captions) and
`shapes_fid` (Fréchet distance in a shapes classifier's features, against real test images).

Expected cost on a 2-core CPU: ~12 minutes of training, ~30 minutes of evaluation.
    python -m ldm_jax.experiments run experiments/sampler.py --root runs/sampler
"""
from ldm_jax.experiments import Sweep, product

BASE = "configs/base.py"


def sweep():
    points = product({"evaluate.sampler": ["ddpm", "ddim", "plms", "dpm_solver++", "euler", "heun"],
                      "evaluate.steps": [5, 10, 20, 50, 100]})
    points.append({"evaluate.sampler": "ddpm", "evaluate.steps": 1000})
    return Sweep(points=points, metrics=["prompt_accuracy", "shapes_fid"],
                 evaluate={"splits": ("test",), "num_samples": 256},
                 columns=["prompt_accuracy/test/ok", "shapes_fid/test/shapes_fid"],
                 x="evaluate.steps", xscale="log")
