"""LoRA fine-tuning of Stable Diffusion 1.5 (Hu et al. 2021) on a folder of your captioned images:
rank-4 adapters (alpha 4, scale 1) on the UNet's attention projections (to_q, to_k, to_v, to_out.0:
797,184 parameters, 0.09% of the UNet's 859.5M), the UNet, the VAE and CLIP ViT-L/14's text tower
loaded frozen from one local diffusers-format SD 1.5 folder (configs/sd15.py's architecture).

    python -m ldm_jax.train --config configs/sd15_lora.py --workdir runs/sd15_lora \\
        --config.lora.base=diffusers:/models/stable-diffusion-v1-5 \\
        --config.autoencoder.source=diffusers:/models/stable-diffusion-v1-5 \\
        --config.text_encoder.source=diffusers:/models/stable-diffusion-v1-5 \\
        --config.data.options.folder=/data/my_images

Only the adapters train and have AdamW moments and an EMA; checkpoints hold them alone (a few MB).
The run ends by writing runs/sd15_lora/lora/pytorch_lora_weights.safetensors, which diffusers'
`pipe.load_lora_weights("runs/sd15_lora/lora")` and ours (`pipe.with_lora(...)`,
`python -m ldm_jax.sample --pretrained /models/stable-diffusion-v1-5 --lora runs/sd15_lora/lora`)
load. Add `--config.lora.text_encoder=True` to adapt the text encoder's attention too. Settings as
diffusers' train_text_to_image_lora.py (learning rate 1e-4, constant, no warm-up) at 512x512, with
bfloat16 activations, rematerialised UNet blocks and attention in chunks of 1024 queries, batch 4:
the step needs 13.7 GiB (XLA's buffer assignment from abstract shapes, benchmarks/results/memory_lora.json:
`python benchmarks/memory.py --sizes sd15 --image_size 512 --dtype bfloat16 --remat --lora 4 --batch 4
--set unet.query_chunk_size=1024`), so it fits a 24 GB GPU; batch 8 needs 21.0 GiB, and whole
[4096 x 4096] attention matrices (no chunks) cost about 7 GiB an image more.
"""
import pathlib

from ldm_jax.config import load_config

SD15_DIR = "~/models/stable-diffusion-v1-5"  # a placeholder: point lora.base and the sources at your copy


def get_config():
    c = load_config(pathlib.Path(__file__).with_name("sd15.py"))
    c.lora.update(enabled=True, base=f"diffusers:{SD15_DIR}", rank=4, alpha=4.0, dropout=0.0, init="kaiming",
                  unet_targets=("to_q", "to_k", "to_v", "to_out.0"), text_encoder=False)
    c.data.update(batch_size=4)
    c.unet.query_chunk_size = 1024  # attention in query chunks: the step fits a 24 GB GPU (see the docstring)
    c.optim.update(lr=1e-4, warmup_steps=0, schedule="constant", weight_decay=1e-2, ema_decay=0.999)
    c.train.update(steps=2_000, log_every=50, checkpoint_every=500, sample_every=500)
    c.eval.splits = ()
    c.mesh.update(data=-1, fsdp=1, shard_params=False)  # the adapters are tiny: replicate everything
    return c
