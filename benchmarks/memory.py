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
* step peak = state + temporaries, against the floor any implementation of the same step needs:
  5 x the parameters' float32 bytes (parameters, gradients, two moments, EMA), which is what
  PyTorch's eager AdamW + EMAModel holds plus its activations.

This answers "does this size train on this machine (or on one device)?" before spending the
memory, and shows where the memory goes; the peak RSS of a real run is in train_step.py's table.
The numbers are the CPU backend's; a GPU's buffer assignment differs (other fusions and layouts).

Prints a markdown table and writes benchmarks/results/memory.json (or `--out DIR`).
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


def host_ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def analyse(size: str, batch: int | None, dtype: str, remat: bool) -> dict:
    """Compile `size`'s training step from abstract shapes; XLA's memory analysis of it."""
    import jax
    import jax.numpy as jnp

    from ldm_jax import config as config_lib
    from ldm_jax.models.unet import UNet
    from ldm_jax.runtime.xla_options import compiler_options
    from ldm_jax.training import autoencoder_stage, ldm_stage
    from ldm_jax.training.state import TrainState

    config = common.size_config(size, batch=batch, dtype=dtype, remat=remat)
    unet = UNet(**config_lib.unet_kwargs(config))
    latent, context = config_lib.latent_shape(config), common.context_shape(config)
    abstract = common.unet_param_shapes(unet, latent, context)
    flat = autoencoder_stage.flat_update(config)
    extra = {"timesteps": ldm_stage.make_timestep_sampler(config).init()}
    state = jax.eval_shape(lambda p: TrainState.create({"unet": p}, ldm_stage.optimizer_from_config(config),
                                                       jax.random.PRNGKey(1), extra=extra, flat=flat), abstract)
    b = config.data.batch_size
    batch_shapes = {"latents": jax.ShapeDtypeStruct((b, *latent), jnp.float32),
                    "context": jax.ShapeDtypeStruct((b, *context), jnp.float32)}
    start = time.perf_counter()
    compiled = jax.jit(common.make_unet_train_step(config, unet), donate_argnums=0,
                       compiler_options=compiler_options()).lower(state, batch_shapes).compile()
    compile_s = time.perf_counter() - start
    m = compiled.memory_analysis()
    n_params = common.param_count(abstract)
    state_b, temp_b = int(m.argument_size_in_bytes), int(m.temp_size_in_bytes)
    floor = 5 * 4 * n_params
    return dict(size=size, batch=b, latents=list(latent), dtype=dtype, remat=remat, flat_update=flat,
                unet_params=n_params, state_bytes=state_b, temp_bytes=temp_b,
                alias_bytes=int(m.alias_size_in_bytes), peak_bytes=state_b + temp_b, floor_bytes=floor,
                peak_over_floor=(state_b + temp_b) / floor, compile_s=compile_s)


def table(rows, ram: int | None) -> str:
    lines = []
    for r in rows:
        fits = "-" if ram is None else ("yes" if r["peak_bytes"] < ram else "no")
        lines.append([r["size"], r["batch"], "x".join(map(str, r["latents"])), r["dtype"] + (" remat" if r["remat"] else ""),
                      f"{r['unet_params'] / 1e6:.2f}M", r["state_bytes"] / GIB, r["temp_bytes"] / GIB,
                      r["peak_bytes"] / GIB, r["floor_bytes"] / GIB, r["peak_over_floor"], fits])
    return common.markdown_table(
        ["size", "batch", "latents", "activations", "UNet params", "state (GiB)", "XLA temporaries (GiB)",
         "step peak (GiB)", "5 x params floor (GiB)", "peak / floor",
         f"fits in {ram / GIB:.0f} GiB RAM" if ram else "fits in RAM"], lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_step_flags(parser)
    args = parser.parse_args(argv)
    try:
        sizes = common.sizes_and_batch(args)
    except ValueError as e:
        parser.error(str(e))
    rows = []
    for size in sizes:
        print(f"memory: {size} ...", file=sys.stderr, flush=True)
        rows.append(analyse(size, args.batch, args.dtype, args.remat))
    ram = host_ram_bytes()
    settings = dict(sizes=sizes, batch=args.batch, dtype=args.dtype, remat=args.remat)
    path = common.write_results("memory", rows, settings, args.out, extra={"host_ram_bytes": ram},
                                command=common.command_line(__file__, argv))
    print(f"\nOne training step's memory (XLA CPU buffer assignment, state donated); "
          f"{common.machine_line(common.machine_info())}\n")
    print(table(rows, ram))
    print(f"\nwrote {path}")
    return {"path": str(path), "rows": rows}


if __name__ == "__main__":
    main()
