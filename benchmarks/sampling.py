"""Text -> image with classifier-free guidance: ldm_jax's LatentDiffusionPipeline against diffusers'
StableDiffusionPipeline (PyTorch), float32 on CPU, same weights, same initial latents.

    python benchmarks/sampling.py [--sizes tiny,small] [--samplers ddim,dpm_solver++] [--num_steps 20,50]
                                  [--batch N] [--guidance 7.5] [--repeats 3]

For each size (`common.size_config`: its UNet, autoencoder and text encoder architectures, random
weights) the script builds a diffusers StableDiffusionPipeline, saves it as a diffusers folder in a
temporary directory and loads that with `LatentDiffusionPipeline.from_diffusers_dir`, so both
sides hold the same weights. Each (sampler, steps) pair then runs on both sides with the same
prompts and initial latents, the schedulers set up as in tests/test_pipeline.py's parity test
(DDIM: leading spacing, steps_offset 1; DPM-Solver++: 2nd order, trailing spacing); the images'
max difference is recorded as a check that both did the same computation.

Reported, per side: images/s (batch / median wall time of `--repeats` calls after one warm-up
call, which for ldm_jax includes compiling the program), the img/s ratio ldm_jax / diffusers
(> 1: ldm_jax faster), and the sampler overhead

    overhead = sampling time / (steps x one guided UNet forward on 2B latents + one decode of B)

(1.0: the loop adds nothing to the network calls; text encoding, the update rule, guidance
arithmetic and per-step dispatch are what it measures). `--sizes sd15` (SD 1.5 at 256^2) works
but writes ~4 GB of random weights to a temporary folder and takes minutes per image on CPU.

Prints a markdown table and writes benchmarks/results/sampling.json (or `--out DIR`).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here downloads; make sure nothing tries

SAMPLERS = ("ddim", "dpm_solver++")
SAMPLING_BATCH = {"micro": 1, "tiny": 4, "small": 4, "sd15": 1}  # images per call unless --batch
PROMPTS = ("a red circle on the left", "a green square at the top", "a blue triangle in the center",
           "a yellow circle at the bottom")


# The scheduler config of a real SD 1.5 folder (runwayml/stable-diffusion-v1-5): the settings users
# sample with (set_alpha_to_one false, steps_offset 1), not the ones closest to a textbook sampler.
SD15_SCHEDULER = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                  "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
                  "steps_offset": 1, "trained_betas": None, "clip_sample": False}


def reference_scheduler(sampler: str, config):
    """The diffusers scheduler a user of a real SD 1.5 folder picks for `sampler` ("ddim":
    DDIMScheduler, "dpm_solver++": DPMSolverMultistepScheduler, from SD 1.5's config); both sides
    run it exactly (ours: sampler="scheduler", `ldm_jax.diffusion.sd_schedulers`)."""
    import diffusers

    d = config.diffusion
    if d.schedule != "scaled_linear" or d.schedule_kwargs:
        raise ValueError(f"benchmark sizes use diffusion.schedule='scaled_linear' with its default betas, "
                         f"not {d.schedule!r} {dict(d.schedule_kwargs)}")
    betas = dict(num_train_timesteps=d.num_timesteps, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    config = {**SD15_SCHEDULER, **betas}
    if sampler == "ddim":
        return diffusers.DDIMScheduler.from_config(config)
    return diffusers.DPMSolverMultistepScheduler.from_config(config)


def build_reference(config, folder: str, seed: int = 0):
    """A diffusers StableDiffusionPipeline with the config's architectures (PyTorch's default random
    initialisation), also saved to `folder` as a diffusers folder (safetensors)."""
    import diffusers
    import torch
    import transformers

    from ldm_jax import config as config_lib
    from ldm_jax.interop import clip_weights, unet_weights, vae_weights
    from ldm_jax.interop.diffusers import module_kwargs
    from ldm_jax.models.text_encoder import make_tokenizer
    from ldm_jax.training import autoencoder_stage

    torch.manual_seed(seed)
    unet_config = unet_weights.unet_config_from_kwargs(config_lib.unet_kwargs(config))
    unet = diffusers.UNet2DConditionModel.from_config(unet_config)
    ae = autoencoder_stage.make_autoencoder(config.autoencoder, config.data.image_size)
    scale = config.autoencoder.scale_factor or 1.0  # base estimates it from data; any value times the same
    vae_config = vae_weights.vae_config_from_kwargs({**module_kwargs(ae), "scaling_factor": scale})
    vae = diffusers.AutoencoderKL.from_config(vae_config)
    text_config = clip_weights.text_encoder_config_from_kwargs(config_lib.text_encoder_kwargs(config))
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig.from_dict(text_config))
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text.eval(), tokenizer=make_tokenizer(config.text_encoder.max_length),
        unet=unet.eval(), scheduler=reference_scheduler("ddim", config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def timed(fn, repeats: int) -> tuple[float, float, object]:
    """(first call's seconds, median of `repeats` further calls, the last result)."""
    start = time.perf_counter()
    out = fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return first, common.median(times), out


def network_times(ours, ref, batch: int, latent_shape, context_shape, repeats: int) -> dict:
    """Seconds of one UNet forward on 2B latents (a guided step's batch) and one decode of B, per side
    (the median of at least 5 calls: they are short, and one scheduling hiccup would skew them)."""
    import numpy as np
    import torch

    rng = np.random.default_rng(1)
    x = rng.standard_normal((2 * batch, *latent_shape), np.float32)
    t = np.full((2 * batch,), 500, np.int32)
    ctx = rng.standard_normal((2 * batch, *context_shape), np.float32)
    z = x[:batch]
    repeats = max(repeats, 5)

    out = {"ldm_jax": {"unet_forward_s": common.unet_forward_s(ours.unet, ours.params["unet"], 2 * batch, latent_shape,
                                                               context_shape, repeats),
                       "decode_s": timed(lambda: ours.decode(z), repeats)[1]}}
    xt, tt, ct = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t).long(), torch.from_numpy(ctx)
    zt = torch.from_numpy(z.transpose(0, 3, 1, 2).copy()) / ref.vae.config.scaling_factor
    with torch.no_grad():
        forward = timed(lambda: ref.unet(xt, tt, encoder_hidden_states=ct).sample, repeats)[1]
        out["diffusers"] = {"unet_forward_s": forward, "decode_s": timed(lambda: ref.vae.decode(zt).sample, repeats)[1]}
    return out


def measure_size(size: str, samplers, num_steps, batch: int | None, guidance: float, repeats: int) -> list[dict]:
    import numpy as np
    import torch

    from ldm_jax import config as config_lib
    from ldm_jax.pipeline import LatentDiffusionPipeline

    config = common.size_config(size)
    batch = batch or SAMPLING_BATCH[size]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    latent_shape = config_lib.latent_shape(config)
    latents = np.random.default_rng(0).standard_normal((batch, *latent_shape), np.float32)
    latents_torch = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy())
    rows = []
    with tempfile.TemporaryDirectory(prefix=f"ldm_jax_bench_{size}_") as folder:
        print(f"sampling: {size}: building a random diffusers folder ...", file=sys.stderr, flush=True)
        ref = build_reference(config, folder)
        ours = LatentDiffusionPipeline.from_diffusers_dir(folder)
        nets = network_times(ours, ref, batch, latent_shape, common.context_shape(config), repeats)
        for sampler in samplers:
            scheduler = reference_scheduler(sampler, config)
            ours_s = ours.with_scheduler(scheduler)
            ref.scheduler = scheduler
            for steps in num_steps:
                print(f"sampling: {size} / {sampler} / {steps} steps ...", file=sys.stderr, flush=True)
                kw = dict(num_steps=steps, guidance_scale=guidance, sampler="scheduler", latents=latents,
                          output_type="float")
                first_j, t_j, img_j = timed(lambda: ours_s.text_to_image(prompts, **kw), repeats)
                with torch.no_grad():
                    first_t, t_t, img_t = timed(lambda: ref(prompts, num_inference_steps=steps, guidance_scale=guidance,
                                                            latents=latents_torch, output_type="np").images, repeats)
                row = {"size": size, "sampler": sampler, "steps": steps, "batch": batch,
                       "image_size": int(config.data.image_size), "latents": list(latent_shape),
                       "max_abs_image_diff": float(np.abs(np.asarray(img_j) - np.asarray(img_t)).max())}
                for side, first, t in (("ldm_jax", first_j, t_j), ("diffusers", first_t, t_t)):
                    n = nets[side]
                    row[side] = dict(n, first_call_s=first, sample_s=t, images_per_s=batch / t,
                                     overhead=t / (steps * n["unet_forward_s"] + n["decode_s"]))
                row["img_s_ratio"] = row["ldm_jax"]["images_per_s"] / row["diffusers"]["images_per_s"]
                rows.append(row)
    return rows


def table(rows) -> str:
    return common.markdown_table(
        ["size", "sampler", "steps", "batch", "image", "ldm_jax img/s", "diffusers img/s",
         "img/s ratio ldm_jax/diffusers", "ldm_jax overhead", "diffusers overhead", "ldm_jax first call (s)",
         "max image diff"],
        [[r["size"], r["sampler"], r["steps"], r["batch"], f"{r['image_size']}^2", r["ldm_jax"]["images_per_s"],
          r["diffusers"]["images_per_s"], r["img_s_ratio"], r["ldm_jax"]["overhead"], r["diffusers"]["overhead"],
          r["ldm_jax"]["first_call_s"], r["max_abs_image_diff"]] for r in rows])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="tiny,small", help=f"comma-separated, of {', '.join(common.SIZES)}")
    parser.add_argument("--samplers", default="ddim,dpm_solver++", help=f"comma-separated, of {', '.join(SAMPLERS)}")
    parser.add_argument("--num_steps", default="20,50", help="comma-separated sampling step counts")
    parser.add_argument("--batch", type=int, default=None,
                        help=f"images per call (default per size: {SAMPLING_BATCH})")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up call (median reported)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    try:
        sizes = common.sizes_and_batch(args)
        samplers = common.parse_list(args.samplers, "--samplers", SAMPLERS)
        num_steps = common.parse_list(args.num_steps, "--num_steps", kind=int)
        common.check_positive("--repeats", args.repeats)
        if not args.guidance > 1.0:
            raise ValueError(f"--guidance {args.guidance} must be > 1 (guidance is what is measured)")
    except ValueError as e:
        parser.error(str(e))

    import torch

    previous_threads = torch.get_num_threads()  # restored: main may run inside another program (the tests)
    torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    try:
        rows = []
        for size in sizes:
            rows += measure_size(size, samplers, num_steps, args.batch, args.guidance, args.repeats)
        settings = dict(sizes=sizes, samplers=samplers, num_steps=num_steps, batch=args.batch, guidance=args.guidance,
                        repeats=args.repeats, dtype="float32", torch_threads=torch.get_num_threads())
    finally:
        torch.set_num_threads(previous_threads)
    return common.publish(__file__, "sampling", rows, settings, args.out, argv,
                          f"Text -> image, guidance {args.guidance}, float32, median of {args.repeats}", table(rows))


if __name__ == "__main__":
    main()
