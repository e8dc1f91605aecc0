"""bpd: the full variational bound of held-out examples, in bits per dimension."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.evaluation.run import Z_95, Evaluator, Run, conditions_of


def compute_bpd(run: Run) -> dict:
    """The full variational bound of held-out examples (for VDM its continuous-time bound,
    `LatentDiffusion.vdm_bound`; otherwise with all T terms (Improved DDPM's
    `calc_bpd_loop`, through `likelihood.bits_per_dim`), in bits per dimension: per pixel
    dimension for pixel-space runs (the discretized decoder on 8-bit data, comparable with DDPM /
    Improved DDPM / VDM), per latent dimension for latent runs (a continuous Gaussian decoder on
    the scaled posterior means; a bound on the latents, not on the images). Conditional models are
    evaluated on each example's own caption or label (no guidance). Reports the mean of each part
    (prior L_T, decoder L_0, diffusion sum_{t>=1} L_{t-1}) and a 95% interval over examples."""
    pipe, o = run.pipe, run.options
    split = run.splits[0]
    data = run.examples(split, o.bpd_examples)
    model = pipe.model
    pixel = model.codec.is_identity
    context_fn = jax.jit(model.context)
    b, n = o.bpd_batch_size, len(data["image"])
    parts = {k: [] for k in ("total", "prior", "decoder", "diffusion")}
    terms = []
    for start in range(0, n, b):
        idx = np.arange(start, start + b).clip(max=n - 1)  # pad with the last example
        images = data["image"][idx]
        x0 = images.astype(np.float32) / 127.5 - 1.0 if pixel else pipe.encode(images)
        context = context_fn(pipe.params, jnp.asarray(conditions_of(run, data, idx)))
        out = model.bound(pipe.params, x0, context, jax.random.fold_in(jax.random.PRNGKey(o.seed), start))
        keep = min(b, n - start)
        for k in parts:
            parts[k].append(np.asarray(out[k])[:keep])
        terms.append(np.asarray(out["terms"])[:keep])
    result = {"split": split, "num_examples": n, "unit": "bits/dim" if pixel else "bits/latent-dim",
              "decoder_type": model.decoder}
    if model.continuous:  # VDM's continuous-time bound, its integral at stratified times
        result.update(process=model.process.name, num_times=int(np.asarray(terms[0]).shape[1]))
    else:
        result["num_timesteps"] = int(model.schedule.num_timesteps)
    for k, values in parts.items():
        v = np.concatenate(values).astype(np.float64)
        result[k] = float(v.mean())
        result[f"{k}_ci95"] = float(Z_95 * v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    result["per_example_total"] = np.concatenate(parts["total"]).tolist()
    result["terms_mean"] = np.concatenate(terms).mean(axis=0).tolist()  # L_t per t, bits/dim
    return result


def unavailable(run: Run) -> str | None:
    process = run.config.diffusion.get("process", "discrete")
    if process in ("flow", "edm"):
        return f"a {process!r} process has no variational bound; its likelihood is the probability-flow ODE's (metric ode_bpd)"
    return None


EVALUATOR = Evaluator("bpd", compute_bpd, unavailable, samples=False)
