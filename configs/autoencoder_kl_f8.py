"""Stage 1 alone: an f8 KL autoencoder (LDM's "KL-f8": 64x64x3 -> 8x8x4) on 64x64 `shapes`, with
the PatchGAN switched on half-way.

    python -m ldm_jax.train --config configs/autoencoder_kl_f8.py --workdir runs/autoencoder_kl_f8

Four levels (64, 32, 16, 8 pixels), as SD's VAE but narrower. The loss is LDM's: L1
reconstruction, KL weight 1e-6, and from step 3,000 of 6,000 a hinge PatchGAN with the adaptive
weight (x 0.5). At the end, test captions are rendered, reconstructed and judged by the shapes
checker: `autoencoder/recon_*` (the fraction whose shape, colour and position survive) and a grid
of originals over reconstructions (`autoencoder/reconstructions`) in TensorBoard
(runs/autoencoder_kl_f8). Stage 2 can use the result with
`autoencoder.source="workdir:runs/autoencoder_kl_f8"` and `data.image_size=64`.
"""
import pathlib

from ldm_jax.config import load_config


def get_config():
    c = load_config(pathlib.Path(__file__).with_name("base.py"))
    c.stages = ("autoencoder",)
    c.data.image_size = 64
    c.data.batch_size = 32

    ae = c.autoencoder
    ae.model = dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2, latent_channels=4,
                    norm_num_groups=32, mid_block_add_attention=True)
    ae.steps = 6_000
    ae.batch_size = 32
    ae.kl_weight = 1e-6
    ae.disc_start = 3_000
    ae.disc_weight = 0.5
    ae.disc = dict(n_layers=2, base_channels=64)  # each logit sees a 34x34 patch of the 64x64 image
    ae.optim.lr = 5e-4
    ae.disc_optim.lr = 5e-4
    return c
