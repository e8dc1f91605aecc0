"""How much memory one LDM training step needs, from XLA's own buffer assignment, without running it.

    python benchmarks/memory.py [--sizes tiny,small,sd15] [--batch N] [--dtype float32] [--remat]

The step of benchmarks/train_step.py (`common.make_unet_train_step`: eps-MSE, backward, clipping,
AdamW, EMA, on the loop's update path) is lowered from abstract shapes (`jax.eval_shape`: no
parameter is ever allocated) and compiled with the training loop's compiler options and the state
donated, as the loop jits it. `compiled.memory_analysis()` then gives what the step needs:

* state: the donated arguments (parameters, EMA, AdamW's two moments, counters); the new state is
  written into the same buffers (XLA's alias size equals it), so it is not counted twice;
* XLA temporaries: everything else live at the step's peak (activations kept for the backward
  pass, gradients, the optimiser's intermediates, layout copies);
  the per-array update of the sharded configs (sd15) is the loop's fused AdamW (`optim.AdamW.apply`);
  `--update optax` measures optax's chain instead, and `--xla KEY=VALUE` adds a compiler option;
* step peak = state + temporaries, against the floor any implementation of the same step needs:
  5 x the parameters' float32 bytes (parameters, gradients, two moments, EMA), which is what
  PyTorch's eager AdamW + EMAModel holds plus its activations.

This answers "does this size train on this machine (or on one device)?" before spending the
memory, and shows where the memory goes; the peak RSS of a real run is in train_step.py's table.
The numbers are the CPU backend's; a GPU's buffer assignment differs (other fusions and layouts).

`--lora R` measures LoRA fine-tuning instead (configs/sd15_lora.py; `models.lora`): rank-R
adapters (alpha R) on `--lora_targets` (diffusers' to_q, to_k, to_v, to_out.0 by default) are the
donated state (adapters, their EMA and AdamW moments); the frozen UNet is a further argument (its
float32 parameters, read, never written), and its floor is those parameters plus 5 x the
adapters'. E.g. SD 1.5's LoRA step at 512x512 in bfloat16 with rematerialised blocks:

    python benchmarks/memory.py --sizes sd15 --image_size 512 --dtype bfloat16 --remat --lora 4

Prints a markdown table and writes benchmarks/results/memory.json (memory_lora.json with `--lora`; or
`--out DIR`).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402

GIB = 2.0 ** 30
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' LoRA scripts' (configs/sd15_lora.py)


def host_ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def analyse(size: str, batch: int | None, dtype: str, remat: bool, image_size: int | None = None,
            lora_rank: int | None = None, lora_targets=LORA_TARGETS, overrides=(), update: str = "fused",
            xla=()) -> dict:
    """Compile `size`'s training step (or its LoRA step, `lora_rank`) from abstract shapes; XLA's
    memory analysis of it."""
    import jax
    import jax.numpy as jnp

    from ldm_jax import config as config_lib
    from ldm_jax.models.unet import UNet
    from ldm_jax.runtime.xla_options import compiler_options
    from ldm_jax.training import autoencoder_stage, ldm_stage
    from ldm_jax.training.state import TrainState

    config = common.size_config(size, batch=batch, image_size=image_size, dtype=dtype, remat=remat,
                                overrides=overrides)
    unet = UNet(**config_lib.unet_kwargs(config))
    latent, context = config_lib.latent_shape(config), common.context_shape(config)
    abstract = common.unet_param_shapes(unet, latent, context)
    flat = autoencoder_stage.flat_update(config)
    extra = {"timesteps": ldm_stage.make_timestep_sampler(config).init()}
    trainable = {"unet": abstract} if lora_rank is None else {"lora": {"unet": jax.eval_shape(
        lambda rng: lora_adapters(rng, abstract, lora_targets, lora_rank), jax.random.PRNGKey(0))}}
    state = jax.eval_shape(lambda p: TrainState.create(p, ldm_stage.optimizer_from_config(config),
                                                       jax.random.PRNGKey(1), extra=extra, flat=flat), trainable)
    b = config.data.batch_size
    batch_shapes = {"latents": jax.ShapeDtypeStruct((b, *latent), jnp.float32),
                    "context": jax.ShapeDtypeStruct((b, *context), jnp.float32)}
    if lora_rank is None:
        step, args = common.make_unet_train_step(config, unet, update), (state, batch_shapes)
    else:
        step = make_lora_train_step(config, unet, scale=1.0)  # alpha = rank, as configs/sd15_lora.py
        args = (state, batch_shapes, abstract)
    start = time.perf_counter()
    options = {**(compiler_options() or {}), **dict(x.split("=", 1) for x in xla)}
    compiled = jax.jit(step, donate_argnums=0, compiler_options=options or None).lower(*args).compile()
    compile_s = time.perf_counter() - start
    m = compiled.memory_analysis()
    n_params = common.param_count(abstract)
    n_trained = common.param_count(trainable)
    state_b, temp_b = int(m.argument_size_in_bytes), int(m.temp_size_in_bytes)
    floor = 5 * 4 * n_params if lora_rank is None else 4 * n_params + 5 * 4 * n_trained
    return dict(size=size, batch=b, latents=list(latent), dtype=dtype, remat=remat, flat_update=flat,
                unet_params=n_params, state_bytes=state_b, temp_bytes=temp_b,
                alias_bytes=int(m.alias_size_in_bytes), peak_bytes=state_b + temp_b, floor_bytes=floor,
                peak_over_floor=(state_b + temp_b) / floor, compile_s=compile_s,
                overrides=list(overrides), update="flat" if flat else update, xla_options=list(xla),
                **({} if lora_rank is None else dict(lora_rank=lora_rank, lora_targets=list(lora_targets),
                                                     lora_params=n_trained)))


def lora_adapters(rng, unet_params, targets, rank: int) -> dict:
    """Fresh rank-`rank` adapters on the UNet layers peft's target_modules=`targets` picks."""
    from ldm_jax.interop import lora_weights
    from ldm_jax.models import lora

    return lora.init_adapters(rng, unet_params, lora_weights.target_paths(unet_params, targets), rank)


def make_lora_train_step(config, unet, scale: float):
    """train_step(state, batch, base) -> (state, metrics): `common.make_unet_train_step`'s step with
    the adapters (state.params["lora"]["unet"]) trained on the frozen UNet `base`, as the LoRA
    run's loss traces it (`models.lora.adapted`)."""
    import jax
    import jax.numpy as jnp

    from ldm_jax.diffusion import losses
    from ldm_jax.models import lora
    from ldm_jax.training import ldm_stage
    from ldm_jax.training.state import apply_gradients

    d = config.diffusion
    loss_fn = losses.make_loss_fn(ldm_stage.schedule_from_config(d), objective="simple", prediction=d.prediction,
                                  variance=d.variance, weighting="none")
    tx = ldm_stage.optimizer_from_config(config)

    def train_step(state, batch, base):
        z0 = batch["latents"]
        t, weights, noise = common.unet_step_draws(config, state, z0)

        def objective(params):
            model_fn = lambda x, tt: unet.apply({"params": base}, x, tt, batch["context"])  # noqa: E731
            with lora.adapted(params["lora"], scale):
                return jnp.mean(loss_fn(model_fn, z0, t, noise).loss * weights)

        loss, grads = jax.value_and_grad(objective)(state.params)
        state, info = apply_gradients(state, grads, loss, tx, ema_decay=config.optim.ema_decay)
        return state, {"loss": loss, **info}

    return train_step


def table(rows, ram: int | None) -> str:
    lines = []
    for r in rows:
        fits = "-" if ram is None else ("yes" if r["peak_bytes"] < ram else "no")
        trained = f" (LoRA r{r['lora_rank']}: {r['lora_params'] / 1e6:.2f}M trained)" if "lora_rank" in r else ""
        settings = [*r.get("overrides", []), *r.get("xla_options", [])]
        lines.append([r["size"], r["batch"], "x".join(map(str, r["latents"])), r["dtype"] + (" remat" if r["remat"] else ""),
                      r.get("update", "-"), ", ".join(settings) or "-",
                      f"{r['unet_params'] / 1e6:.2f}M{trained}", r["state_bytes"] / GIB, r["temp_bytes"] / GIB,
                      r["peak_bytes"] / GIB, r["floor_bytes"] / GIB, r["peak_over_floor"], fits])
    return common.markdown_table(
        ["size", "batch", "latents", "activations", "update", "settings", "UNet params", "arguments (GiB)",
         "XLA temporaries (GiB)",
         "step peak (GiB)", "floor (GiB)", "peak / floor",
         f"fits in {ram / GIB:.0f} GiB RAM" if ram else "fits in RAM"], lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_step_flags(parser)
    parser.add_argument("--image_size", type=int, default=None,
                        help="image size for every size (default: the size's own)")
    parser.add_argument("--lora", type=int, default=None, metavar="R",
                        help="measure the LoRA step with rank-R adapters")
    parser.add_argument("--lora_targets", default=",".join(LORA_TARGETS),
                        help="the adapted layers (peft's target_modules)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override, e.g. unet.query_chunk_size=1024 (repeatable)")
    parser.add_argument("--update", default="fused", choices=common.UPDATES,
                        help="the tree update (sharded configs, sd15): the loop's fused AdamW (optim.AdamW.apply) "
                             "or optax's chain as it is; the small sizes update one raveled vector either way")
    parser.add_argument("--xla", action="append", default=[], metavar="KEY=VALUE",
                        help="an XLA compiler option on top of the loop's, e.g. "
                             "xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED (repeatable)")
    parser.add_argument("--name", default=None, help="the results file's name (default memory / memory_lora)")
    args = parser.parse_args(argv)
    try:
        sizes = common.sizes_and_batch(args)
        for flag in ("image_size", "lora"):
            if getattr(args, flag) is not None:
                common.check_positive(f"--{flag}", getattr(args, flag))
        targets = tuple(common.parse_list(args.lora_targets, "--lora_targets"))
        for option in args.xla:
            if "=" not in option:
                raise ValueError(f"--xla {option!r}: expected KEY=VALUE, e.g. xla_cpu_scheduler_type=...")
    except ValueError as e:
        parser.error(str(e))
    rows = []
    for size in sizes:
        print(f"memory: {size} ...", file=sys.stderr, flush=True)
        try:
            rows.append(analyse(size, args.batch, args.dtype, args.remat, args.image_size, args.lora, targets,
                                args.set, args.update, args.xla))
        except ValueError as e:  # a --lora_targets entry that matches no layer, a bad --set
            parser.error(f"--sizes {size}: {e}")
    ram = host_ram_bytes()
    settings = dict(sizes=sizes, batch=args.batch, dtype=args.dtype, remat=args.remat, image_size=args.image_size,
                    lora=args.lora, lora_targets=list(targets) if args.lora else None, overrides=args.set,
                    update=args.update, xla=args.xla)
    name = args.name or ("memory" if args.lora is None else "memory_lora")
    return common.publish(__file__, name, rows, settings, args.out, argv,
                          "One training step's memory (XLA CPU buffer assignment, state donated)", table(rows, ram),
                          extra={"host_ram_bytes": ram})


if __name__ == "__main__":
    main()
