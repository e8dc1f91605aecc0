"""What the benchmark scripts share: the sizes they measure, machine information, results files,
markdown tables, per-measurement subprocesses, random parameters and the UNet-only training step.

Sizes are training configs (`size_config`), so that every script measures the architecture a
config trains, read through the training code (`config_lib.unet_kwargs`, `latent_shape`):

    micro  a 1-level UNet (16 channels, attention in its mid-block only), a 1-level autoencoder,
           8x8x4 latents (8^2 images), batch 2: the smoke tests' size (compilation is their cost)
    tiny   configs/base_discrete.py: UNet (32, 64, 64) on 8x8x4 latents, batch 64, context 16x128
    small  base with UNet widths (64, 128, 128) on 16x16x4 latents (64^2 images), batch 16
    sd15   configs/sd15.py's architectures (UNet 859.5M parameters, context 77x768) at 32x32x4
           latents (256^2 images), batch 1; float32 and no rematerialisation unless asked

Importable both as `benchmarks.common` (tests) and from the scripts run as files (`python
benchmarks/train_step.py`), which put the repository root on sys.path first.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import resource
import shlex
import statistics
import subprocess
import sys
from typing import Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
SIZES = ("micro", "tiny", "small", "sd15")
# A worker prints exactly one line starting with this; the parent parses it (everything else the
# worker writes, warnings included, is passed through or shown on failure).
RESULT_PREFIX = "BENCHMARK_RESULT "

# ---------------------------------------------------------------------------------------------
# Sizes

_MICRO = dict(
    unet=dict(block_out_channels=(16,), layers_per_block=1, down_block_types=("DownBlock2D",),
              up_block_types=("UpBlock2D",), num_attention_heads=2, cross_attention_dim=32,
              norm_num_groups=8, dropout=0.0),
    text_encoder=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=16, hidden_act="quick_gelu"),
    autoencoder=dict(block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                     mid_block_add_attention=False),
)


def size_config(name: str, *, batch: int | None = None, image_size: int | None = None,
                dtype: str = "float32", remat: bool = False, overrides: Sequence[str] = ()):
    """The training config (an `ml_collections.ConfigDict`, validated) of benchmark size `name`.

    `batch` and `image_size` replace the size's own (`data.batch_size`, `data.image_size`; latents
    are image_size / 4 for tiny and small, / 8 for sd15, / 1 for micro); `dtype` and `remat` set
    `train.dtype` / `train.remat` (the CPU comparisons use float32 without remat on both sides);
    `overrides` are `key=value` strings as on the training command line
    (`unet.attention_implementation='cudnn'`).
    """
    from ldm_jax import config as config_lib

    if name not in SIZES:
        raise ValueError(f"unknown benchmark size {name!r}; allowed: {', '.join(SIZES)}")
    if name == "sd15":
        config = config_lib.load_config(REPO / "configs" / "sd15.py")
        config.data.update(image_size=256, batch_size=1)
    else:
        config = config_lib.load_config(REPO / "configs" / "base_discrete.py")
    if name == "small":
        config.unet.block_out_channels = (64, 128, 128)
        config.data.update(image_size=64, batch_size=16)
    if name == "micro":
        config.unet = _MICRO["unet"]
        config.text_encoder.model = _MICRO["text_encoder"]
        config.autoencoder.model = _MICRO["autoencoder"]
        config.data.update(image_size=8, batch_size=2)
    if batch is not None:
        config.data.batch_size = int(batch)
    if image_size is not None:
        config.data.image_size = int(image_size)
    config.train.update(dtype=dtype, remat=bool(remat))
    for override in overrides:
        config_lib.apply_override(config, override)
    config_lib.validate(config)
    return config


def context_shape(config) -> tuple[int, int]:
    """(tokens, width) of the text context the UNet cross-attends to."""
    return int(config.text_encoder.max_length), int(config.unet.cross_attention_dim)


def parse_list(text: str, flag: str, allowed: Sequence[str] | None = None, kind=str) -> list:
    """'a,b' -> ['a', 'b'] (or ints with kind=int); ValueError naming `flag` and the allowed values."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise ValueError(f"{flag}: empty list {text!r}")
    out = []
    for item in items:
        if allowed is not None and item not in allowed:
            raise ValueError(f"{flag}: unknown value {item!r}; allowed: {', '.join(allowed)}")
        try:
            value = kind(item)
        except ValueError:
            what = "an integer" if kind is int else f"a {kind.__name__}"
            raise ValueError(f"{flag}: {item!r} is not {what}") from None
        if kind is int and value < 1:
            raise ValueError(f"{flag}: {value} must be a positive integer")
        out.append(value)
    return out


# ---------------------------------------------------------------------------------------------
# Machine information, results, tables


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_bytes() -> int | None:
    """The machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def machine_info() -> dict:
    """CPU, memory, OS, package versions and the date, for a results file (imports neither jax nor torch)."""
    versions = {}
    for package in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "diffusers", "transformers"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                cpu_count=os.cpu_count(), usable_cpus=usable, processor=_cpu_name(), memory_bytes=memory_bytes(),
                platform=platform.platform(), python=platform.python_version(), versions=versions)


def git_state() -> dict:
    """The repository's commit and whether tracked files differ from it (both None outside a git checkout)."""
    def git(*args):
        try:
            proc = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return dict(commit=commit, dirty=None if status is None else bool(status))


def command_line(script, argv: Sequence[str] | None) -> str:
    """The shell command that runs `script` (a file under benchmarks/) with `argv` (None: this
    process's own arguments), as a results file records it."""
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["python", f"benchmarks/{pathlib.Path(script).name}", *args])


def write_results(name: str, rows: list[dict], settings: dict, out_dir=None, extra: dict | None = None, *,
                  command: str | None = None) -> pathlib.Path:
    """Write `<out_dir>/<name>.json` ({"benchmark", "command", "git", "machine", "settings", "rows", ...});
    returns its path. `command` is the command line that produced it (`command_line`)."""
    out = pathlib.Path(out_dir) if out_dir else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    payload = {"benchmark": name, "command": command, "git": git_state(), "machine": machine_info(),
               "settings": settings, **(extra or {}), "rows": rows}
    path.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    return path


def publish(script, name: str, rows: list[dict], settings: dict, out_dir, argv, title: str, table: str,
            extra: dict | None = None) -> dict:
    """The end of a benchmark script: write `<out_dir>/<name>.json` (`write_results`, with the
    command line of `script` run with `argv`), print `title` with the machine, the markdown `table`
    and the file's path; returns {"path", "rows"}."""
    path = write_results(name, rows, settings, out_dir, extra=extra, command=command_line(script, argv))
    info = json.loads(path.read_text())["machine"]
    print(f"\n{title}; {machine_line(info)}\n")
    print(table)
    print(f"\nwrote {path}")
    return {"path": str(path), "rows": rows}


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub markdown table; floats with 3 significant digits, None as a dash."""
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line(info: dict) -> str:
    v = info["versions"]
    return (f"{info['processor']}, {info['cpu_count']} CPUs ({info['usable_cpus']} usable); "
            f"jax {v['jax']}, torch {v['torch']}, diffusers {v['diffusers']}; {info['date']}")


# ---------------------------------------------------------------------------------------------
# Subprocess workers: one measurement per process, so peak RSS / device memory are its own.


def run_worker(script, spec: dict, timeout: float | None = None) -> dict:
    """Run `python <script> --worker '<spec as JSON>'` and return the dict the worker emitted.

    Raises RuntimeError with the end of the worker's output when it fails or emits nothing.
    """
    cmd = [sys.executable, str(pathlib.Path(script).resolve()), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{pathlib.Path(script).name} worker {spec} ran past {timeout} s") from None
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + "\n" + proc.stderr).strip().splitlines()[-25:])
        raise RuntimeError(f"{pathlib.Path(script).name} worker {spec} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def emit(result: dict) -> None:
    """Worker side of `run_worker`: print the result line, with this process's peak RSS."""
    result = dict(result, peak_rss_mib=peak_rss_mib())
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def median(xs: Sequence[float]) -> float:
    if not xs:
        raise ValueError("no timed repetitions (need at least one)")
    return float(statistics.median(xs))


def add_step_flags(parser, sizes: str = "tiny,small,sd15") -> None:
    """The flags of the scripts that build a training step per size (compile.py, memory.py)."""
    parser.add_argument("--sizes", default=sizes, help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--batch", type=int, default=None, help="batch size for every size (default: the size's own)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="train.dtype (activations)")
    parser.add_argument("--remat", action="store_true", help="train.remat: rematerialised UNet blocks")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")


def sizes_and_batch(args) -> list[str]:
    """`args.sizes` as a checked list, after checking `args.batch`; ValueError naming the flag."""
    sizes = parse_list(args.sizes, "--sizes", SIZES)
    if args.batch is not None:
        check_positive("--batch", args.batch)
    return sizes


def check_positive(name: str, value: int, minimum: int = 1) -> int:
    if not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
    return value


# ---------------------------------------------------------------------------------------------
# JAX helpers (jax is imported inside, so that the parent processes stay light)


def random_params(abstract, seed: int = 0):
    """Random float32 host arrays shaped like `abstract` (ShapeDtypeStructs): kernels and
    embeddings uniform with variance 1/fan_in, 1-D scales 1 and biases 0. Drawn with numpy:
    `module.init` would compile the whole network once more, which on CPU costs more than the
    measurement (and uniform draws keep SD 1.5's 860M parameters a matter of seconds)."""
    import jax
    import numpy as np

    rng = np.random.default_rng(seed)

    def one(path, a):
        if len(a.shape) >= 2:
            bound = np.float32(np.sqrt(3.0 / np.prod(a.shape[:-1])))
            x = rng.random(a.shape, dtype=np.float32)
            x *= 2 * bound
            x -= bound
            return x.astype(a.dtype, copy=False)
        name = str(path[-1]) if path else ""
        return (np.ones if "scale" in name else np.zeros)(a.shape, a.dtype)

    return jax.tree_util.tree_map_with_path(one, abstract)


def unet_param_shapes(unet, latent_shape, context: tuple[int, int]):
    """The UNet's parameter tree as ShapeDtypeStructs (traced, not compiled)."""
    import jax
    import jax.numpy as jnp

    h, w, c = latent_shape
    x = jax.ShapeDtypeStruct((1, h, w, c), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    ctx = jax.ShapeDtypeStruct((1, *context), jnp.float32)
    return jax.eval_shape(unet.init, jax.random.PRNGKey(0), x, t, ctx)["params"]


def param_count(tree) -> int:
    import jax
    import numpy as np

    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


UPDATES = ("fused", "optax")  # make_unet_train_step's update paths


def make_unet_train_step(config, unet, update: str = "fused"):
    """train_step(state, batch) -> (state, metrics): one LDM training step on given latents and
    text context, built from the training code's parts (ldm_stage's schedule, timestep sampler and
    optimiser, losses.make_loss_fn, state.apply_gradients: clipping, AdamW, EMA, the non-finite
    skip) without the frozen autoencoder and text encoder, so that diffusers can do the same work.

    The loss is plain eps-MSE (DDPM eq. 14, `weighting="none"`, whatever the config's weighting):
    the reference training script's default. t and the noise are `unet_step_draws(config, state,
    latents)`. `batch = {"latents": [B, h, w, c], "context": [B, L, D]}`; `state.params = {"unet":
    ...}`. Jit it with `donate_argnums=0`, as the training loop does.
    `update="optax"` applies optax's chain (`optim.AdamW.chain`) leaf by leaf instead of the fused
    update the loop uses (`optim.AdamW.apply`; the same state either way), to measure the difference.
    """
    import jax
    import jax.numpy as jnp

    from ldm_jax.diffusion import losses
    from ldm_jax.training import ldm_stage
    from ldm_jax.training.state import apply_gradients

    d = config.diffusion
    schedule = ldm_stage.schedule_from_config(d)
    loss_fn = losses.make_loss_fn(schedule, objective="simple", prediction=d.prediction, variance=d.variance,
                                  weighting="none")
    tx = ldm_stage.optimizer_from_config(config)
    if update not in UPDATES:
        raise ValueError(f"unknown update {update!r}; allowed: {', '.join(UPDATES)}")
    if update == "optax":
        tx = getattr(tx, "chain", tx)

    def train_step(state, batch):
        z0 = batch["latents"]
        t, weights, noise = unet_step_draws(config, state, z0)

        def objective(params):
            model_fn = lambda x, tt: unet.apply({"params": params["unet"]}, x, tt, batch["context"])  # noqa: E731
            return jnp.mean(loss_fn(model_fn, z0, t, noise).loss * weights)

        loss, grads = jax.value_and_grad(objective)(state.params)
        state, info = apply_gradients(state, grads, loss, tx, ema_decay=config.optim.ema_decay)
        return state, {"loss": loss, **info}

    return train_step


def unet_step_draws(config, state, latents):
    """(t [B] int32, loss weights [B], noise shaped like `latents`): what `make_unet_train_step` draws
    at `state`, from `fold_in(state.rng, state.step)` split into a t and a noise stream. Callable
    outside jit as well (the same bits), so that a reference can be handed a step's exact draws."""
    import jax
    import jax.numpy as jnp

    from ldm_jax.training import ldm_stage

    k_t, k_noise = jax.random.split(jax.random.fold_in(state.rng, state.step))
    t, weights = ldm_stage.make_timestep_sampler(config).sample(state.extra["timesteps"], k_t, latents.shape[0])
    return t, weights, jax.random.normal(k_noise, latents.shape, jnp.float32)


def init_unet_train_state(config, unet, params, seed: int = 1):
    """A TrainState for `make_unet_train_step`: `{"unet": params}`, the config's optimiser state,
    the EMA copy and the timestep sampler's state, flat or not, as `ldm_stage.init_state` makes them."""
    import jax

    from ldm_jax.training import autoencoder_stage, ldm_stage
    from ldm_jax.training.state import TrainState

    extra = {"timesteps": ldm_stage.make_timestep_sampler(config).init()}
    # The loop's update path: one raveled vector unless the parameters are fsdp-sharded (sd15).
    return TrainState.create({"unet": jax.device_put(params)}, ldm_stage.optimizer_from_config(config),
                             jax.random.PRNGKey(seed), extra=extra, flat=autoencoder_stage.flat_update(config))


def cost_flops(stage) -> float | None:
    """FLOPs from XLA's cost analysis of a `jax.stages.Compiled` program (after optimisation) or a
    `Lowered` one (before: the operations the model asks for). None when the backend has none."""
    try:
        cost = stage.cost_analysis()
    except NotImplementedError:
        return None
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None and flops > 0 else None



def unet_forward_s(unet, params, batch: int, latent_shape, context: tuple[int, int], repeats: int = 5) -> float:
    """Median seconds of one jitted `unet.apply` on `batch` random latents (after one warm-up call)."""
    import time

    import jax
    import numpy as np

    from ldm_jax.runtime.xla_options import compiler_options

    rng = np.random.default_rng(1)
    forward = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c), compiler_options=compiler_options())
    args = (params, *jax.device_put((rng.standard_normal((batch, *latent_shape), np.float32),
                                     np.full((batch,), 500, np.int32),
                                     rng.standard_normal((batch, *context), np.float32))))
    forward(*args).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward(*args).block_until_ready()
        times.append(time.perf_counter() - start)
    return median(times)
