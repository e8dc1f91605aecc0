"""python -m ldm_jax.evaluate --workdir runs/base --metrics bpd,prompt_accuracy

Evaluates a training run's latest diffusion checkpoint (or `--step`), with its EMA parameters
unless `--noema`. Writes `eval/<step>/<metric>.json` and `eval/<step>/summary.md` in the workdir
and logs the numbers to the run's TensorBoard events and metrics.jsonl.

Metrics: bpd, prompt_accuracy (shapes), digit_accuracy and digits_fid (digits), shapes_fid
(shapes), diversity (shapes, digits: 4 samples per caption against 4 real images of it), fid
(needs `--inception_weights`, the standard FID Inception network's weights as a local file),
clip_score (needs `--clip_model`, a local transformers CLIP folder), recon (the autoencoder).

Quality vs. sampler steps (a table and a PNG plot in eval/<step>/):

    python -m ldm_jax.evaluate --workdir runs/base --metrics prompt_accuracy \\
        --sweep_samplers ddim,dpm_solver++ --sweep_steps 5,10,20,50

Bad input (no checkpoint, a metric this run cannot have, a missing weights file) fails with one
line on stderr and exit status 1.
"""
from __future__ import annotations

import sys

from absl import app, flags
from absl import logging as absl_logging

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "the training run to evaluate (python -m ldm_jax.train's --workdir)")
    flags.DEFINE_list("metrics", ["bpd"], "comma-separated: bpd, prompt_accuracy, digit_accuracy, digits_fid, "
                      "shapes_fid, diversity, fid, clip_score, recon")
    flags.DEFINE_integer("step", None, "the ldm checkpoint step (default: the latest)")
    flags.DEFINE_bool("ema", True, "evaluate the EMA parameters (--noema: the raw ones)")
    flags.DEFINE_string("sampler", None, "sampler for the sampling metrics (default: the run's)")
    flags.DEFINE_integer("steps", None, "sampler steps (default: the run's)")
    flags.DEFINE_float("guidance", None, "classifier-free guidance scale (default: the run's)")
    flags.DEFINE_enum("spacing", None, ["leading", "trailing", "linspace"],
                      "which timesteps the sampler visits (default: the run's sampler.spacing)")
    flags.DEFINE_integer("num_samples", 256, "samples per split for the sampling metrics")
    flags.DEFINE_list("splits", None, "dataset splits (default: the run's eval.splits)")
    flags.DEFINE_integer("batch_size", 64, "images per compiled sampling batch")
    flags.DEFINE_integer("seed", 0, "sampling seed (image i of a split uses seed + i)")
    flags.DEFINE_integer("bpd_examples", 64, "held-out examples for bpd (each costs T model calls)")
    flags.DEFINE_integer("bpd_batch_size", 16, "examples per compiled bpd batch")
    flags.DEFINE_integer("ode_steps", 100, "ode_bpd's Heun steps through the probability-flow ODE")
    flags.DEFINE_string("inception_weights", None, "FID Inception-v3 weights (.safetensors / .npz / .pth)")
    flags.DEFINE_string("clip_model", None, "a local transformers CLIP checkpoint folder, for clip_score")
    flags.DEFINE_list("sweep_samplers", None, "quality vs steps: samplers (with --sweep_steps)")
    flags.DEFINE_list("sweep_steps", None, "quality vs steps: step counts (with --sweep_samplers)")
    flags.DEFINE_integer("diversity_samples", 4, "samples per caption for diversity (num_samples // it captions)")
    flags.DEFINE_bool("progress", False, "a progress bar over each sampling batch's steps")


def options_from_flags():
    from ldm_jax.evaluation.runner import EvalOptions

    return EvalOptions(step=FLAGS.step, ema=FLAGS.ema, sampler=FLAGS.sampler, num_steps=FLAGS.steps,
                       guidance=FLAGS.guidance, spacing=FLAGS.spacing, num_samples=FLAGS.num_samples,
                       splits=tuple(FLAGS.splits) if FLAGS.splits else None, batch_size=FLAGS.batch_size,
                       seed=FLAGS.seed, bpd_examples=FLAGS.bpd_examples, bpd_batch_size=FLAGS.bpd_batch_size,
                       ode_steps=FLAGS.ode_steps, inception_weights=FLAGS.inception_weights,
                       clip_model=FLAGS.clip_model,
                       diversity_samples=FLAGS.diversity_samples, progress=FLAGS.progress)


def _sweep_steps(values) -> list[int]:
    try:
        return [int(n) for n in values]
    except ValueError:
        raise ValueError(f"--sweep_steps must be comma-separated positive integers, got {','.join(values)}") from None


def main(argv) -> int:
    absl_logging.set_verbosity(absl_logging.WARNING)
    from ldm_jax.evaluation import runner
    from ldm_jax.runtime.compilation_cache import enable_compilation_cache

    if len(argv) > 1:
        print(f"error: unexpected arguments: {' '.join(argv[1:])} (every input is a flag, e.g. --metrics)",
              file=sys.stderr)
        return 1
    if not FLAGS.workdir:
        print("error: --workdir is required", file=sys.stderr)
        return 1
    enable_compilation_cache()
    try:
        if FLAGS.sweep_samplers or FLAGS.sweep_steps:
            if not (FLAGS.sweep_samplers and FLAGS.sweep_steps) or len(FLAGS.metrics) != 1:
                raise ValueError("a steps sweep needs --sweep_samplers, --sweep_steps and exactly one --metrics")
            steps = _sweep_steps(FLAGS.sweep_steps)
            table = runner.steps_sweep(FLAGS.workdir, FLAGS.metrics[0], FLAGS.sweep_samplers, steps, options_from_flags())
            for name, row in table.items():
                print(name, " ".join(f"{n}:{v:.4g}" for n, v in row.items()))
            return 0
        results = runner.evaluate(FLAGS.workdir, FLAGS.metrics, options_from_flags())
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    for name, record in results.items():
        print(f"{name} ({record['wall_s']:.0f} s): {runner.headline(name, record['result'])}")
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(lambda argv: sys.exit(main(argv)))
