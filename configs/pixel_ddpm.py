"""Unconditional pixel-space diffusion, the Improved DDPM setting, for bits/dim on `shapes`.

    python -m ldm_jax.train --config configs/pixel_ddpm.py --workdir runs/pixel_ddpm

No autoencoder (autoencoder.kind="identity": the UNet sees 32x32x3 pixels in [-1, 1]) and no
condition. Cosine schedule (Improved DDPM eq. 17), the hybrid objective L_simple + 0.001 L_vlb
with a learned interpolated variance (eq. 15; the UNet outputs 6 channels: eps and v), so the
model has a likelihood: the metric `ldm/vb` is the bound's one-sample estimate in bits/dim, whose
t = 0 term for 8-bit pixels is the discretized Gaussian decoder
(`ldm_jax.config.likelihood_decoder`). Samples use the ancestral DDPM sampler on 100
evenly spaced steps, which the learned variance makes workable.

Ablations (each a key): `diffusion.schedule=linear` (DDPM), `diffusion.objective=simple` with
`diffusion.variance=fixed_large` (DDPM's L_simple), `diffusion.objective=vlb` with
`diffusion.timestep_sampler=importance` (Improved DDPM sec. 3.3, the lowest bits/dim).
Published reference points are CIFAR-10's (DDPM's L_simple 3.75 bits/dim, Improved DDPM's L_vlb
2.94); shapes images are far simpler, so expect far fewer bits/dim: the objective sweep's shrunk
version of this config (16x16, 2000 steps) measured 1.97-2.27 (experiments/results/objective.csv).
"""
import pathlib

from ldm_jax.config import load_config


def get_config():
    c = load_config(pathlib.Path(__file__).with_name("base_discrete.py"))
    c.stages = ("ldm",)
    c.autoencoder.kind = "identity"
    c.conditioning.kind = "none"
    c.conditioning.caption_dropout = 0.0

    # Three levels (32, 16, 8) with attention at 16x16 and 8x8, as Improved DDPM's CIFAR model.
    c.unet = dict(
        block_out_channels=(64, 128, 128), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        num_attention_heads=4, cross_attention_dim=128, norm_num_groups=32, dropout=0.1,
    )
    c.diffusion.schedule = "cosine"
    c.diffusion.objective = "hybrid"
    c.diffusion.variance = "learned_range"
    c.diffusion.weighting = "none"
    c.diffusion.timestep_sampler = "uniform"

    c.sampler.name = "ddpm"
    c.sampler.num_steps = 100
    c.sampler.spacing = "linspace"
    c.sampler.guidance_scale = 1.0  # nothing to guide with

    c.optim.lr = 1e-4  # Improved DDPM
    c.train.steps = 10_000
    return c
