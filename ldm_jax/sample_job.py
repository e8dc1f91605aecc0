"""The sample command's library: `generate(SampleArgs(...))` writes images, their JSON sidecars and a
grid (see `python -m ldm_jax.sample --help`); `args_from_sidecar` regenerates one image alone.
Bad input raises `SampleError` (one line) before anything compiles."""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os

# An --init_image larger than this many times the model's image size (per side) is refused unless
# --height / --width say the size to sample at: sampling a photo at its own resolution with a
# model trained at 32 or 512 pixels runs out of memory (attention is quadratic in the pixels).
MAX_INIT_SCALE = 4


class SampleError(ValueError):
    """Bad input: reported as one line."""


@dataclasses.dataclass
class SampleArgs:
    """`python -m ldm_jax.sample`'s flags (see the flag help); `generate(args)` runs them."""

    out: str
    workdir: str | None = None
    pretrained: str | None = None
    variant: str | None = None
    checkpoint_step: int | None = None
    ema: bool = True
    prompt: list = dataclasses.field(default_factory=list)
    prompts_file: str | None = None
    label: list = dataclasses.field(default_factory=list)
    negative_prompt: str | None = None
    num_images: int = 1
    sampler: str | None = None
    steps: int | None = None
    guidance: float | None = None
    guidance_rescale: float | None = None
    eta: float | None = None
    seed: int = 0
    height: int | None = None
    width: int | None = None
    init_image: str | None = None
    strength: float | None = None
    mask: str | None = None
    batch_size: int = 8
    progress: bool = True
    lora: str | None = None  # a LoRA file or folder merged into the model (`LatentDiffusionPipeline.with_lora`)
    lora_scale: float = 1.0


def _conditions(args: SampleArgs) -> list:
    """The prompts (or labels), each repeated num_images times, prompt-major."""
    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                prompts += [line.strip() for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise SampleError(f"cannot read --prompts_file {args.prompts_file}: {e}") from None
    if prompts and args.label:
        raise SampleError("give prompts (--prompt / --prompts_file) or class labels (--label), not both")
    conds = prompts or list(args.label)
    if not conds:
        raise SampleError("the prompt list is empty: give --prompt (repeatable), --prompts_file or --label")
    if args.num_images < 1:
        raise SampleError(f"--num_images must be >= 1, got {args.num_images}")
    return [c for c in conds for _ in range(args.num_images)]


def _check_flags(args: SampleArgs) -> None:
    """Everything that can be judged before loading a model."""
    from ldm_jax.diffusion import samplers

    if bool(args.workdir) == bool(args.pretrained):
        raise SampleError("give exactly one of --workdir (a training run) and --pretrained (a diffusers folder)")
    if args.variant and not args.pretrained:
        raise SampleError("--variant names the weights files of a --pretrained folder (e.g. fp16)")
    if not args.out:
        raise SampleError("--out (the output folder) is required")
    if args.sampler == "scheduler" and not args.pretrained:  # what a --pretrained folder's sidecars say
        raise SampleError("--sampler scheduler runs a --pretrained folder's own diffusers scheduler; a --workdir "
                          f"run takes one of {', '.join(samplers.SAMPLERS)}")
    if args.sampler not in (None, "scheduler", *samplers.SAMPLERS):
        raise SampleError(f"unknown sampler {args.sampler!r}; allowed: {', '.join(samplers.SAMPLERS)}, or "
                          "scheduler (a --pretrained folder's own)")
    if args.steps is not None and args.steps < 1:
        raise SampleError(f"--steps must be >= 1, got {args.steps}")
    if args.guidance is not None and not args.guidance >= 0:
        raise SampleError(f"--guidance must be >= 0, got {args.guidance}")
    if args.guidance_rescale is not None and not 0 <= args.guidance_rescale <= 1:
        raise SampleError(f"--guidance_rescale must be in [0, 1], got {args.guidance_rescale}")
    if args.eta is not None and not args.eta >= 0:
        raise SampleError(f"--eta must be >= 0, got {args.eta}")
    if args.strength is not None and not 0 <= args.strength <= 1:
        raise SampleError(f"--strength must be in [0, 1], got {args.strength}")
    if args.mask and not args.init_image:
        raise SampleError("--mask needs --init_image (the image to inpaint)")
    for key in ("height", "width"):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise SampleError(f"--{key} must be positive, got {value}")
    if args.batch_size < 1:
        raise SampleError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.lora_scale != 1.0 and not args.lora:
        raise SampleError("--lora_scale weighs a --lora; give the LoRA file too")
    if not math.isfinite(args.lora_scale):
        raise SampleError(f"--lora_scale must be a finite number, got {args.lora_scale}")


def _read_image(path: str, what: str, mode: str):
    """uint8 [H, W, 3] (mode "RGB") or [H, W] (mode "L"), read as the datasets read images
    (`ldm_jax.data.image_files`: EXIF orientation, 16-bit scaled, transparency onto white)."""
    from ldm_jax.data import image_files

    try:
        return image_files.read_rgb(path) if mode == "RGB" else image_files.read_grey(path)
    except image_files.UNREADABLE as e:
        raise SampleError(f"cannot read {what} {path}: {e}") from None


def _images_and_mask(args: SampleArgs):
    """(init image uint8 [H, W, 3] or None, mask uint8 [H, W] or None), resized to --height/--width."""
    import PIL.Image

    if not args.init_image:
        return None, None
    image = _read_image(args.init_image, "--init_image", "RGB")
    mask = _read_image(args.mask, "--mask", "L") if args.mask else None
    if mask is not None and mask.shape != image.shape[:2]:
        raise SampleError(f"--mask is {mask.shape[1]}x{mask.shape[0]} but --init_image is "
                          f"{image.shape[1]}x{image.shape[0]} (width x height); they must match")
    size = (args.width or image.shape[1], args.height or image.shape[0])
    if size != (image.shape[1], image.shape[0]):
        import numpy as np

        image = np.asarray(PIL.Image.fromarray(image).resize(size, PIL.Image.LANCZOS))
        if mask is not None:
            mask = np.asarray(PIL.Image.fromarray(mask).resize(size, PIL.Image.NEAREST))
    return image, mask


def load_pipeline(args: SampleArgs):
    """The model `args` name. The last one loaded is kept, so that repeated calls in one process
    (a notebook, the tests) reuse its compiled programs; `--checkpoint_step` is resolved first."""
    from ldm_jax.runs import workdir

    try:
        if args.workdir:
            step = args.checkpoint_step
            if step is None:
                workdir.load_workdir_config(args.workdir)  # the clearer errors first
                steps = workdir.checkpoint_steps(args.workdir, "ldm")
                step = steps[-1] if steps else None
            pipe = _load(("workdir", os.path.abspath(args.workdir), step, bool(args.ema)))
        else:
            pipe = _load(("pretrained", os.path.abspath(args.pretrained), args.variant, True))
        if args.lora:  # merged into a copy: the cached pipeline stays the base model
            pipe = pipe.with_lora(args.lora, args.lora_scale)
    except (FileNotFoundError, ValueError) as e:
        raise SampleError(str(e)) from None
    pipe.progress = args.progress
    return pipe


@functools.lru_cache(maxsize=1)
def _load(key):
    from ldm_jax.pipeline import LatentDiffusionPipeline

    kind, path, step_or_variant, ema = key
    if kind == "workdir":
        return LatentDiffusionPipeline.from_workdir(path, step=step_or_variant, ema=ema)
    return LatentDiffusionPipeline.from_diffusers_dir(path, variant=step_or_variant)


def _reproduce_command(args: SampleArgs, cond, seed: int, pipe, settings: dict) -> list[str]:
    """The command that regenerates one image on its own."""
    cmd = ["python", "-m", "ldm_jax.sample"]
    if args.workdir:
        cmd += ["--workdir", pipe.info["path"], "--checkpoint_step", str(pipe.info["step"])]
        cmd += [] if args.ema else ["--noema"]
    else:
        cmd += ["--pretrained", pipe.info["path"]]
        cmd += ["--variant", pipe.info["variant"]] if pipe.info.get("variant") else []
    cmd += ["--label", str(cond)] if isinstance(cond, int) else ["--prompt", cond]
    if args.negative_prompt is not None:
        cmd += ["--negative_prompt", args.negative_prompt]
    cmd += ["--seed", str(seed), "--num_images", "1", "--sampler", settings["sampler"],
            "--steps", str(settings["steps"]),
            "--guidance", repr(settings["guidance"]), "--guidance_rescale", repr(settings["guidance_rescale"]),
            "--eta", repr(settings["eta"]), "--height", str(settings["height"]), "--width", str(settings["width"])]
    if args.init_image:
        cmd += ["--init_image", os.path.abspath(args.init_image), "--strength", repr(settings["strength"])]
    if args.mask:
        cmd += ["--mask", os.path.abspath(args.mask)]
    if args.lora:
        cmd += ["--lora", os.path.abspath(args.lora), "--lora_scale", repr(float(args.lora_scale))]
    return cmd + ["--out", "<folder>"]


def generate(args: SampleArgs) -> list[str]:
    """Run `args`: write `<out>/NNNN.png` + `<out>/NNNN.json` per image and `<out>/grid.png`;
    returns the image paths. Raises SampleError (one line) for bad input, before compiling."""
    import numpy as np

    from ldm_jax.runs.writer import image_grid, save_png

    _check_flags(args)
    conds = _conditions(args)
    image, mask = _images_and_mask(args)
    pipe = load_pipeline(args)
    task = "inpaint" if mask is not None else "image" if image is not None else "text"
    if image is not None and args.height is None and args.width is None and (
            max(image.shape[:2]) > MAX_INIT_SCALE * pipe.default_size):
        raise SampleError(
            f"--init_image {args.init_image} is {image.shape[1]}x{image.shape[0]}, more than {MAX_INIT_SCALE}x this "
            f"model's {pipe.default_size}x{pipe.default_size} images: give --height and --width to resize it "
            f"(e.g. --height {pipe.default_size} --width {pipe.default_size})")
    height = image.shape[0] if image is not None else (args.height or pipe.default_size)
    width = image.shape[1] if image is not None else (args.width or pipe.default_size)
    try:
        pipe.check_size(height, width)
    except ValueError as e:
        raise SampleError(f"{e} (--height / --width)") from None
    d = pipe.defaults
    pick = lambda value, default: default if value is None else value  # noqa: E731
    settings = dict(sampler=pick(args.sampler, d.sampler), steps=pick(args.steps, d.num_steps),
                    guidance=float(pick(args.guidance, d.guidance_scale)),
                    guidance_rescale=float(pick(args.guidance_rescale, d.guidance_rescale)),
                    eta=float(pick(args.eta, d.eta)), height=int(height), width=int(width),
                    strength=float(pick(args.strength, 1.0 if task == "inpaint" else 0.8)))
    seeds = [args.seed + i for i in range(len(conds))]
    batch = min(args.batch_size, len(conds))
    images = []
    for start in range(0, len(conds), batch):
        chunk, chunk_seeds = conds[start:start + batch], seeds[start:start + batch]
        n = len(chunk)  # pad the last chunk: one compiled batch shape (image i depends on seed i only)
        chunk, chunk_seeds = chunk + chunk[-1:] * (batch - n), chunk_seeds + chunk_seeds[-1:] * (batch - n)
        kw = dict(negative_prompts=args.negative_prompt, num_steps=settings["steps"],
                  guidance_scale=settings["guidance"], guidance_rescale=settings["guidance_rescale"],
                  sampler=settings["sampler"], eta=settings["eta"], seed=chunk_seeds)
        try:
            if task == "text":
                out = pipe.text_to_image(chunk, height=height, width=width, **kw)
            elif task == "image":
                out = pipe.image_to_image(image[None], chunk, strength=settings["strength"], **kw)
            else:
                out = pipe.inpaint(image[None], mask[None], chunk, strength=settings["strength"], **kw)
        except ValueError as e:
            raise SampleError(str(e)) from None
        images.append(out[:n])
    images = np.concatenate(images)

    os.makedirs(args.out, exist_ok=True)
    paths = []
    model = {k: v for k, v in pipe.info.items() if k != "kind"}
    model = {("workdir" if pipe.info.get("kind") == "workdir" else "pretrained"): model.pop("path"), **model}
    if "step" in model:
        model["checkpoint_step"] = model.pop("step")
    for k, (cond, seed, im) in enumerate(zip(conds, seeds, images)):
        path = os.path.join(args.out, f"{k:04d}.png")
        save_png(path, im)
        sidecar = {"image": os.path.basename(path), ("label" if isinstance(cond, int) else "prompt"): cond,
                   "negative_prompt": args.negative_prompt, "seed": seed, "task": task, **settings,
                   "init_image": os.path.abspath(args.init_image) if args.init_image else None,
                   "mask": os.path.abspath(args.mask) if args.mask else None, "model": model,
                   "command": _reproduce_command(args, cond, seed, pipe, settings)}
        if task == "text":
            del sidecar["strength"]
        with open(os.path.join(args.out, f"{k:04d}.json"), "w", encoding="utf-8") as f:
            json.dump(sidecar, f, indent=1)
        paths.append(path)
    per_prompt = args.num_images if args.num_images > 1 and len(conds) > args.num_images else None
    cols = per_prompt or math.ceil(math.sqrt(len(images)))
    save_png(os.path.join(args.out, "grid.png"), image_grid(images, cols=cols))
    return paths


def args_from_sidecar(sidecar: dict, out: str) -> SampleArgs:
    """The arguments that regenerate the image a sidecar describes, alone, into `out`."""
    model = sidecar["model"]
    return SampleArgs(
        out=out, workdir=model.get("workdir"), pretrained=model.get("pretrained"), variant=model.get("variant"),
        checkpoint_step=model.get("checkpoint_step"), ema=model.get("ema", True),
        prompt=[sidecar["prompt"]] if "prompt" in sidecar else [],
        label=[sidecar["label"]] if "label" in sidecar else [],
        negative_prompt=sidecar["negative_prompt"], seed=sidecar["seed"], sampler=sidecar["sampler"],
        steps=sidecar["steps"], guidance=sidecar["guidance"], guidance_rescale=sidecar["guidance_rescale"],
        eta=sidecar["eta"], height=sidecar["height"], width=sidecar["width"], init_image=sidecar["init_image"],
        strength=sidecar.get("strength"), mask=sidecar["mask"], progress=False,
        lora=model["lora"][0]["path"] if model.get("lora") else None,
        lora_scale=model["lora"][0]["scale"] if model.get("lora") else 1.0)
