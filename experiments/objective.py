"""Training objective in pixel space: L_simple vs the variational bound vs hybrid.

Question: what does the objective buy, in likelihood and in samples? Expected (Ho et al. 2020,
Table 2: L_simple gives the best samples, the true bound the better log-likelihood; Nichol &
Dhariwal 2021, Table 1-2 / sec. 3.1-3.3: learning the variance with L_hybrid gets close to
L_vlb's bits/dim while keeping L_simple's sample quality; L_vlb alone is noisy and wants
importance sampling of t).

Unconditional pixel-space diffusion on `shapes` (configs/pixel_ddpm.py: identity autoencoder,
cosine schedule, discretized Gaussian decoder), shrunk for the CPU: 16x16 images, a two-level
(32, 64) UNet with attention at 8x8, batch 32, 2000 steps. Points: `hybrid` (L_simple + 0.001
L_vlb, learned variance: configs/pixel_ddpm.py's own objective), `simple` with fixed (large)
variance, `vlb` with learned variance and importance-sampled t. Metrics: bits/dim (all 1000
terms, 64 test images) and `shapes_fid` of 100-step ancestral samples.

Expected cost on a 2-core CPU: 3 x ~15 minutes.
    python -m ldm_jax.experiments run experiments/objective.py --root runs/objective
"""
from ldm_jax.experiments import Sweep, zip_

BASE = "configs/pixel_ddpm.py"


def sweep():
    return Sweep(points=zip_({"diffusion.objective": ["hybrid", "simple", "vlb"],
                              "diffusion.variance": ["learned_range", "fixed_large", "learned_range"],
                              "diffusion.timestep_sampler": ["uniform", "uniform", "importance"]}),
                 metrics=["bpd", "shapes_fid"],
                 common={"data.image_size": 16, "data.batch_size": 32,
                         "unet.block_out_channels": (32, 64), "unet.layers_per_block": 1,
                         "unet.down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
                         "unet.up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "unet.dropout": 0.0,
                         "train.steps": 2000, "optim.lr": 5e-4, "train.sample_every": 100000},
                 evaluate={"splits": ("test",), "num_samples": 256, "bpd_examples": 64},
                 columns=["bpd/total", "bpd/prior", "bpd/decoder", "shapes_fid/test/shapes_fid"])
