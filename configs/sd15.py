"""Stable Diffusion 1.5's architecture at 512x512, for TPU / GPU: a 859.5M-parameter UNet
(320/640/1280/1280 channels, 8 heads, context 77x768) on 64x64x4 latents of SD's VAE (f8,
scale 0.18215), conditioned on CLIP ViT-L/14's text tower, both loaded frozen from a local
diffusers-format Stable Diffusion folder; the UNet is trained from scratch, as SD's was, on a
folder of your captioned images (see ldm_jax/data/image_folder.py).

    python -m ldm_jax.train --config configs/sd15.py --workdir runs/sd15 \\
        --config.autoencoder.source=diffusers:/models/stable-diffusion-v1-5 \\
        --config.text_encoder.source=diffusers:/models/stable-diffusion-v1-5 \\
        --config.data.options.folder=/data/my_images

bfloat16 activations, rematerialised UNet blocks, parameters and optimiser state sharded
ZeRO-3 style over `mesh.fsdp` devices (add `--config.mesh.fsdp=8` on a v4-8 or an 8-GPU host;
the rest of the devices split the batch). Sizes (checked by tests/training/test_config.py):
UNet 859,520,964 parameters, VAE 83,653,863, text encoder 123,060,480. For scale: SD 1.x's own
training took about 150,000 A100-hours (its model card) at batch 2,048.
"""
import pathlib

from ldm_jax.config import load_config

SD15_DIR = "~/models/stable-diffusion-v1-5"  # a placeholder: point the sources at your copy


def get_config():
    c = load_config(pathlib.Path(__file__).with_name("base_discrete.py"))
    c.stages = ("ldm",)
    c.data.update(name="image_folder", image_size=512, batch_size=32, flip=True, num_workers=8,
                  options={"folder": "~/data/images"})

    c.autoencoder.update(kind="kl", source=f"diffusers:{SD15_DIR}", scale_factor=0.18215)
    c.autoencoder.model = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                               latent_channels=4, norm_num_groups=32, mid_block_add_attention=True)

    c.text_encoder.update(source=f"diffusers:{SD15_DIR}", train=False, max_length=77)
    c.text_encoder.model = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                num_hidden_layers=12, num_attention_heads=12,
                                max_position_embeddings=77, hidden_act="quick_gelu")

    c.unet = dict(
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        num_attention_heads=8, cross_attention_dim=768, norm_num_groups=32, dropout=0.0,
    )
    c.conditioning.update(kind="text", caption_dropout=0.1)
    c.diffusion.update(schedule="scaled_linear", num_timesteps=1000, objective="simple",
                       prediction="eps", variance="fixed_small", weighting="none")
    c.sampler.update(name="ddim", num_steps=50, guidance_scale=7.5, spacing="leading")
    c.optim.update(lr=1e-4, warmup_steps=10_000, weight_decay=0.01, ema_decay=0.9999)
    c.train.update(steps=100_000, log_every=100, checkpoint_every=2_000, sample_every=5_000,
                   dtype="bfloat16", remat=True,
                   sample_prompts=("a photograph of an astronaut riding a horse",
                                   "a watercolor painting of a lighthouse at dawn",
                                   "a red bicycle leaning against a brick wall",
                                   "a bowl of ramen, studio lighting"))
    c.eval.splits = ("test",)
    c.eval.num_samples = 64
    c.mesh.update(data=-1, fsdp=1, shard_params=True)
    return c
