"""`train_and_evaluate(config, workdir)`: the stages, in order, each resumable.

Stage 1 (autoencoder) and stage 2 (latent diffusion) share one loop (`run_stage`): restore the
latest checkpoint of the stage or initialise, then `step(state, batch, frozen)` jitted once with
the state's shardings and donated; scalars leave the device only at logging steps; checkpoints
every `train.checkpoint_every` steps, at the end and on SIGTERM/SIGINT (then the run returns
cleanly); a run of `train.max_nonfinite` skipped (non-finite) updates stops it with an error and
leaves the last checkpoint as it was. The same workdir resumes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from ldm_jax import config as config_lib
from ldm_jax.config import data_config
from ldm_jax.data import pipeline
from ldm_jax.evaluation import shapes as shapes_checker
from ldm_jax.ldm import adapters, sources
from ldm_jax.runs import run_record
from ldm_jax.runs.checkpoint import StageCheckpoints, damaged_newest, step_folders
from ldm_jax.runs.writer import MetricWriter, image_grid, save_png
from ldm_jax.runtime import sharding, xla_options
from ldm_jax.runtime.compilation_cache import enable_compilation_cache
from ldm_jax.training import autoencoder_stage, end_of_run, ldm_stage

log = logging.getLogger("ldm_jax.train")


LORA_FOLDER = "lora"  # a LoRA run's <workdir>/lora/pytorch_lora_weights.safetensors (pipe.load_lora_weights(folder))


class NonFiniteError(RuntimeError):
    pass


class Preemption:
    """Turns SIGTERM / SIGINT into a flag the loop polls after each step (save, then return)."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, no preemption support
                pass
        return self

    def _handle(self, signum, frame):
        log.warning("signal %d: saving a checkpoint, then stopping", signum)
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclasses.dataclass
class StageResult:
    state: Any
    status: str  # "done" | "preempted"
    meta: dict


def run_stage(name: str, *, config, workdir: str, mesh, writer: MetricWriter | None, init_fn: Callable,
              step_fn: Callable, total_steps: int, data: pipeline.DataConfig, frozen=None,
              meta: dict | None = None, on_log: Callable | None = None,
              preemption: Preemption | None = None, latents=None,
              end_of_stage_row: Callable[[dict], bool] = lambda row: False) -> StageResult:
    """Run one stage to `total_steps` (resuming from its latest complete checkpoint). See the
    module docstring.

    `meta` (JSON) is saved with every checkpoint; a restored checkpoint's meta wins. `latents`:
    a precomputed table the batches carry rows of instead of images (pipeline.make_dataset).
    On resume, metrics.jsonl forgets this stage's rows after the restored step and its
    `end_of_stage_row`s: they are written again, so the file reads as one uninterrupted run.
    """
    t = config.train
    ckpt = StageCheckpoints(workdir, name, keep=t.keep_checkpoints, repair=jax.process_index() == 0)
    rng = jax.random.PRNGKey(config.seed)
    abstract = jax.eval_shape(init_fn, rng)
    shardings = sharding.tree_shardings(abstract, mesh, config.mesh.shard_params)
    batches = pipeline.make_batches(data, mesh, latents=latents)
    if ckpt.latest_step() is not None:
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        state, data_state, saved_meta = ckpt.restore(target)
        meta = saved_meta or meta
        if data_state:
            batches.set_state(data_state)
        log.info("%s: resumed from step %d", name, int(state.step))
    else:
        state = jax.jit(init_fn, out_shardings=shardings, compiler_options=xla_options.compiler_options())(rng)
    meta = meta or {}
    start = int(state.step)
    if writer is not None and not run_record.is_finished(workdir, name, total_steps):
        prefix = f"{name}/"
        writer.drop_rows(lambda row: end_of_stage_row(row) or (
            row.get("step", 0) > start and any(k.startswith(prefix) for k in row)))
    if start >= total_steps:
        ckpt.close()
        return StageResult(state, "done", meta)

    step = jax.jit(step_fn, donate_argnums=0, out_shardings=(shardings, sharding.replicated(mesh)),
                   compiler_options=xla_options.compiler_options())
    images_per_step = data.batch_size
    bar = tqdm.tqdm(total=total_steps, initial=start, desc=name, disable=jax.process_index() != 0, dynamic_ncols=True,
                    mininterval=0.1 if sys.stderr.isatty() else 30.0)  # a line every 30 s in log files
    status, last_saved = "done", None
    window_start, window_steps = time.perf_counter(), 0
    try:
        for i in range(start, total_steps):
            batch = {k: v for k, v in next(batches).items() if k not in pipeline.HOST_ONLY}
            state, metrics = step(state, batch, frozen)
            window_steps += 1
            bar.update(1)
            done = i + 1
            if done % t.log_every == 0 or done == total_steps:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                elapsed = time.perf_counter() - window_start
                metrics.update(images_per_s=window_steps * images_per_step / elapsed,
                               step_time_s=elapsed / window_steps,
                               skipped_steps=float(state.nonfinite))
                window_start, window_steps = time.perf_counter(), 0
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['images_per_s']:.0f}")
                if writer is not None:
                    writer.write_scalars(done, {f"{name}/{k}": v for k, v in metrics.items()})
                if int(state.max_nonfinite_streak) >= t.max_nonfinite:
                    raise NonFiniteError(
                        f"{name}: {int(state.max_nonfinite_streak)} consecutive non-finite updates by step {done} "
                        f"(train.max_nonfinite={t.max_nonfinite}); stopping. The last checkpoint "
                        f"(step {ckpt.latest_step()}) is intact.")
                if on_log is not None:
                    on_log(done, state)
            if preemption is not None and preemption.requested:
                ckpt.save(done, state, batches.get_state(), meta)
                status, last_saved = "preempted", done
                break
            if done % t.checkpoint_every == 0 or done == total_steps:
                ckpt.save(done, state, batches.get_state(), meta)
                last_saved = done
    finally:
        bar.close()
        ckpt.close()
    log.info("%s: %s at step %s", name, status, last_saved)
    return StageResult(state, status, meta)


def to_host(tree):
    """Numpy copies of (global) arrays on every process. With several processes, arrays that are
    not replicated are gathered (a collective: every process must call this). Evaluation then
    runs on process 0's own device."""
    from jax.experimental import multihost_utils

    def one(x):
        if not isinstance(x, jax.Array):
            return np.asarray(x)
        if x.is_fully_addressable:
            return np.asarray(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)


def _is_shapes(config) -> bool:
    """Whether the shapes checker can judge this run (shapes data with its captions)."""
    return config.data.name == "shapes" and config.data.caption_key == "caption"


def _eval_captions(config, split: str, count: int) -> list[str]:
    source = pipeline.load_source(data_config(config, split=split))
    rng = np.random.default_rng(0)
    idx = rng.choice(len(source), size=min(count, len(source)), replace=False)
    return [source[int(i)][config.data.caption_key].decode() for i in idx]


def run_autoencoder(config, workdir, mesh, writer, preemption) -> tuple[dict | None, str]:
    """The autoencoder of the run, as `autoencoder.source` says: stage 1 trained here (when it is
    among the stages), or its parameters loaded (`ldm.sources.autoencoder_params`: this run's
    own stage-1 checkpoint, another workdir's, a diffusers VAE, none). Returns (params, status)."""
    if "autoencoder" not in config.stages or not sources.trains_autoencoder(config):
        return sources.autoencoder_params(config, workdir, mesh), "done"
    ae = config.autoencoder
    module = autoencoder_stage.make_autoencoder(ae, config.data.image_size)
    frozen = autoencoder_stage.load_frozen(config)  # the LPIPS network's weights, or None
    if frozen is not None:
        frozen = jax.device_put(frozen, sharding.replicated(mesh))
    result = run_stage(
        "autoencoder", config=config, workdir=workdir, mesh=mesh, writer=writer,
        init_fn=lambda rng: autoencoder_stage.init_state(config, rng),
        step_fn=autoencoder_stage.make_train_step(config), frozen=frozen,
        total_steps=ae.steps, data=data_config(config, batch_size=ae.batch_size, caption_key=None),
        preemption=preemption,  # stage 1 needs images only: no tokenisation
        end_of_stage_row=lambda row: any(k.startswith("autoencoder/recon_") for k in row),
    )
    params = result.state.params["autoencoder"]
    evaluate = result.status == "done" and not run_record.is_finished(workdir, "autoencoder", ae.steps)
    if evaluate and _is_shapes(config):
        host_params = to_host(params)  # every process takes part; process 0 evaluates
    if evaluate and _is_shapes(config) and jax.process_index() == 0:
        captions = _eval_captions(config, "test", config.eval.num_samples)
        images = _render_captions(config, captions)
        acc = autoencoder_stage.reconstruction_accuracy(module, host_params, images, captions, batch_size=64)
        recon = autoencoder_stage.to_uint8(autoencoder_stage.reconstruct(module, host_params, images[:16]))
        log.info("autoencoder reconstructions judged by the shapes checker: %s", acc)
        if writer is not None:
            writer.write_scalars(ae.steps, {f"autoencoder/recon_{k}": v for k, v in acc.items()})
            writer.write_images(ae.steps, {"autoencoder/reconstructions": image_grid(np.concatenate([images[:16], recon]), cols=16)})
    if evaluate and jax.process_index() == 0:
        run_record.mark_finished(workdir, "autoencoder", ae.steps)
    return params, result.status


def _render_captions(config, captions) -> np.ndarray:
    from ldm_jax.data import shapes

    rng = np.random.default_rng(1)
    return np.stack([shapes.render(config.data.image_size, *shapes_checker.parse_caption(c), rng) for c in captions])


def run_ldm(config, workdir, mesh, writer, preemption, ae_params) -> StageResult:
    """Stage 2: the latent diffusion model on the frozen autoencoder's latents, then (once) its
    samples and the end-of-run evaluation."""
    models = ldm_stage.build_models(config)

    # The frozen inputs: the autoencoder, a pretrained text encoder, the latent scale (the step
    # needs it, so it is resolved before the loop: from the checkpoint if there is one).
    meta, finished = _ldm_meta(config, workdir, models, ae_params)
    host_frozen = {"autoencoder": ae_params, "scale": np.float32(meta["scale_factor"])}
    text_encoder = sources.text_encoder_params(config)  # a frozen pretrained one, or None
    if text_encoder is not None:
        host_frozen["text_encoder"] = text_encoder
    lora = adapters.from_config(config)  # LoRA: the base UNet is frozen, the adapters train
    if lora is not None:
        host_frozen["unet"] = lora.base_unet_params(models)
    host_frozen = to_host(host_frozen)
    frozen = jax.device_put(host_frozen, sharding.replicated(mesh))  # placed once, not per step
    log.info("latent scale factor %.5f", meta["scale_factor"])
    latents = None if finished else _latent_table(config, models, host_frozen["autoencoder"])

    # Sample grids of the EMA model: every train.sample_every steps and at the end.
    sample_fn = jax.jit(ldm_stage.make_sample_fn(config, models), compiler_options=xla_options.compiler_options())
    grid = models.conditioning.grid(config.train.sample_prompts)
    grid_conditions = ldm_stage.conditions_for(models, prompts=grid)

    def write_samples(step, ema_params):
        images = np.asarray(sample_fn(ema_params, host_frozen, grid_conditions, jax.random.PRNGKey(0)))
        grid = image_grid(images, cols=len(images))
        writer.write_images(step, {"ldm/samples_ema": grid})
        save_png(os.path.join(workdir, "samples", f"step_{step:07d}.png"), grid)

    def on_log(step, state):
        if step % config.train.sample_every:
            return
        ema = to_host(state.ema_params)  # on every process; process 0 samples and writes
        if writer is not None:
            write_samples(step, ema)

    # Training.
    result = run_stage(
        "ldm", config=config, workdir=workdir, mesh=mesh, writer=writer,
        init_fn=lambda rng: ldm_stage.init_state(config, models, rng),
        step_fn=ldm_stage.make_train_step(config, models), total_steps=config.train.steps,
        data=data_config(config), frozen=frozen, meta=meta, on_log=on_log, preemption=preemption, latents=latents,
        end_of_stage_row=lambda row: row.get("step") == config.train.steps and any(
            k.startswith(f"eval/{split}/") for split in config.eval.splits for k in row),
    )

    # The end of the run: the last samples and the evaluators, once.
    if result.status == "done" and not run_record.is_finished(workdir, "ldm", config.train.steps):
        ema = to_host(result.state.ema_params)
        if writer is not None and lora is not None:  # the EMA adapters, as diffusers reads them
            log.info("wrote %s", lora.export(os.path.join(workdir, LORA_FOLDER), ema["lora"], models))
        if writer is not None:
            write_samples(config.train.steps, ema)
            end_of_run.evaluate(end_of_run.TrainedRun(config, models, sample_fn, ema, host_frozen),
                                workdir, writer, config.train.steps)
            run_record.mark_finished(workdir, "ldm", config.train.steps)
    return result


def _ldm_meta(config, workdir: str, models, ae_params) -> tuple[dict, bool]:
    """(the diffusion checkpoint's metadata, or a new run's: the latent scale factor; whether the
    stage has already trained to train.steps)."""
    ckpt = StageCheckpoints(workdir, "ldm")
    latest = ckpt.latest_step()
    meta = ckpt.restore_meta() if latest is not None else {}
    ckpt.close()
    if not meta:
        scale = config.autoencoder.scale_factor
        if models.codec.is_identity:
            scale = 1.0
        elif scale is None:  # LDM's scale_by_std: 1/std of the latents of the first training batch
            first = pipeline.make_batches(data_config(config), None, process_index=0, process_count=1)
            images = jnp.asarray(next(first)["image"])
            scale = autoencoder_stage.estimate_scale_factor(models.autoencoder, ae_params, images,
                                                            jax.random.PRNGKey(config.seed))
        meta = {"scale_factor": float(scale)}
    return meta, latest is not None and latest >= config.train.steps


def _latent_table(config, models, ae_params):
    """train.cache_latents: the training split's latents encoded once (`ldm_stage.encode_split`),
    or None (off, pixel space, flipped images, or too large)."""
    if not config.train.cache_latents or models.codec.is_identity:
        return None
    if config.data.flip:
        log.info("train.cache_latents: not with data.flip=True (a flipped image has other latents); "
                 "the step encodes its batches")
        return None
    t0 = time.perf_counter()
    data = data_config(config)
    latents = ldm_stage.encode_split(models, ae_params, pipeline.load_source(data), data)
    if latents is None:
        log.info("train.cache_latents: the split's latents would exceed %d bytes; the step encodes its "
                 "batches", ldm_stage.CACHE_LIMIT_BYTES)
    else:
        log.info("encoded the %d training images' latents in %.1f s", len(latents), time.perf_counter() - t0)
    return latents


def checkpoint_steps(workdir: str, stage: str) -> list[int]:
    return step_folders(os.path.join(workdir, "checkpoints", stage))


def train_and_evaluate(config, workdir: str) -> dict:
    """Train the configured stages in `workdir` (resuming what is there); returns a summary.

    Everything is checked before anything is written: the config (`config_lib.validate`), the
    mesh, and on resume the stored config (`run_record.check_resume`: only keys that cannot change
    what was trained may differ; they are appended to config_history.jsonl). The stored
    config.json is never overwritten. Process 0 holds the workdir's lock while it trains.
    """
    config_lib.validate(config)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    resuming = os.path.isfile(os.path.join(workdir, run_record.CONFIG_FILE))
    also = resume_also(workdir)
    if resuming:
        run_record.check_resume(workdir, config, run_record.load(workdir), also)
    elif os.path.isdir(os.path.join(workdir, "checkpoints")) and os.listdir(os.path.join(workdir, "checkpoints")):
        raise run_record.RunConfigError(f"workdir {workdir} holds checkpoints but no config.json: its config is lost, "
                                        "so it cannot be resumed safely; use another --workdir")
    for stage in ("autoencoder", "ldm"):  # a stage with checkpoints but none complete cannot resume
        damaged_newest(os.path.join(workdir, "checkpoints", stage))
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    for name, d in (("data", config.data), ("autoencoder", config.autoencoder)):
        if d.batch_size % mesh.devices.size:
            raise ValueError(f"{name}.batch_size={d.batch_size} must be divisible by the {mesh.devices.size} devices of the mesh")
    enable_compilation_cache()
    created = not os.path.isdir(workdir)
    os.makedirs(workdir, exist_ok=True)
    before = _files(workdir)
    lock = run_record.WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
    with lock:
        if jax.process_index() == 0:
            if resuming:  # again, under the lock: the checks above ran before we held it
                run_record.append_history(workdir, run_record.check_resume(workdir, config, run_record.load(workdir), also))
            else:
                run_record.write_config(workdir, config)
        if _finished(config, workdir):  # a rerun of a finished run changes nothing
            log.info("%s: every stage has trained and been evaluated; nothing to do", workdir)
            return {"workdir": workdir, "status": "done",
                    **({"step": int(config.train.steps)} if "ldm" in config.stages else {})}
        try:
            return _train_stages(config, workdir, mesh)
        except Exception:
            if not resuming and jax.process_index() == 0 and not any(
                    checkpoint_steps(workdir, stage) for stage in ("autoencoder", "ldm")):
                _remove_new_files(workdir, before, created)  # a first start that failed leaves no run behind
            raise


# What an imported model (`convert --from_diffusers`: a diffusion checkpoint at step 0, nothing trained
# yet) may still be given on its first start: the data it fine-tunes on and DreamBooth's prior
# preservation (configs/sd15_dreambooth.py, full fine-tuning).
IMPORT_CHOICES = ("data.*", "dreambooth.*")


def resume_also(workdir: str) -> tuple[str, ...]:
    """The keys (fnmatch patterns) that may change on resume besides run_record.RESUMABLE: stage 1
    may train longer only while no diffusion step has used its latents; an imported, untrained model
    may still choose its data (IMPORT_CHOICES)."""
    steps = checkpoint_steps(workdir, "ldm")
    if not steps:
        return ("autoencoder.steps",)
    return IMPORT_CHOICES if steps == [0] else ()


def _files(folder: str) -> set[str]:
    """Every file and folder under `folder`."""
    return {os.path.join(root, name) for root, dirs, names in os.walk(folder) for name in dirs + names}


def _remove_new_files(workdir: str, before: set[str], created: bool) -> None:
    """Remove what this start wrote (its config.json, logs, empty checkpoint folders) so that
    the same workdir can start again with a corrected config; the lock file last."""
    new = sorted(_files(workdir) - before, key=len, reverse=True)  # deepest first
    for path in new:
        if os.path.isfile(path) and os.path.basename(path) != run_record.LOCK_FILE:
            os.remove(path)
    for path in new:
        if os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)
    if run_record.LOCK_FILE not in {os.path.basename(p) for p in before}:
        os.remove(os.path.join(workdir, run_record.LOCK_FILE))
    if created and not os.listdir(workdir):
        os.rmdir(workdir)


def _finished(config, workdir: str) -> bool:
    stages = {"autoencoder": config.autoencoder.steps, "ldm": config.train.steps}
    return all(run_record.is_finished(workdir, stage, stages[stage]) and checkpoint_steps(workdir, stage)
               and checkpoint_steps(workdir, stage)[-1] == stages[stage] for stage in config.stages)


def _train_stages(config, workdir: str, mesh) -> dict:
    writer = MetricWriter(workdir) if jax.process_index() == 0 else None
    summary: dict = {"workdir": workdir}
    timings = {}
    try:
        with Preemption() as preemption:
            ae_params = {}
            if "autoencoder" in config.stages or "ldm" in config.stages:
                t0 = time.perf_counter()
                ae_params, status = run_autoencoder(config, workdir, mesh, writer, preemption)
                timings["autoencoder_s"] = time.perf_counter() - t0
                if status != "done":
                    return {**summary, "status": status}
            if "ldm" in config.stages:
                t0 = time.perf_counter()
                result = run_ldm(config, workdir, mesh, writer, preemption, ae_params)
                timings["ldm_s"] = time.perf_counter() - t0
                summary.update(status=result.status, step=int(result.state.step))
            else:
                summary["status"] = "done"
    finally:
        if writer is not None:
            writer.close()
    summary.update(timings)
    return summary
