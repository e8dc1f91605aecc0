"""DreamBooth (Ruiz et al. 2023, "DreamBooth: Fine Tuning Text-to-Image Diffusion Models for
Subject-Driven Generation"): the training folder for fine-tuning an imported Stable Diffusion folder,
with LoRA (configs/sd15_dreambooth.py) or fully (a `convert --from_diffusers` workdir), on a few
images of one subject, with optional prior preservation.

    from ldm_jax.training import dreambooth
    dreambooth.make_dreambooth_folder("~/data/my_dog", "~/data/my_dog_dreambooth",
                                      instance_prompt="a photo of sks dog", class_prompt="a photo of a dog",
                                      num_class_images=200, pretrained="/models/stable-diffusion-v1-5")

The folder is an `image_folder` dataset (ldm_jax/data/image_folder.py): ``instance/`` holds the
subject's images, each copied `repeats` times so that a uniformly drawn example is as often an
instance image as a class image (DreamBooth pairs one of each per step), ``class/`` the
prior-preservation images the frozen model draws for the class prompt, and ``captions.jsonl``
captions every file with its prompt. The step recognises the class images by their caption
(`ldm_stage.example_weights`) and weighs their loss by ``dreambooth.prior_loss_weight`` (eq. 2's
lambda). Class images already in ``class/`` are kept (a rerun draws only the missing ones, as
diffusers' script does), so an interrupted preparation resumes.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from typing import Callable

import numpy as np

from ldm_jax.data.image_folder import CAPTIONS_JSONL, IMAGE_SUFFIXES

INSTANCE, CLASS = "instance", "class"


def _images(folder: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if os.path.splitext(n)[1].lower() in IMAGE_SUFFIXES)


def _prompt(name: str, value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name}={value!r} must be a non-empty prompt")
    return value.strip()


def pipeline_generator(pretrained: str, *, num_steps: int = 50, guidance_scale: float = 7.5) -> Callable:
    """generate(prompts, seeds) -> uint8 [B, H, W, 3]: the frozen folder's own text-to-image (its
    scheduler, at `num_steps` and `guidance_scale`), for the class images."""
    from ldm_jax.pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_diffusers_dir(pretrained)

    def generate(prompts, seeds):
        return pipe.text_to_image(list(prompts), seed=list(seeds), num_steps=num_steps, guidance_scale=guidance_scale)

    return generate


def make_dreambooth_folder(instance_dir: str, out: str, *, instance_prompt: str, class_prompt: str | None = None,
                           num_class_images: int = 100, pretrained: str | None = None,
                           generate: Callable | None = None, batch_size: int = 4, seed: int = 0) -> str:
    """Write the DreamBooth training folder `out` (see the module docstring) and return its path.

    instance_dir: the subject's images. class_prompt: None for no prior preservation; else
    `num_class_images` class images are drawn (seeds seed, seed + 1, ...; `batch_size` a call) by
    `generate(prompts, seeds)`, by default the frozen model of the diffusers folder `pretrained`
    (`pipeline_generator`). ValueError naming the argument for anything that cannot work."""
    from PIL import Image

    instance_dir = os.path.abspath(os.path.expanduser(instance_dir))
    out = os.path.abspath(os.path.expanduser(out))
    instance_prompt = _prompt("instance_prompt", instance_prompt)
    if not os.path.isdir(instance_dir):
        raise ValueError(f"instance_dir {instance_dir} is not a folder")
    instances = _images(instance_dir)
    if not instances:
        raise ValueError(f"instance_dir {instance_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if out == instance_dir or out.startswith(instance_dir + os.sep):
        raise ValueError(f"out {out} must be outside instance_dir {instance_dir}")
    if class_prompt is not None:
        class_prompt = _prompt("class_prompt", class_prompt)
        if class_prompt == instance_prompt:
            raise ValueError("class_prompt must differ from instance_prompt: the step tells class images by it")
        if isinstance(num_class_images, bool) or not isinstance(num_class_images, int) or num_class_images < 1:
            raise ValueError(f"num_class_images={num_class_images!r} must be a positive integer")
        if generate is None and pretrained is None:
            raise ValueError("class_prompt needs the frozen model that draws the class images: give pretrained "
                             "(a diffusers folder) or generate")

    captions = []
    # Instance images, repeated so that they are drawn as often as the class images.
    repeats = max(1, math.ceil(num_class_images / len(instances))) if class_prompt is not None else 1
    os.makedirs(os.path.join(out, INSTANCE), exist_ok=True)
    for name in instances:
        stem, suffix = os.path.splitext(name)
        for r in range(repeats):
            file = os.path.join(INSTANCE, name if repeats == 1 else f"{stem}_{r:03d}{suffix}")
            shutil.copyfile(os.path.join(instance_dir, name), os.path.join(out, file))
            captions.append({"file": file, "text": instance_prompt})

    # Class images: the ones there already are kept; the rest drawn by the frozen model.
    if class_prompt is not None:
        class_dir = os.path.join(out, CLASS)
        os.makedirs(class_dir, exist_ok=True)
        names = [f"{i:05d}.png" for i in range(num_class_images)]
        missing = [i for i, n in enumerate(names) if not os.path.isfile(os.path.join(class_dir, n))]
        if missing and generate is None:
            generate = pipeline_generator(pretrained)
        for start in range(0, len(missing), batch_size):
            idx = missing[start:start + batch_size]
            images = np.asarray(generate([class_prompt] * len(idx), [seed + i for i in idx]))
            for i, image in zip(idx, images):
                tmp = os.path.join(class_dir, f".{names[i]}.tmp")
                Image.fromarray(image).save(tmp, format="PNG")
                os.replace(tmp, os.path.join(class_dir, names[i]))  # never a half-written image
        captions += [{"file": os.path.join(CLASS, n), "text": class_prompt} for n in names]

    tmp = os.path.join(out, f".{CAPTIONS_JSONL}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(c) + "\n" for c in captions)
    os.replace(tmp, os.path.join(out, CAPTIONS_JSONL))
    return out
