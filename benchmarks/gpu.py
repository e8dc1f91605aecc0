"""Stable Diffusion 1.5's UNet on one GPU: the training step in bfloat16 (step time, images/s,
FLOPs, MFU, peak memory) and 512^2 text -> image latency.

    python benchmarks/gpu.py [--resolutions 256,512] [--batch_sizes 1,4,16] [--steps 10] [--remat]
                             [--attention cudnn] [--sample_resolution 512] [--sample_steps 50]

Training: `common.make_unet_train_step` (the step of benchmarks/train_step.py: eps-MSE, backward,
clipping, AdamW, EMA, the training code's own parts) on configs/sd15.py's UNet with float32
parameters and bfloat16 activations, at 256^2 and 512^2 images (32^2 and 64^2 latents, context
77x768) for each batch size. Reported: the median step time and images/s; the step's FLOPs from
XLA's cost analysis; MFU = FLOPs / step time / the bf16 matmul peak measured here (the best of a
few large square bf16 matmuls); and the device's peak memory (`memory_stats()["peak_bytes_in_use"]`).
Each (resolution, batch) runs in its own process so that its peak memory is its own; one that runs
out of memory is reported as OOM.

FLOPs: the model FLOPs of the table and MFU are `jitted.lower(...).cost_analysis()` of the step
with XLA attention (the unoptimised program: every dot and convolution the model asks for), because
the cost analysis of the compiled program (`.compile().cost_analysis()`, kept in the JSON as
`compiled_flops`) counts cuBLAS GEMMs and cuDNN convolutions but not cuDNN's fused attention, a
custom call it cannot see into. On CPU, where no attention is fused, the two counts can be set side
by side: `--cpu_dry_run` writes both. With `--remat` both include the recomputed forward, so MFU is
then hardware-FLOPs utilisation.

Sampling: `LatentDiffusionPipeline` with SD 1.5's UNet, VAE and CLIP text encoder architectures
(random weights, float32 parameters, bfloat16 activations) at 512^2, batch 1, 50 DDIM steps,
guidance 7.5 (one batched UNet call on 2 latents per step): median latency, and the sampler
overhead = latency / (steps x one UNet forward on 2 latents).

Attention: `--attention cudnn` (default) sets the config key `unet.attention_implementation`, which
the UNet passes to every transformer block's `jax.nn.dot_product_attention(implementation=...)`:
cuDNN flash attention for its self- and cross-attention (head dims 40, 80 and 160; above 128 needs
Hopper or newer). The VAE's mid-block attention (one head of 512 channels, beyond cuDNN's head-dim
limit) and the text encoder stay on XLA. When cuDNN rejects the program, the measurement is
repeated with XLA attention and the "attention" column says so.

Exits 0 with a message, writing nothing, when JAX sees no GPU. `--cpu_dry_run` runs the same code
on CPU at the micro size (8^2 images) to check the script; its numbers mean nothing.

Prints markdown tables and writes benchmarks/results/gpu.json (or `--out DIR`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402

ATTENTION = ("cudnn", "xla")
NO_GPU_MESSAGE = "gpu.py: no GPU visible to JAX (backend {backend!r}); nothing measured, nothing written."


def _is_oom(e: BaseException) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def _device_memory():
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


# ---------------------------------------------------------------------------------------------
# Workers (each in its own process)


def probe_worker(spec: dict) -> dict:
    """The backend and device; on a GPU (or a dry run) the best bf16 matmul throughput, FLOP/s."""
    import jax
    import jax.numpy as jnp

    backend = jax.default_backend()
    out = {"backend": backend, "device": jax.local_devices()[0].device_kind, "devices": jax.local_device_count()}
    if backend != "gpu" and not spec["dry_run"]:
        return out
    matmul = jax.jit(lambda a, b: a @ b)  # bf16 in and out, float32 accumulation on tensor cores
    best = {}
    for n in spec["matmul_sizes"]:
        ka, kb = jax.random.split(jax.random.PRNGKey(n))
        a = jax.random.normal(ka, (n, n), jnp.bfloat16)
        b = jax.random.normal(kb, (n, n), jnp.bfloat16)
        matmul(a, b).block_until_ready()
        start = time.perf_counter()
        for _ in range(spec["matmul_repeats"]):  # queued back to back on one stream
            c = matmul(a, b)
        c.block_until_ready()
        rate = 2 * n**3 * spec["matmul_repeats"] / (time.perf_counter() - start)
        best[str(n)] = rate
    return dict(out, matmul_flops_per_s=best, peak_flops_per_s=max(best.values()))


def _config(spec: dict, attention: str | None, batch: int | None = None):
    overrides = [f"unet.attention_implementation={attention!r}"] if attention else []
    return common.size_config(spec["size"], batch=batch, image_size=spec["image_size"], dtype="bfloat16",
                              remat=spec.get("remat", False), overrides=overrides)


def _with_attention_fallback(spec: dict, run):
    """run(attention) with the requested implementation, or with XLA's when cuDNN rejects it;
    returns (result, attention used, the rejection or None). Out-of-memory errors propagate."""
    wanted = None if spec["attention"] == "xla" else spec["attention"]
    try:
        return run(wanted), spec["attention"], None
    except Exception as e:  # noqa: BLE001 - cuDNN's rejections come as several exception types
        if wanted is None or _is_oom(e):
            raise
        return run(None), "xla", _first_line(e)


def train_worker(spec: dict) -> dict:
    import jax
    import numpy as np

    from ldm_jax import config as config_lib
    from ldm_jax.models.unet import UNet

    def run(attention):
        config = _config(spec, attention, batch=spec["batch"])
        unet = UNet(**config_lib.unet_kwargs(config))
        latent, context = config_lib.latent_shape(config), common.context_shape(config)
        state = common.init_unet_train_state(config, unet, common.random_params(
            common.unet_param_shapes(unet, latent, context)))
        b = config.data.batch_size
        rng = np.random.default_rng(0)
        batch = jax.device_put({"latents": rng.standard_normal((b, *latent), np.float32),
                                "context": rng.standard_normal((b, *context), np.float32)})
        start = time.perf_counter()
        lowered = jax.jit(common.make_unet_train_step(config, unet), donate_argnums=0).lower(state, batch)
        step = lowered.compile()
        compile_s = time.perf_counter() - start
        # Model FLOPs: the unoptimised program with XLA attention, whose dots the cost analysis
        # counts (cuDNN's fused attention is a custom call it cannot see into).
        if attention is not None:
            xla_unet = unet.clone(attention_implementation=None)
            lowered = jax.jit(common.make_unet_train_step(config, xla_unet)).lower(state, batch)
        model_flops = common.cost_flops(lowered)
        times = []
        for _ in range(spec["warmup"] + spec["steps"]):
            start = time.perf_counter()
            state, metrics = step(state, batch)
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - start)
        return dict(step_s=common.median(times[spec["warmup"]:]), compile_s=compile_s, model_flops=model_flops,
                    compiled_flops=common.cost_flops(step), latents=list(latent), loss=float(metrics["loss"]),
                    finite=bool(metrics["finite"]))

    try:
        result, used, rejected = _with_attention_fallback(spec, run)
    except Exception as e:  # noqa: BLE001
        if not _is_oom(e):
            raise
        return {"oom": True, "error": _first_line(e), "peak_memory_bytes": _device_memory()}
    return dict(result, attention=used, cudnn_rejected=rejected, peak_memory_bytes=_device_memory())


def sample_worker(spec: dict) -> dict:
    import jax
    import jax.numpy as jnp

    from ldm_jax import config as config_lib
    from ldm_jax.models.text_encoder import CLIPTextEncoder, make_tokenizer
    from ldm_jax.models.unet import UNet
    from ldm_jax.pipeline import LatentDiffusionPipeline, SamplerDefaults
    from ldm_jax.runs.workdir import workdir_schedule
    from ldm_jax.training import autoencoder_stage

    def run(attention):
        config = _config(spec, attention)
        dtype = config_lib.compute_dtype(config)
        unet = UNet(**config_lib.unet_kwargs(config))
        ae = autoencoder_stage.make_autoencoder(config.autoencoder, config.data.image_size).clone(dtype=dtype)
        text = CLIPTextEncoder(**config_lib.text_encoder_kwargs(config))
        key, length = jax.random.PRNGKey(0), config.text_encoder.max_length
        latent, context = config_lib.latent_shape(config), common.context_shape(config)
        ae_abstract = jax.eval_shape(lambda k: autoencoder_stage.init_state(config, k), key).params["autoencoder"]
        text_abstract = jax.eval_shape(text.init, key, jax.ShapeDtypeStruct((1, length), jnp.int32))["params"]
        params = {"unet": common.random_params(common.unet_param_shapes(unet, latent, context), 0),
                  "autoencoder": common.random_params(ae_abstract, 1),
                  "text_encoder": common.random_params(text_abstract, 2), "scale": 0.18215}
        pipe = LatentDiffusionPipeline(
            unet=unet, autoencoder=ae, params=params, schedule=workdir_schedule(config), text_encoder=text,
            tokenizer=make_tokenizer(length), max_length=length,
            defaults=SamplerDefaults("ddim", spec["num_steps"], spec["guidance"]))
        prompts = ["a photograph of an astronaut riding a horse"] * spec["batch"]
        start = time.perf_counter()
        pipe.text_to_image(prompts, seed=0)
        first = time.perf_counter() - start
        times = []
        for i in range(spec["repeats"]):
            start = time.perf_counter()
            pipe.text_to_image(prompts, seed=i + 1)
            times.append(time.perf_counter() - start)
        forward = common.unet_forward_s(unet, pipe.params["unet"], 2 * spec["batch"], latent, context)
        latency = common.median(times)
        return dict(latency_s=latency, first_call_s=first, unet_forward_s=forward,
                    overhead=latency / (spec["num_steps"] * forward), latents=list(latent))

    try:
        result, used, rejected = _with_attention_fallback(spec, run)
    except Exception as e:  # noqa: BLE001
        if not _is_oom(e):
            raise
        return {"oom": True, "error": _first_line(e), "peak_memory_bytes": _device_memory()}
    return dict(result, attention=used, cudnn_rejected=rejected, peak_memory_bytes=_device_memory())


WORKERS = {"probe": probe_worker, "train": train_worker, "sample": sample_worker}


# ---------------------------------------------------------------------------------------------
# The parent: no jax here (initialising the GPU would take its memory from the workers)


def _gib(n):
    return None if n is None else n / 2**30


def tables(train_rows, sample_rows) -> str:
    lines = []
    for r in train_rows:
        if "step_s" not in r:
            lines.append([r["image_size"], r["batch"], "OOM" if r.get("oom") else "failed"] + [None] * 6
                         + [_gib(r.get("peak_memory_bytes"))])
            continue
        flops = r.get("model_flops")
        lines.append([r["image_size"], r["batch"], r["step_s"] * 1e3, r["batch"] / r["step_s"],
                      flops / 1e12 if flops else None, flops / r["step_s"] / 1e12 if flops else None,
                      r.get("mfu"), r["attention"], r["compile_s"], _gib(r.get("peak_memory_bytes"))])
    out = [common.markdown_table(["image", "batch", "step (ms)", "img/s", "TFLOP/step", "TFLOP/s", "MFU",
                                  "attention", "compile (s)", "peak memory (GiB)"], lines)]
    s_lines = [[r["image_size"], r["batch"], r["num_steps"], "OOM" if r.get("oom") else r.get("latency_s"),
                r.get("unet_forward_s", 0) * 1e3 if "unet_forward_s" in r else None, r.get("overhead"),
                r.get("attention"), _gib(r.get("peak_memory_bytes"))] for r in sample_rows]
    out.append(common.markdown_table(["image", "batch", "steps", "latency (s)", "UNet forward, 2 latents (ms)",
                                      "overhead", "attention", "peak memory (GiB)"], s_lines))
    return "\n\n".join(out)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolutions", default="256,512", help="training image sizes (latents are 1/8)")
    parser.add_argument("--batch_sizes", default="1,4,16", help="training batch sizes")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed training steps after compilation")
    parser.add_argument("--remat", action="store_true", help="rematerialised UNet blocks (as configs/sd15.py trains)")
    parser.add_argument("--attention", default="cudnn", choices=ATTENTION, help="the UNet's attention implementation")
    parser.add_argument("--sample_resolution", type=int, default=512, help="image size of the sampling latency")
    parser.add_argument("--sample_steps", type=int, default=50, help="DDIM steps of the sampling latency")
    parser.add_argument("--sample_batch", type=int, default=1, help="images per sampling call")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--sample_repeats", type=int, default=3, help="timed sampling calls (median reported)")
    parser.add_argument("--matmul_sizes", default="4096,8192,16384", help="square bf16 matmuls for the peak")
    parser.add_argument("--cpu_dry_run", action="store_true",
                        help="check the script on CPU: micro size, 8^2 images, tiny matmuls; numbers mean nothing")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one measurement
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        common.emit(WORKERS[spec["task"]](spec))
        return {}
    if args.cpu_dry_run:
        args.resolutions, args.batch_sizes, args.sample_resolution = "8", "1,2", 8
        args.matmul_sizes, args.sample_steps = "256", 2
        args.steps, args.warmup, args.sample_repeats = min(args.steps, 2), min(args.warmup, 1), 1
    try:
        resolutions = common.parse_list(args.resolutions, "--resolutions", kind=int)
        batch_sizes = common.parse_list(args.batch_sizes, "--batch_sizes", kind=int)
        matmul_sizes = common.parse_list(args.matmul_sizes, "--matmul_sizes", kind=int)
        for flag in ("steps", "sample_resolution", "sample_steps", "sample_batch", "sample_repeats"):
            common.check_positive(f"--{flag}", getattr(args, flag))
        common.check_positive("--warmup", args.warmup, minimum=0)
    except ValueError as e:
        parser.error(str(e))

    probe = common.run_worker(__file__, {"task": "probe", "dry_run": args.cpu_dry_run, "matmul_sizes": matmul_sizes,
                                         "matmul_repeats": 10})
    if probe["backend"] != "gpu" and not args.cpu_dry_run:
        print(NO_GPU_MESSAGE.format(backend=probe["backend"]))
        return {"probe": probe, "rows": []}

    size = "micro" if args.cpu_dry_run else "sd15"
    common_spec = dict(size=size, attention=args.attention)
    train_rows = []
    for resolution in resolutions:
        for batch in batch_sizes:
            print(f"gpu: training step {resolution}^2 x {batch} ...", file=sys.stderr, flush=True)
            spec = dict(common_spec, task="train", image_size=resolution, batch=batch, steps=args.steps,
                        warmup=args.warmup, remat=args.remat)
            try:
                row = common.run_worker(__file__, spec)
            except RuntimeError as e:
                print(f"gpu: {e}", file=sys.stderr)
                row = {"error": str(e)}
            train_rows.append(dict(row, image_size=resolution, batch=batch))
    print(f"gpu: sampling {args.sample_resolution}^2 ...", file=sys.stderr, flush=True)
    spec = dict(common_spec, task="sample", image_size=args.sample_resolution, batch=args.sample_batch,
                num_steps=args.sample_steps, guidance=args.guidance, repeats=args.sample_repeats)
    try:
        sample = common.run_worker(__file__, spec)
    except RuntimeError as e:
        print(f"gpu: {e}", file=sys.stderr)
        sample = {"error": str(e)}
    sample_rows = [dict(sample, image_size=args.sample_resolution, batch=args.sample_batch,
                        num_steps=args.sample_steps)]

    peak = probe.get("peak_flops_per_s")
    for r in train_rows:
        if r.get("model_flops") and "step_s" in r and peak:
            r["mfu"] = r["model_flops"] / r["step_s"] / peak
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "out")}
    settings.update(size=size, dtype="bfloat16")
    rows = [dict(r, kind="train") for r in train_rows] + [dict(r, kind="sample") for r in sample_rows]
    path = common.write_results("gpu", rows, settings, args.out, extra={"device": probe},
                                command=common.command_line(__file__, argv))
    print(f"\n{probe['device']} ({probe['backend']}), measured bf16 matmul peak "
          f"{peak / 1e12 if peak else float('nan'):.1f} TFLOP/s; {common.machine_line(common.machine_info())}\n")
    print(tables(train_rows, sample_rows))
    print(f"\nwrote {path}")
    return {"path": str(path), "probe": probe, "rows": rows}


if __name__ == "__main__":
    result = main()
    sys.exit(1 if any("error" in r and not r.get("oom") for r in result.get("rows", [])) else 0)
