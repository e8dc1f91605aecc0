"""One LDM training step, ldm_jax (jit, float32) against diffusers + PyTorch (float32), on CPU.

    python benchmarks/train_step.py [--sizes tiny,small,sd15] [--steps 10] [--warmup 2] [--batch N]
                                    [--matmul_sizes 2048,4096] [--xla KEY=VALUE ...] [--name train_step]

Both sides train the same UNet architecture (diffusers' `UNet2DConditionModel` is built from our
config through `interop.unet_weights.unet_config_from_kwargs`; the parameter counts are checked
equal) from the same weights on the same batch, and do the same work per step: draw t (uniform)
and the noise, noise the latents, UNet forward, eps-MSE, backward, clip the global gradient norm,
AdamW at the config's learning-rate schedule (linear warm-up from 0), EMA update.

The loss is plain eps-MSE on both sides, also where the config trains with min-SNR weighting
(configs/base.py, so tiny and small): it is the reference script's default (`--snr_gamma` unset),
min-SNR's per-example weights cost nothing measurable next to the UNet, and with every weight 1
the parity check below proves the whole loss whatever t the steps draw (a min-SNR weight differs
from 1 only where SNR(t) > gamma = 5: t < 147 of 1000 here, one draw in seven; the smoke test's
six seeded draws all miss it).

Parity, before anything is timed: the ldm_jax worker writes its random UNet parameters in
diffusers' layout (`interop.mapping.state_dict_from_params`, a safetensors file), its batch and
the t and noise its first `PARITY_STEPS` steps draw (`common.unet_step_draws`) to a temporary
folder; the diffusers worker loads them (`load_state_dict(strict=True)`) and its first steps use
those draws. Each side reports those steps' losses and gradient norms before clipping
(`parity_loss`, `parity_grad_norm`: lists); the third step's loss is taken after an update at
lr / warmup_steps, so the optimiser and its schedule are proven too. A row records the largest
relative differences (`parity_rel_diff`); one above its `PARITY_RTOL` fails the size, as unequal
parameter counts do: the two sides would not compute the same thing and the timing would mean
nothing. (After the parity steps each side draws its own t and noise, so the last `loss` of the
two sides differs by the draws.)

* ldm_jax: `common.make_unet_train_step`, the training code's own parts (ldm_stage's optimiser and
  timestep sampler, `losses.make_loss_fn`, `state.apply_gradients` with its non-finite skip) minus
  the frozen autoencoder and text encoder, which diffusers' reference script also runs outside
  the measured work (latents and text context are given); jitted with the state donated.
* diffusers: what examples/text_to_image/train_text_to_image.py does per step: `torch.optim.AdamW`
  with the config's hyper-parameters, `clip_grad_norm_`, the `get_scheduler` learning-rate
  schedule, `EMAModel(foreach=True)`. Run alone (`--sides diffusers`) it starts from PyTorch's own
  initialisation and checks no parity.

The sizes are `common.size_config`: tiny = configs/base.py's UNet (1.8M parameters), batch 64,
8x8x4 latents; small = widths (64, 128, 128) (7.0M), 16x16 latents, batch 16; sd15 =
configs/sd15.py's UNet (859.5M) at 32x32 latents, batch 1, which needs more than 17 GB of RAM
per side (parameters, gradients, two AdamW moments and the EMA in float32: 5 x 3.4 GB; memory.py
puts ldm_jax's whole step at 20.4 GiB).

Each side of each size runs in its own process, so the peak RSS (`ru_maxrss` at the end) is its
own (the diffusers process imports neither jax nor ldm_jax). torch gets `torch.set_num_threads` =
the CPUs this process may run on (os.cpu_count() on an unrestricted machine), XLA its default
(the same CPUs). Warm-up steps are excluded; the table shows the median step time of `--steps`
steps, its ratio ldm_jax / diffusers (< 1: ldm_jax faster) and XLA's compile time (not included in
the step time). The results file also keeps every timed step (`step_s_all`), the spread a
comparison of two medians must be judged against.

FLOPs accounted for (benchmarks/flops.py): each row's `model_flops` is the analytic count of the
step's matmuls and convolutions (`flops.train_step_flops`: 3 x the UNet forward, less the input
gradients of the layers that read data; elementwise work left out), the same for both sides. The
ldm_jax side also reports XLA's counts of its lowered step: `xla_matmul_flops`, its dots and
convolutions, which must equal `model_flops` (the row's `xla_over_model`: 1 unless the count and
the architecture disagree), `lowered_flops`, the whole cost analysis, elementwise ops included, and
`compiled_flops`, the cost analysis after XLA's optimisations. Each side's achieved rate is
`flops_per_s` = model_flops / its median step time, and `peak_fraction` that rate over its own
library's float32 matmul peak, measured once per run in a process of that library before the sizes
run (`flops.matmul_peak_flops` with the loop's compiler options, `flops.torch_matmul_peak_flops` on
the step's threads; `--matmul_sizes`); `cpu_peak_fraction` is the rate over the larger of the two
peaks, the best this CPU was measured to do. The results file keeps both peaks
(`matmul_peak_flops_per_s`). On a machine shared with other work the peaks drop with the step
times, so compare fractions measured in the same run only.

Prints a markdown table and writes benchmarks/results/train_step.json (or `--out DIR`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common, flops  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here downloads; make sure nothing tries

SIDES = ("ldm_jax", "diffusers")
# The first steps both sides take on the same draws. Three, so that the last one's loss also proves
# an update: the warm-up's learning rate is 0 at step 0 and lr / warmup_steps at step 1.
PARITY_STEPS = 3
# Largest relative difference of the parity steps' losses and gradient norms that still counts as
# the same computation: float32 sums in different orders (micro measures ~1e-7; see the test). The
# gradient norm gets more room: at SD 1.5's size it sums 859.5M squares, and its float32 rounding
# measured 2.0e-4 (losses 9e-7) on 2026-12-06.
PARITY_RTOL = {"loss": 1e-4, "grad_norm": 1e-3}
PARITY_WEIGHTS, PARITY_ARRAYS = "unet.safetensors", "inputs.npz"  # in the spec's parity_dir


def jax_worker(spec: dict) -> dict:
    """One size's ldm_jax step: compile, `warmup` untimed steps, `steps` timed ones."""
    import jax
    import numpy as np

    from ldm_jax import config as config_lib
    from ldm_jax.models.unet import UNet
    from ldm_jax.runtime.xla_options import compiler_options

    config = common.size_config(spec["size"], batch=spec.get("batch"))
    unet = UNet(**config_lib.unet_kwargs(config))
    latent, context = config_lib.latent_shape(config), common.context_shape(config)
    abstract = common.unet_param_shapes(unet, latent, context)
    b = config.data.batch_size
    rng = np.random.default_rng(0)
    batch = jax.device_put({"latents": rng.standard_normal((b, *latent), np.float32),
                            "context": rng.standard_normal((b, *context), np.float32)})
    # Compiled from the state's shapes before the state exists: the compiler's memory is free
    # again before the parameters, moments and EMA take theirs (SD 1.5: 12.8 GiB of state).
    abstract_state = jax.eval_shape(lambda p: common.init_unet_train_state(config, unet, p), abstract)
    start = time.perf_counter()
    options = {**(compiler_options() or {}), **dict(x.split("=", 1) for x in spec.get("xla", ()))}
    lowered = jax.jit(common.make_unet_train_step(config, unet), donate_argnums=0,
                      compiler_options=options or None).lower(abstract_state, batch)
    step = lowered.compile()
    compile_s = time.perf_counter() - start
    xla_flops = dict(xla_matmul_flops=sum(flops.xla_matmul_flops(lowered).values()),
                     lowered_flops=common.cost_flops(lowered), compiled_flops=common.cost_flops(step))
    del lowered
    params = common.random_params(abstract)
    n_params = common.param_count(params)
    parity_dir = spec.get("parity_dir")
    if parity_dir:  # written before the state exists, so that the converted copy adds no peak RSS
        _write_parity_weights(params, parity_dir)
    state = common.init_unet_train_state(config, unet, params)
    del params  # the host copy (3.4 GB at sd15 size): the state holds the device's
    n_parity = min(PARITY_STEPS, spec["warmup"] + spec["steps"])
    if parity_dir:  # the t and noise the first steps will draw (uniform t: the sampler keeps no state)
        draws = [common.unet_step_draws(config, state.replace(step=state.step + k), batch["latents"])
                 for k in range(n_parity)]
        np.savez(os.path.join(parity_dir, PARITY_ARRAYS), latents=np.asarray(batch["latents"]),
                 context=np.asarray(batch["context"]), t=np.stack([np.asarray(t) for t, _, _ in draws]),
                 noise=np.stack([np.asarray(noise) for _, _, noise in draws]))
    times, parity = [], []
    for i in range(spec["warmup"] + spec["steps"]):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
        if i < n_parity:
            parity.append(metrics)  # read after the timing
    return dict(step_s=common.median(times[spec["warmup"]:]), step_s_all=times[spec["warmup"]:], compile_s=compile_s,
                batch=b, unet_params=n_params, loss=float(metrics["loss"]), finite=bool(metrics["finite"]),
                parity_loss=[float(m["loss"]) for m in parity],
                parity_grad_norm=[float(m["grad_norm"]) for m in parity], backend=jax.default_backend(),
                **xla_flops)


def _write_parity_weights(params, folder: str) -> None:
    """Our UNet parameters in diffusers' layout and keys, as the safetensors file the diffusers
    worker loads (the tree comes from the UNet's own shapes, so every key is diffusers')."""
    from safetensors.numpy import save_file

    from ldm_jax.interop import mapping

    save_file(mapping.state_dict_from_params(params), os.path.join(folder, PARITY_WEIGHTS))


def torch_worker(spec: dict) -> dict:
    """One size's diffusers step, as the reference training script does it. Everything about the
    size comes in `spec` (see `torch_spec`), so this process imports neither jax nor ldm_jax and
    its peak RSS is PyTorch's alone. With `spec["parity_dir"]` it starts from the weights and
    batch the ldm_jax worker wrote there, and its first steps use that worker's t and noise."""
    import math

    import diffusers
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from safetensors.torch import load_file

    torch.set_num_threads(flops.usable_cpus())
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel.from_config(spec["unet_config"])
    parity_dir = spec.get("parity_dir")
    if parity_dir:  # before the optimiser and the EMA copy the parameters
        unet.load_state_dict(load_file(os.path.join(parity_dir, PARITY_WEIGHTS)), strict=True)
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    o = spec["optim"]
    optimizer = torch.optim.AdamW(params, lr=o["lr"], betas=(o["b1"], o["b2"]), eps=o["eps"],
                                  weight_decay=o["weight_decay"])
    # diffusers' schedules with these names are ours (optim.learning_rate_schedule): linear warm-up
    # from 0, then constant or cosine to 0 at the run's last step.
    lr_scheduler = get_scheduler({"constant": "constant_with_warmup", "cosine": "cosine"}[o["schedule"]], optimizer,
                                 num_warmup_steps=o["warmup_steps"], num_training_steps=o["total_steps"])
    ema = EMAModel(params, decay=o["ema_decay"], foreach=True)
    alphas_cumprod = torch.tensor(spec["alphas_cumprod"], dtype=torch.float32)  # the same noise levels as ours
    (h, w, c), (length, width), b = spec["latents"], spec["context"], spec["batch"]
    draws = []  # (noise, t) of the parity steps
    if parity_dir:
        with np.load(os.path.join(parity_dir, PARITY_ARRAYS)) as npz:
            nchw = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()  # noqa: E731 ours are NHWC
            latents, context = nchw(npz["latents"]), torch.from_numpy(npz["context"])
            draws = [(nchw(noise), torch.from_numpy(t).long()) for noise, t in zip(npz["noise"], npz["t"])]
    else:
        latents, context = torch.randn(b, c, h, w), torch.randn(b, length, width)

    def step(given=None) -> tuple[float, torch.Tensor]:
        noise, t = given or (torch.randn_like(latents), torch.randint(0, len(alphas_cumprod), (b,)))
        abar = alphas_cumprod[t].view(b, 1, 1, 1)
        noisy = abar.sqrt() * latents + (1.0 - abar).sqrt() * noise
        pred = unet(noisy, t, encoder_hidden_states=context).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        # The norm before clipping, as ours reports it (with no clipping configured: a factor of 1).
        grad_norm = torch.nn.utils.clip_grad_norm_(params, o["grad_clip"] or math.inf)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(params)
        return loss.item(), grad_norm

    times, parity = [], []
    for i in range(spec["warmup"] + spec["steps"]):
        start = time.perf_counter()
        loss, grad_norm = step(draws[i] if i < len(draws) else None)
        times.append(time.perf_counter() - start)
        if i < len(draws):
            parity.append((loss, float(grad_norm)))
    parity = dict(parity_loss=[p[0] for p in parity], parity_grad_norm=[p[1] for p in parity]) if parity_dir else {}
    return dict(step_s=common.median(times[spec["warmup"]:]), step_s_all=times[spec["warmup"]:], batch=b,
                unet_params=sum(p.numel() for p in params),
                loss=loss, threads=torch.get_num_threads(), **parity)


def torch_spec(config) -> dict:
    """What `torch_worker` needs to know about a size: the diffusers UNet config translated from
    ours (`unet_weights.unet_config_from_kwargs`), the optimiser settings, the schedule's
    alpha-bars and the shapes. ValueError for a diffusion setting that worker does not implement."""
    import numpy as np

    from ldm_jax import config as config_lib
    from ldm_jax.interop import unet_weights
    from ldm_jax.training import ldm_stage

    d, o = config.diffusion, config.optim
    if ((d.prediction, d.timestep_sampler, d.variance) != ("eps", "uniform", "fixed_small") or config.unet.dropout
            or o.grad_accum != 1):
        raise ValueError("torch_worker implements eps prediction, uniform t, fixed variance, no dropout and no "
                         f"gradient accumulation; got {d.prediction}, {d.timestep_sampler}, {d.variance}, dropout "
                         f"{config.unet.dropout}, grad_accum {o.grad_accum}")
    alphas_cumprod = ldm_stage.schedule_from_config(d).alphas_cumprod
    return {"unet_config": unet_weights.unet_config_from_kwargs(config_lib.unet_kwargs(config)),
            "optim": {**{k: o[k] for k in ("lr", "b1", "b2", "eps", "weight_decay", "grad_clip", "ema_decay",
                                           "warmup_steps", "schedule")}, "total_steps": config.train.steps},
            "alphas_cumprod": np.asarray(alphas_cumprod, np.float32).tolist(), "batch": config.data.batch_size,
            "latents": list(config_lib.latent_shape(config)), "context": list(common.context_shape(config))}


WORKERS = {"ldm_jax": jax_worker, "diffusers": torch_worker}


def peak_worker(spec: dict) -> dict:
    """One side's float32 matmul peak, FLOP/s, in a process of that side's library (the torch one
    imports no jax), on the threads its step uses."""
    sizes = tuple(spec["matmul_sizes"])
    if spec["side"] == "ldm_jax":
        peak = flops.matmul_peak_flops(sizes=sizes)
    else:
        peak = flops.torch_matmul_peak_flops(sizes=sizes, threads=flops.usable_cpus())
    return {"matmul_peak_flops_per_s": peak}


def measure_peaks(sides, matmul_sizes) -> dict:
    """{side: its library's float32 matmul peak in FLOP/s, or None where the measurement failed}."""
    peaks = {}
    for side in (s for s in SIDES if s in sides):
        print(f"train_step: matmul peak / {side} ...", file=sys.stderr, flush=True)
        try:
            spec = {"task": "matmul_peak", "side": side, "matmul_sizes": list(matmul_sizes)}
            peaks[side] = common.run_worker(__file__, spec)["matmul_peak_flops_per_s"]
        except RuntimeError as e:
            print(f"train_step: {e}", file=sys.stderr)
            peaks[side] = None
    return peaks


def add_flop_rates(row: dict, peaks: dict) -> None:
    """Each measured side's achieved FLOP/s (the row's model FLOPs over its median step time) and
    its fractions of its own library's matmul peak and of the larger of the two peaks."""
    measured = [p for p in peaks.values() if p]
    cpu_peak = max(measured) if measured else None
    for side in SIDES:
        r = row.get(side) or {}
        if "step_s" not in r:
            continue
        r["flops_per_s"] = row["model_flops"] / r["step_s"]
        r["matmul_peak_flops_per_s"] = peak = peaks.get(side)
        r["peak_fraction"] = r["flops_per_s"] / peak if peak else None
        r["cpu_peak_fraction"] = r["flops_per_s"] / cpu_peak if cpu_peak else None
    ours = row.get("ldm_jax") or {}
    if ours.get("xla_matmul_flops"):
        row["xla_over_model"] = ours["xla_matmul_flops"] / row["model_flops"]


def measure(sizes, sides, steps: int, warmup: int, batch: int | None, peaks: dict | None = None,
            xla=()) -> list[dict]:
    """One row per size: each side's worker result (or {"error": ...}), the parity check's relative
    differences, the time ratio, the step's model FLOPs and each side's FLOP/s against `peaks`
    (`measure_peaks`). RuntimeError when the two sides do not compute the same step."""
    import tempfile

    from ldm_jax import config as config_lib

    rows = []
    for size in sizes:
        config = common.size_config(size, batch=batch)
        row = {"size": size, "batch": config.data.batch_size, "latents": list(config_lib.latent_shape(config)),
               "context": list(common.context_shape(config)), "model_flops": flops.train_step_flops(config)}
        with tempfile.TemporaryDirectory(prefix="train_step_parity_") as parity_dir:
            for side in (s for s in SIDES if s in sides):  # ldm_jax first: it writes the parity inputs
                spec = {"side": side, "size": size, "batch": batch, "steps": steps, "warmup": warmup}
                if side == "ldm_jax":
                    spec.update(parity_dir=parity_dir, xla=list(xla))
                else:
                    spec.update(torch_spec(config))
                    if "error" not in row.get("ldm_jax", {"error": "not run"}):
                        spec["parity_dir"] = parity_dir
                print(f"train_step: {size} / {side} ...", file=sys.stderr, flush=True)
                try:
                    row[side] = common.run_worker(__file__, spec)
                except RuntimeError as e:
                    print(f"train_step: {e}", file=sys.stderr)
                    row[side] = {"error": str(e)}
        add_flop_rates(row, peaks or {})
        ok = [row[s] for s in SIDES if s in row and "error" not in row[s]]
        if len(ok) == 2:
            if ok[0]["unet_params"] != ok[1]["unet_params"]:
                raise RuntimeError(f"size {size}: the two UNets differ ({ok[0]['unet_params']} vs "
                                   f"{ok[1]['unet_params']} parameters); the comparison would be meaningless")
            row["parity_rel_diff"] = {key: max(abs(a / b - 1.0) for a, b in zip(ok[0][f"parity_{key}"],
                                                                                 ok[1][f"parity_{key}"]))
                                      for key in ("loss", "grad_norm")}
            if any(row["parity_rel_diff"][key] > PARITY_RTOL[key] for key in PARITY_RTOL):
                raise RuntimeError(f"size {size}: from the same weights and inputs the two sides' first steps differ "
                                   f"(relative differences {row['parity_rel_diff']}, more than {PARITY_RTOL}; losses "
                                   f"{ok[0]['parity_loss']} vs {ok[1]['parity_loss']}): the comparison would be "
                                   "meaningless")
            row["time_ratio"] = ok[0]["step_s"] / ok[1]["step_s"]
        rows.append(row)
    return rows


def table(rows) -> str:
    """The markdown table: times, rates, memory, compile time, parity, FLOPs and peak fractions."""
    def side(row, name, key, scale=1.0):
        r = row.get(name) or {}
        return "failed" if "error" in r else (None if r.get(key) is None else r[key] * scale)

    def img_s(row, name):
        r = row.get(name) or {}
        return row["batch"] / r["step_s"] if "step_s" in r else None

    lines = []
    for r in rows:
        n = (r.get("ldm_jax") or r.get("diffusers") or {}).get("unet_params")
        lines.append([r["size"], r["batch"], "x".join(map(str, r["latents"])), f"{n / 1e6:.2f}M" if n else None,
                      side(r, "ldm_jax", "step_s"), side(r, "diffusers", "step_s"), r.get("time_ratio"),
                      img_s(r, "ldm_jax"), img_s(r, "diffusers"), side(r, "ldm_jax", "peak_rss_mib"),
                      side(r, "diffusers", "peak_rss_mib"), side(r, "ldm_jax", "compile_s"),
                      (r.get("parity_rel_diff") or {}).get("loss"), r["model_flops"] / 1e9, r.get("xla_over_model"),
                      side(r, "ldm_jax", "flops_per_s", 1e-9), side(r, "ldm_jax", "peak_fraction"),
                      side(r, "diffusers", "flops_per_s", 1e-9), side(r, "diffusers", "peak_fraction")])
    return common.markdown_table(
        ["size", "batch", "latents", "UNet params", "ldm_jax step (s)", "diffusers step (s)",
         "ratio ldm_jax/diffusers", "ldm_jax img/s", "diffusers img/s", "ldm_jax peak RSS (MiB)",
         "diffusers peak RSS (MiB)", "ldm_jax compile (s)", "parity: loss rel. diff", "model GFLOP/step",
         "XLA/model FLOPs", "ldm_jax GFLOP/s", "ldm_jax / jax peak", "diffusers GFLOP/s", "diffusers / torch peak"],
        lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="tiny,small,sd15", help=f"comma-separated, of {', '.join(common.SIZES)}")
    parser.add_argument("--sides", default="ldm_jax,diffusers", help="comma-separated, of ldm_jax, diffusers")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    parser.add_argument("--batch", type=int, default=None, help="batch size for every size (default: the size's own)")
    parser.add_argument("--matmul_sizes", default=",".join(map(str, flops.PEAK_SIZES)),
                        help="square float32 matmuls of each side's peak (the best rate counts)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--xla", action="append", default=[], metavar="KEY=VALUE",
                        help="an XLA compiler option for ldm_jax's step on top of the loop's "
                             "(runtime/xla_options.py), e.g. to measure another library split (repeatable)")
    parser.add_argument("--name", default="train_step", help="the results file's name")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one measurement
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        worker = peak_worker if spec.get("task") == "matmul_peak" else WORKERS[spec["side"]]
        common.emit(dict(worker(spec), side=spec["side"], size=spec.get("size")))
        return {}
    try:
        sizes = common.sizes_and_batch(args)
        sides = common.parse_list(args.sides, "--sides", SIDES)
        common.check_positive("--steps", args.steps)
        common.check_positive("--warmup", args.warmup, minimum=0)
        matmul_sizes = common.parse_list(args.matmul_sizes, "--matmul_sizes", kind=int)
        for option in args.xla:
            if "=" not in option:
                raise ValueError(f"--xla {option!r}: expected KEY=VALUE, e.g. xla_cpu_scheduler_type=...")
    except ValueError as e:
        parser.error(str(e))
    peaks = measure_peaks(sides, matmul_sizes)
    rows = measure(sizes, sides, args.steps, args.warmup, args.batch, peaks, args.xla)
    settings = dict(sizes=sizes, sides=sides, steps=args.steps, warmup=args.warmup, batch=args.batch,
                    dtype="float32", threads=flops.usable_cpus(), matmul_sizes=matmul_sizes, xla=args.xla)
    peak_line = ", ".join(f"{side} {p / 1e9:.0f}" if p else f"{side} failed" for side, p in peaks.items())
    return common.publish(__file__, args.name, rows, settings, args.out, argv,
                          "One training step (UNet forward + eps-MSE + backward + clip + AdamW + EMA), float32, "
                          f"median of {args.steps}; float32 matmul peak (GFLOP/s): {peak_line}", table(rows),
                          extra={"matmul_peak_flops_per_s": peaks})


if __name__ == "__main__":
    result = main()
    sys.exit(1 if any("error" in (r.get(s) or {}) for r in result.get("rows", []) for s in SIDES) else 0)
