"""DreamBooth with LoRA on Stable Diffusion 1.5 (Ruiz et al. 2023; as diffusers'
train_dreambooth_lora.py): a few images of one subject, a rare-token instance prompt, and prior
preservation with class images the frozen model draws. First the training folder
(ldm_jax/training/dreambooth.py: instance images captioned with the instance prompt, 200 class
images drawn by SD 1.5 itself for the class prompt):

    python -c "from ldm_jax.training import dreambooth; dreambooth.make_dreambooth_folder(
        '~/data/my_dog', '~/data/my_dog_dreambooth', instance_prompt='a photo of sks dog',
        class_prompt='a photo of a dog', num_class_images=200, pretrained='/models/stable-diffusion-v1-5')"

then:

    python -m ldm_jax.train --config configs/sd15_dreambooth.py --workdir runs/my_dog \\
        --config.lora.base=diffusers:/models/stable-diffusion-v1-5 \\
        --config.autoencoder.source=diffusers:/models/stable-diffusion-v1-5 \\
        --config.text_encoder.source=diffusers:/models/stable-diffusion-v1-5 \\
        --config.data.options.folder=~/data/my_dog_dreambooth \\
        --config.dreambooth.class_prompt="a photo of a dog"

The class images' loss weighs dreambooth.prior_loss_weight (1.0, the paper's lambda); without
prior preservation, leave class_prompt out of both commands. The run's end writes
runs/my_dog/lora/pytorch_lora_weights.safetensors (diffusers' `pipe.load_lora_weights`, or
`python -m ldm_jax.sample --pretrained /models/stable-diffusion-v1-5 --lora runs/my_dog/lora
--prompt "a photo of sks dog on the beach"`). Full DreamBooth (the whole UNet): import the folder
as a workdir, whose first start may still choose its data and the dreambooth keys:

    python -m ldm_jax.convert --from_diffusers /models/stable-diffusion-v1-5 --to_workdir runs/my_dog_full
    python -m ldm_jax.train --config runs/my_dog_full/config.py --workdir runs/my_dog_full \
        --config.data.options.folder=~/data/my_dog_dreambooth --config.data.options.test_fraction=0.0 \
        --config.dreambooth.class_prompt="a photo of a dog" --config.train.steps=800
"""
import pathlib

from ldm_jax.config import load_config


def get_config():
    c = load_config(pathlib.Path(__file__).with_name("sd15_lora.py"))
    c.data.update(batch_size=2, flip=False, options={"folder": "~/data/my_dog_dreambooth", "test_fraction": 0.0})
    c.conditioning.caption_dropout = 0.0  # the instance prompt is the point
    c.dreambooth.update(class_prompt=None, prior_loss_weight=1.0)
    c.optim.update(lr=1e-4, warmup_steps=0, schedule="constant", weight_decay=1e-2, ema_decay=0.0)
    c.train.update(steps=500, log_every=25, checkpoint_every=250, sample_every=250,
                   sample_prompts=("a photo of sks dog", "a photo of sks dog on the beach",
                                   "a watercolor painting of sks dog", "a photo of a dog"))
    return c
