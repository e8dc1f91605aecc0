"""A pod, planned by simulation: the SD 1.5 training step compiled for a many-device mesh, on one CPU.

    python benchmarks/pod_plan.py [--devices 8,64 | --meshes 8x1,2x4,...] [--image_size 512] [--batch 256]
                                  [--dtype bfloat16] [--no_remat] [--set KEY=VALUE ...] [--size sd15]

README's table: `--devices 8,64 --set unet.query_chunk_size=1024` (attention in query chunks, as
a GPU's or TPU's fused attention never holds the 4096 x 4096 logits of the 64 x 64 level).

Each plan is one worker process with `--xla_force_host_platform_device_count=N` fake CPU devices:
the step of benchmarks/memory.py (`common.make_unet_train_step`: eps-MSE, backward, clipping,
AdamW, EMA; configs/sd15.py's UNet, its bfloat16 activations and rematerialised blocks) is
lowered from abstract shapes (nothing is allocated) onto a (data, fsdp) mesh as the training loop
lays it out (`runtime.sharding`: the batch split over both axes, the parameters, their EMA and
AdamW moments split over fsdp along their largest divisible dimension, ZeRO-3 style, the state
donated), and compiled by XLA's SPMD partitioner. Reported per plan:

* per-device memory from XLA's buffer assignment: the state's shard, temporaries, the step's peak,
  and whether it fits a 16 GB (TPU v5e) and an 80 GB (H100) device;
* the collectives XLA inserted, from the compiled program's text: all-gathers, reduce-scatters,
  all-reduces (and any collective-permutes / all-to-alls), their count and the bytes each device
  receives per step (all-gather: output x (g-1)/g; reduce-scatter: input x (g-1)/g; all-reduce:
  2 x size x (g-1)/g, a ring's traffic; g the group size);
* the ZeRO-3 arithmetic for the same mesh, to hold the collectives against (Rajbhandari et al.
  2020, sec. 7.2.2: 3x the parameters where data parallelism moves 2x): with P float32 parameters,
  fsdp F and data D, a step gathers the parameters twice, for the forward and for the backward
  pass (2 x 4P (F-1)/F received), reduce-scatters the gradients over fsdp (4P (F-1)/F) and
  all-reduces each device's gradient shard over data (2 x 4P/F x (D-1)/D). Rematerialised blocks
  gather once more for their recomputation, unless the gathered parameters are kept.

XLA's CPU pipeline has no reduce-scatter pass: it sums the gradients with all-reduces and slices
each device's shard out (what TPU and GPU pipelines rewrite into reduce-scatters), so on this
simulation the gradient traffic is all-reduce traffic and the full gradients are temporaries.

The numbers are the CPU compiler's: a TPU's or GPU's partitioner starts from the same shardings,
but its collectives (reduce-scatters, above), fusions, layouts and scheduling, and so the
temporaries, differ.
Prints a markdown table and writes benchmarks/results/pod_plan.json (`--name`, `--out DIR`). With
`--batch 32 --set optim.grad_accum=8` on 8 devices the step is one micro-batch of an
8-step accumulation (global batch 256 per update): results/pod_plan_grad_accum.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402

GIB = 2.0 ** 30
DEVICE_GB = {"v5e (16 GB)": 16e9, "H100 (80 GB)": 80e9}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8}
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")
# `%name = <result shape(s)> <op>(` or `<op>-start(`, in XLA's HLO text
_OP = re.compile(r"=\s+(.*?)\s+(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\].*?\)\s*\{([^}]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[([\d,]+)\]<=")
_LIST_GROUPS = re.compile(r"replica_groups=\{\{([\d,]*)\}")


def shape_bytes(text: str) -> int:
    """Bytes of every array shape in an HLO result type (`f32[4,8]{1,0}` or a tuple of them)."""
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        total += DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def group_size(line: str, num_devices: int) -> int:
    """The size of a collective's replica groups, in any of XLA's spellings: named mesh axes
    (`replica_groups=mesh['axis_0'=4,'axis_1'=2], device_ids=(...) {'axis_0'}`: 4), an iota list
    (`replica_groups=[2,4]<=[8]`: 2 groups of 4), explicit groups (`{{0,1},{2,3}}`: 2); all
    devices when none are given."""
    m = _MESH_GROUPS.search(line)
    if m:
        sizes = {name.strip("'"): int(size) for name, size in re.findall(r"('?[\w]+'?)=(\d+)", m.group(1))}
        return math.prod(sizes[a.strip().strip("'")] for a in m.group(2).split(",") if a.strip())
    m = _IOTA_GROUPS.search(line)
    if m:
        return int(m.group(1).split(",")[-1])
    m = _LIST_GROUPS.search(line)
    if m:
        return len(m.group(1).split(","))
    return num_devices


def collectives(hlo: str, num_devices: int) -> dict:
    """{op: {"count", "received_bytes", "groups": {size: count}}} of the collectives in `hlo` (a
    compiled program's text); `received_bytes` is what one device receives per step."""
    out = {op: {"count": 0, "received_bytes": 0.0, "groups": {}} for op in COLLECTIVES}
    for line in hlo.splitlines():
        m = _OP.search(line)
        if not m or "-done(" in line:
            continue
        op, result = m.group(2), m.group(1)
        g = group_size(line, num_devices)
        size = shape_bytes(result)
        if op == "all-gather":  # the result is the gathered array
            received = size * (g - 1) / g
        elif op == "reduce-scatter":  # the result is one shard of g
            received = size * (g - 1)
        elif op == "all-reduce":
            received = 2 * size * (g - 1) / g
        else:
            received = size
        entry = out[op]
        entry["count"] += 1
        entry["received_bytes"] += received
        entry["groups"][str(g)] = entry["groups"].get(str(g), 0) + 1
    return out


def zero3_bytes(params: int, data: int, fsdp: int) -> dict:
    """ZeRO-3's per-device traffic for one step (float32 parameters and gradients): the parameters
    gathered for the forward and the backward pass, the gradients reduce-scattered over fsdp and
    their shards all-reduced over data."""
    gather = 4 * params * (fsdp - 1) / fsdp
    return {"param_all_gather": 2 * gather, "grad_reduce_scatter": gather,
            "grad_all_reduce": 2 * 4 * params / fsdp * (data - 1) / data}


def plan(devices: int, data: int, fsdp: int, image_size: int, batch: int, dtype: str, remat: bool,
         size: str = "sd15", overrides=()) -> dict:
    """Worker: compile the step for a data x fsdp mesh of the fake devices; its memory and collectives."""
    import jax
    import jax.numpy as jnp

    from ldm_jax import config as config_lib
    from ldm_jax.models.unet import UNet
    from ldm_jax.runtime import sharding, xla_options
    from ldm_jax.training import ldm_stage
    from ldm_jax.training.state import TrainState

    if len(jax.devices()) != devices:
        raise RuntimeError(f"expected {devices} devices, got {len(jax.devices())}")
    config = common.size_config(size, batch=batch, image_size=image_size, dtype=dtype, remat=remat,
                                overrides=overrides)
    config.mesh.update(data=data, fsdp=fsdp, shard_params=True)
    unet = UNet(**config_lib.unet_kwargs(config))
    latent, context = config_lib.latent_shape(config), common.context_shape(config)
    abstract = common.unet_param_shapes(unet, latent, context)
    extra = {"timesteps": ldm_stage.make_timestep_sampler(config).init()}
    state = jax.eval_shape(lambda p: TrainState.create(p, ldm_stage.optimizer_from_config(config),
                                                       jax.random.PRNGKey(1), extra=extra, flat=False),
                           {"unet": abstract})
    mesh = sharding.make_mesh(data, fsdp)
    state_sh = sharding.tree_shardings(state, mesh, shard_params=True)
    b = config.data.batch_size
    batch_shapes = {"latents": jax.ShapeDtypeStruct((b, *latent), jnp.float32),
                    "context": jax.ShapeDtypeStruct((b, *context), jnp.float32)}
    batch_sh = jax.tree.map(lambda _: sharding.batch_sharding(mesh), batch_shapes)
    step = jax.jit(common.make_unet_train_step(config, unet), donate_argnums=0, in_shardings=(state_sh, batch_sh),
                   out_shardings=(state_sh, sharding.replicated(mesh)),
                   compiler_options=xla_options.compiler_options())
    start = time.perf_counter()
    compiled = step.lower(state, batch_shapes).compile()
    compile_s = time.perf_counter() - start
    m = compiled.memory_analysis()
    params = common.param_count(abstract)
    found = collectives(compiled.as_text(), devices)
    state_b, temp_b = int(m.argument_size_in_bytes), int(m.temp_size_in_bytes)
    flops = common.cost_flops(compiled)
    return dict(size=size, devices=devices, data=data, fsdp=fsdp, image_size=image_size, global_batch=b,
                per_device_batch=b // devices, latents=list(latent), dtype=dtype, remat=remat, unet_params=params,
                state_bytes=state_b, temp_bytes=temp_b, output_bytes=int(m.output_size_in_bytes),
                alias_bytes=int(m.alias_size_in_bytes), peak_bytes=state_b + temp_b,
                fits={name: state_b + temp_b < cap for name, cap in DEVICE_GB.items()},
                collectives=found, zero3=zero3_bytes(params, data, fsdp), flops_per_device=flops,
                compile_s=compile_s, overrides=list(overrides))


def _worker(spec: dict) -> None:
    common.emit(plan(**spec))


def run_plan(spec: dict, timeout: float | None = None) -> dict:
    """One plan in a fresh process with spec["devices"] fake CPU devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={spec['devices']}".strip()
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(common.RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + "\n" + proc.stderr).strip().splitlines()[-25:])
        raise RuntimeError(f"pod_plan worker {spec} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1][len(common.RESULT_PREFIX):])


def parse_mesh(text: str, devices: int | None) -> tuple[int, int]:
    """'DxF' -> (data, fsdp), checked against the device count when one is given."""
    try:
        data, fsdp = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--meshes entries are DATAxFSDP (e.g. 8x1, 2x4), got {text!r}") from None
    if data < 1 or fsdp < 1 or (devices is not None and data * fsdp != devices):
        raise ValueError(f"mesh {text} has {data * fsdp} devices, not {devices}")
    return data, fsdp


def default_meshes(devices: int) -> list[str]:
    """data x fsdp from all-data to all-fsdp, powers of two."""
    out, f = [], 1
    while f <= devices:
        out.append(f"{devices // f}x{f}")
        f *= 2
    return out


def _gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def _ratio(measured: float, expected: float) -> str:
    return f"{measured / expected:.2f}" if expected else "-"


def table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        c, z = r["collectives"], r["zero3"]
        gathered = c["all-gather"]["received_bytes"]
        summed = c["reduce-scatter"]["received_bytes"] + c["all-reduce"]["received_bytes"]
        lines.append([r["devices"], f"{r['data']}x{r['fsdp']}", r["per_device_batch"], _gib(r["state_bytes"]),
                      _gib(r["temp_bytes"]), _gib(r["peak_bytes"]),
                      *("yes" if ok else "no" for ok in r["fits"].values()),
                      f"{c['all-gather']['count']} / {_gib(gathered)}",
                      f"{c['reduce-scatter']['count'] + c['all-reduce']['count']} / {_gib(summed)}",
                      f"{_gib(z['param_all_gather'])} / {_gib(z['grad_reduce_scatter'] + z['grad_all_reduce'])}",
                      _ratio(gathered, z["param_all_gather"]),
                      _ratio(summed, z["grad_reduce_scatter"] + z["grad_all_reduce"]), round(r["compile_s"])])
    return common.markdown_table(
        ["devices", "data x fsdp", "batch / device", "state (GiB)", "temporaries (GiB)", "peak (GiB)",
         *(f"fits {name}" for name in DEVICE_GB), "all-gathers (n / GiB in)",
         "reduce-scatters + all-reduces (n / GiB in)", "ZeRO-3: gathers / gradient sums (GiB in)",
         "gathers / ZeRO-3", "gradient sums / ZeRO-3", "compile (s)"], lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--devices", default="8,64", help="comma-separated fake device counts")
    parser.add_argument("--meshes", default=None,
                        help="comma-separated DATAxFSDP meshes, instead of every power-of-two split of --devices")
    parser.add_argument("--size", default="sd15", choices=common.SIZES,
                        help="the UNet (benchmarks/common.py's sizes; micro for the smoke test)")
    parser.add_argument("--image_size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256, help="global batch")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--no_remat", action="store_true", help="no rematerialised blocks (sd15.py remats)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per plan")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--name", default="pod_plan", help="the results file's name (<name>.json)")
    args = parser.parse_args(argv)
    if args.worker:
        _worker(json.loads(args.worker))
        return {}
    try:
        for name in ("image_size", "batch"):
            common.check_positive(f"--{name}", getattr(args, name))
        if args.meshes:  # the meshes asked for, each on the device count it fills
            meshes = [parse_mesh(m, None) for m in common.parse_list(args.meshes, "--meshes")]
        else:
            meshes = [parse_mesh(m, n) for n in common.parse_list(args.devices, "--devices", kind=int)
                      for m in default_meshes(n)]
        plans = [dict(devices=d * f, data=d, fsdp=f) for d, f in meshes]
        for p in plans:
            if args.batch % p["devices"]:
                raise ValueError(f"--batch {args.batch} does not split over {p['devices']} devices")
    except ValueError as e:
        parser.error(str(e))
    rows = []
    for p in plans:
        spec = dict(p, image_size=args.image_size, batch=args.batch, dtype=args.dtype, remat=not args.no_remat,
                    size=args.size, overrides=args.set)
        print(f"pod_plan: {p['devices']} devices, data {p['data']} x fsdp {p['fsdp']} ...", file=sys.stderr, flush=True)
        rows.append(run_plan(spec, args.timeout))
        print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    settings = dict(size=args.size, meshes=[f"{p['data']}x{p['fsdp']}" for p in plans], image_size=args.image_size,
                    batch=args.batch, dtype=args.dtype, remat=not args.no_remat, overrides=args.set)
    return common.publish(__file__, args.name, rows, settings, args.out, argv,
                          f"The {args.size} training step planned for a pod (XLA CPU SPMD partitioner, fake devices, "
                          "per device)", table(rows))


if __name__ == "__main__":
    main()
