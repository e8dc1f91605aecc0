"""jit compile time of the training step and of the sampling function, per size, with JAX's
persistent compilation cache cold and warm.

    python benchmarks/compile.py [--sizes tiny,small,sd15] [--batch N] [--dtype float32] [--remat]
                                 [--set KEY=VALUE ...] [--name compile]

Two programs, exactly as the training loop compiles them (`ldm_jax/training/loop.py`):

* the training step `ldm_stage.make_train_step(config, models)`: autoencoder encoding, the text
  encoder, the UNet forward and backward, the loss and `apply_gradients`, jitted with the state
  donated;
* the sampling function `ldm_stage.make_sample_fn(config, models)` of the loop's sample grids:
  the text encoder, the config's sampler (base: 20-step DPM-Solver++, sd15: 50-step DDIM) as one
  `lax.scan` of guided UNet calls, and the decoder, for the config's sample prompts.

Their arguments are abstract (`jax.ShapeDtypeStruct`s from `jax.eval_shape`), so nothing is
initialised or run: what is timed is `jitted.lower(...)` (tracing and lowering to StableHLO) and
`.compile()` (XLA, or reading the executable from the cache).

Each size runs twice, each time in a fresh process: "cold" with a new, empty cache folder, then
"warm" with the same folder, which the cold run filled. The cache is set up by the loop's own
`ldm_jax.runtime.compilation_cache.enable_compilation_cache(path)`, so only programs that took at least 1 s
to compile are stored (the "warm cache hits" column says whether the warm run found them).
Sizes are `common.size_config` (float32, no remat unless `--dtype bfloat16 --remat`, as
configs/sd15.py trains).

`--set` overrides the sizes' configs as on the training command line (`--set unet.scan_layers=True`:
the UNet's repeated layers as loops); `--name` names the results file.

Prints a markdown table and writes benchmarks/results/compile.json (or `--out DIR`, `--name`).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402

MODES = ("cold", "warm")
PROGRAMS = ("train", "sample")
CACHE_HIT = "/jax/compilation_cache/cache_hits"


def abstract_inputs(config, models):
    """ShapeDtypeStructs of (state, batch, frozen, sample conditions, rng) as the loop passes them."""
    import jax
    import jax.numpy as jnp

    from ldm_jax.training import autoencoder_stage, ldm_stage

    key = jax.random.PRNGKey(0)
    state = jax.eval_shape(lambda k: ldm_stage.init_state(config, models, k), key)
    ae_state = jax.eval_shape(lambda k: autoencoder_stage.init_state(config, k), key)
    frozen = {"autoencoder": ae_state.params["autoencoder"], "scale": jax.ShapeDtypeStruct((), jnp.float32)}
    length = config.text_encoder.max_length
    if models.text_encoder is not None and not models.train_text_encoder:  # sd15: CLIP frozen, loaded from a folder
        ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
        frozen["text_encoder"] = jax.eval_shape(models.text_encoder.init, key, ids)["params"]
    b, size = config.data.batch_size, config.data.image_size
    batch = {"image": jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32),
             "ids": jax.ShapeDtypeStruct((b, length), jnp.int32)}
    cond = jax.ShapeDtypeStruct((len(config.train.sample_prompts), length), jnp.int32)
    return state, batch, frozen, cond, jax.ShapeDtypeStruct(key.shape, key.dtype)


def time_compile(jitted, args, events: collections.Counter) -> dict:
    hits = events[CACHE_HIT]
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    lowered_at = time.perf_counter()
    lowered.compile()
    end = time.perf_counter()
    return {"lower_s": lowered_at - start, "compile_s": end - lowered_at, "cache_hits": events[CACHE_HIT] - hits}


def worker(spec: dict) -> dict:
    """Compile both programs of one size with the persistent cache in spec["cache_dir"]."""
    from ldm_jax.runtime.compilation_cache import enable_compilation_cache

    enable_compilation_cache(spec["cache_dir"])
    import jax

    # The training loop stores programs that took >= 1 s; --min_compile_time_s 0 stores every one,
    # so that a warm read can be checked whatever this machine's speed.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", spec.get("min_compile_time_s", 1.0))

    from ldm_jax.runtime.xla_options import compiler_options
    from ldm_jax.training import ldm_stage

    events = collections.Counter()
    jax.monitoring.register_event_listener(lambda event, **kwargs: events.update([event]))
    config = common.size_config(spec["size"], batch=spec.get("batch"), dtype=spec["dtype"], remat=spec["remat"],
                                overrides=spec.get("overrides", ()))
    models = ldm_stage.build_models(config)
    state, batch, frozen, cond, key = abstract_inputs(config, models)
    train = jax.jit(ldm_stage.make_train_step(config, models), donate_argnums=0, compiler_options=compiler_options())
    sample = jax.jit(ldm_stage.make_sample_fn(config, models), compiler_options=compiler_options())
    return {"train": time_compile(train, (state, batch, frozen), events),
            "sample": time_compile(sample, (state.ema_params, frozen, cond, key), events),
            "sampler": f"{config.sampler.name} x {config.sampler.num_steps}",
            "cache_files": sum(len(files) for _, _, files in os.walk(spec["cache_dir"]))}


def measure(sizes, batch: int | None, dtype: str, remat: bool, min_compile_time_s: float = 1.0,
            overrides=()) -> list[dict]:
    rows = []
    for size in sizes:
        config = common.size_config(size, batch=batch, dtype=dtype, remat=remat, overrides=overrides)
        row = {"size": size, "batch": config.data.batch_size, "image_size": config.data.image_size}
        cache_dir = tempfile.mkdtemp(prefix=f"ldm_jax_compile_cache_{size}_")
        try:
            for mode in MODES:  # cold fills the fresh folder, warm reads it
                print(f"compile: {size} / {mode} ...", file=sys.stderr, flush=True)
                spec = {"size": size, "batch": batch, "dtype": dtype, "remat": remat, "cache_dir": cache_dir,
                        "mode": mode, "min_compile_time_s": min_compile_time_s, "overrides": list(overrides)}
                try:
                    row[mode] = common.run_worker(__file__, spec)
                except RuntimeError as e:
                    print(f"compile: {e}", file=sys.stderr)
                    row[mode] = {"error": str(e)}
        finally:
            shutil.rmtree(cache_dir, ignore_errors=True)
        rows.append(row)
    return rows


def table(rows) -> str:
    def get(row, mode, program, key):
        r = row.get(mode) or {}
        return "failed" if "error" in r else r[program][key]

    lines = []
    for r in rows:
        hits = "failed" if "error" in (r.get("warm") or {}) else sum(r["warm"][p]["cache_hits"] for p in PROGRAMS)
        lines.append([r["size"], r["batch"], f"{r['image_size']}^2", get(r, "cold", "train", "lower_s"),
                      get(r, "cold", "train", "compile_s"), get(r, "warm", "train", "compile_s"),
                      get(r, "cold", "sample", "lower_s"), get(r, "cold", "sample", "compile_s"),
                      get(r, "warm", "sample", "compile_s"), hits])
    return common.markdown_table(
        ["size", "batch", "images", "train: trace+lower (s)", "train: compile cold (s)", "train: compile warm (s)",
         "sample: trace+lower (s)", "sample: compile cold (s)", "sample: compile warm (s)", "warm cache hits"], lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_step_flags(parser)
    parser.add_argument("--min_compile_time_s", type=float, default=1.0,
                        help="programs that compile faster are not cached (the training loop's 1.0; 0: all)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override, e.g. unet.scan_layers=True (repeatable)")
    parser.add_argument("--name", default="compile", help="the results file's name")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one process's compiles
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        common.emit(dict(worker(spec), size=spec["size"], mode=spec["mode"]))
        return {}
    try:
        sizes = common.sizes_and_batch(args)
        for size in sizes:  # a bad --set fails here, before any worker starts
            common.size_config(size, batch=args.batch, dtype=args.dtype, remat=args.remat, overrides=args.set)
    except ValueError as e:
        parser.error(str(e))
    rows = measure(sizes, args.batch, args.dtype, args.remat, args.min_compile_time_s, args.set)
    settings = dict(sizes=sizes, batch=args.batch, dtype=args.dtype, remat=args.remat,
                    min_compile_time_s=args.min_compile_time_s, overrides=args.set)
    return common.publish(__file__, args.name, rows, settings, args.out, argv,
                          f"Compile times, {args.dtype}{', remat' if args.remat else ''}, persistent cache cold / "
                          "warm", table(rows))


if __name__ == "__main__":
    result = main()
    sys.exit(1 if any("error" in (r.get(m) or {}) for r in result.get("rows", []) for m in MODES) else 0)
