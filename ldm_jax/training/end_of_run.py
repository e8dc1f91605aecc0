"""The training loop's evaluation of a finished diffusion stage, through the same evaluators as
`python -m ldm_jax.evaluate` (`evaluation.evaluators`): the run as they see it (`TrainedRun`),
sampled with the loop's own compiled sampler — batches of 64, the batch's noise from
`PRNGKey(first index)` — so the numbers are those the loop has always logged (the evaluate
command draws each image from a seed of its own instead)."""
from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np

from ldm_jax.evaluation.evaluators import EVALUATORS
from ldm_jax.evaluation.run import EvalOptions, RunData

log = logging.getLogger("ldm_jax.train")

END_OF_RUN_METRICS = ("prompt_accuracy",)  # computed after the last step when available for the run
BATCH = 64  # one compiled batch shape


class TrainedRun(RunData):
    """The EMA model at the end of training, for the evaluators: the config's eval splits and
    eval.num_samples; `generate` samples with the loop's `sample_fn(params, frozen, cond, rng)`."""

    def __init__(self, config, models, sample_fn, ema_params, frozen):
        super().__init__(config, EvalOptions(num_samples=int(config.eval.num_samples)))
        self.splits = tuple(config.eval.splits)  # none: no evaluation
        self.models, self.sample_fn, self.ema_params, self.frozen = models, sample_fn, ema_params, frozen

    def generate(self, conditions, *, seed_offset: int = 0, **settings) -> np.ndarray:
        del seed_offset, settings  # the loop's sampler and noise
        from ldm_jax.training import ldm_stage

        conditions = list(conditions)
        images = []
        for start in range(0, len(conditions), BATCH):
            chunk = conditions[start:start + BATCH]
            chunk = chunk + [chunk[-1]] * (BATCH - len(chunk))
            cond = ldm_stage.conditions_for(self.models, prompts=chunk)
            images.append(np.asarray(self.sample_fn(self.ema_params, self.frozen, cond, jax.random.PRNGKey(start))))
        return np.concatenate(images)[: len(conditions)]


def evaluate(run: TrainedRun, workdir: str, writer, step: int) -> dict:
    """Each of END_OF_RUN_METRICS that is available for the run: its numbers per split logged
    under eval/<split>/ and written to eval/<metric>_<step>.json. Returns {metric: result}."""
    out = {}
    for name in END_OF_RUN_METRICS:
        evaluator = EVALUATORS[name]
        if not run.splits or evaluator.unavailable(run):
            continue
        result = {split: {k: v for k, v in values.items() if k != "num_samples"}  # eval.num_samples says it
                  for split, values in evaluator.compute(run).items()}
        for split, values in result.items():
            writer.write_scalars(step, {f"eval/{split}/{k}": v for k, v in values.items()})
        os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
        with open(os.path.join(workdir, "eval", f"{name}_{step}.json"), "w") as f:
            json.dump(result, f, indent=1)
        log.info("%s: %s", name.replace("_", " "), result)
        out[name] = result
    return out
