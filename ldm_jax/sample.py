"""python -m ldm_jax.sample --workdir runs/base --prompt "a red circle on the left" --out out/

Generates images from a training run (`--workdir`, its latest checkpoint's EMA weights unless
`--checkpoint_step` / `--noema`) or a local diffusers-format Stable Diffusion folder
(`--pretrained`, as downloaded: `--variant fp16` for its *.fp16.safetensors, sharded weights):
text -> image, image -> image with `--init_image` (and `--strength`), or inpainting with
`--init_image` and `--mask` (white = repaint). Writes one PNG per image, a grid
PNG, and a JSON sidecar per image with everything needed to regenerate it, including the command
(image i uses seed + i, so it can be regenerated on its own). Bad input fails with one line on
stderr and exit status 1.

    python -m ldm_jax.sample --workdir runs/base --prompt "a red circle" --prompt "a blue square" \\
        --num_images 4 --sampler dpm_solver++ --steps 20 --guidance 3 --seed 0 --out out/
"""
from __future__ import annotations

import dataclasses
import sys

from absl import app, flags
from absl import logging as absl_logging

from ldm_jax.sample_job import SampleArgs, SampleError, args_from_sidecar, generate  # noqa: F401 (the library)

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined by __main__ only, so that the library functions import
    alongside other CLIs' flags)."""
    flags.DEFINE_string("workdir", None, "a training run to sample from (python -m ldm_jax.train's --workdir)")
    flags.DEFINE_string("pretrained", None, "a local diffusers-format Stable Diffusion folder, instead of --workdir")
    flags.DEFINE_string("variant", None, "--pretrained's weights variant, e.g. fp16 for *.fp16.safetensors (default: "
                        "the plain files, or the folder's only variant)")
    flags.DEFINE_integer("checkpoint_step", None, "the run's checkpoint step to load (default: the latest)")
    flags.DEFINE_bool("ema", True, "use the run's EMA parameters (--noema: the raw ones)")
    flags.DEFINE_multi_string("prompt", [], "a prompt (repeatable)")
    flags.DEFINE_string("prompts_file", None, "a text file with one prompt per line (blank lines skipped)")
    flags.DEFINE_multi_integer("label", [], "a class label (repeatable), for class-conditional runs")
    flags.DEFINE_string("negative_prompt", None, "the negative prompt for classifier-free guidance (default: empty)")
    flags.DEFINE_integer("num_images", 1, "images per prompt")
    flags.DEFINE_string("sampler", None, "ddpm | ddim | plms | dpm_solver++ | euler | heun | edm | unipc, or scheduler "
                        "(a --pretrained folder's own diffusers scheduler; its default)")
    flags.DEFINE_integer("steps", None, "sampler steps (default: the model's)")
    flags.DEFINE_float("guidance", None, "classifier-free guidance scale, >= 0 (1: none; default: the model's)")
    flags.DEFINE_float("guidance_rescale", None, "guidance rescale phi in [0, 1] (Lin et al. 2023)")
    flags.DEFINE_float("eta", None, "DDIM eta (0: deterministic)")
    flags.DEFINE_integer("seed", 0, "image i uses seed + i")
    flags.DEFINE_integer("height", None, "image height in pixels (default: the model's; resizes --init_image)")
    flags.DEFINE_integer("width", None, "image width in pixels (default: the model's; resizes --init_image)")
    flags.DEFINE_string("init_image", None, "an image to start from (image -> image, or inpainting with --mask)")
    flags.DEFINE_float("strength", None, "image -> image: how far to noise --init_image, in [0, 1] (default 0.8; "
                       "inpainting: 1.0)")
    flags.DEFINE_string("mask", None, "inpainting mask, the size of --init_image: white = repaint")
    flags.DEFINE_integer("batch_size", 8, "images per compiled batch")
    flags.DEFINE_bool("progress", True, "show a progress bar over the sampler steps")
    flags.DEFINE_string("out", None, "output folder")
    flags.DEFINE_string("lora", None, "a LoRA merged into the model: a diffusers / peft or kohya .safetensors file, or "
                        "a folder holding pytorch_lora_weights.safetensors")
    flags.DEFINE_float("lora_scale", 1.0, "the LoRA's weight (diffusers' cross_attention_kwargs scale)")


def main(argv):
    if not FLAGS["verbosity"].present:  # orbax and jax log every step at INFO
        absl_logging.set_verbosity(absl_logging.WARNING)
    args = SampleArgs(**{f.name: FLAGS[f.name].value for f in dataclasses.fields(SampleArgs)})
    try:
        if len(argv) > 1:
            raise SampleError(f"unexpected arguments: {' '.join(argv[1:])} (every input is a flag, e.g. --prompt)")
        from ldm_jax.runtime.compilation_cache import enable_compilation_cache

        enable_compilation_cache()  # as train and evaluate: a second run with the same shapes does not recompile
        paths = generate(args)
    except SampleError as e:
        print(f"ldm_jax.sample: error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {len(paths)} images, their .json sidecars and grid.png to {args.out}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
