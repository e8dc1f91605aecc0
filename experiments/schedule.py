"""Noise schedules: linear, cosine, scaled_linear, sigmoid, and zero-terminal-SNR with v-prediction.

Question: does the forward process's noise schedule matter at a fixed budget? Expected (Improved
DDPM, Nichol & Dhariwal 2021, sec. 3.2 / Fig. 5-6): at low resolution the cosine schedule beats
DDPM's linear one, whose last quarter of steps is nearly pure noise; Lin et al. 2024 (Common
Diffusion Noise Schedules and Sample Steps are Flawed): rescaling to zero terminal SNR needs
v-prediction and fixes the train/test mismatch at t = T; the sigmoid schedule (Jabri et al.
2023) sits between. Here the latents are 8x8x4, a very low resolution.

Latent diffusion on `shapes` from configs/base.py: one autoencoder trained once and shared, five
diffusion runs of 1200 steps, each sampled with two timestep spacings (trailing, the base config's,
and leading). Metrics: bits per latent dimension (comparable across points: the same autoencoder
gives the same latents), prompt accuracy (256 `test` captions), `shapes_fid`.

Expected cost on a 2-core CPU: ~5 minutes (autoencoder) + 5 x ~6 minutes of training + 10 x ~2.5
minutes of evaluation.
    python -m ldm_jax.experiments run experiments/schedule.py --root runs/schedule
"""
from ldm_jax.experiments import Sweep, cross, zip_

BASE = "configs/base.py"


def sweep():
    schedules = zip_({"diffusion.schedule": ["linear", "cosine", "scaled_linear", "sigmoid", "scaled_linear"],
                      "diffusion.zero_terminal_snr": [False, False, False, False, True],
                      "diffusion.prediction": ["eps", "eps", "eps", "eps", "v"]})
    # Each model is sampled twice: with the base config's "trailing" spacing (the first step at
    # t = T - 1, as Lin et al. recommend) and with "leading" (the first step at t = T - T/N).
    return Sweep(points=cross(schedules, [{}, {"evaluate.spacing": "leading"}]),
                 metrics=["bpd", "prompt_accuracy", "shapes_fid"],
                 common={"train.steps": 1200, "train.sample_every": 100000},
                 evaluate={"splits": ("test",), "num_samples": 256, "bpd_examples": 64},
                 share_autoencoder=True,
                 columns=["bpd/total", "prompt_accuracy/test/ok", "shapes_fid/test/shapes_fid"])
