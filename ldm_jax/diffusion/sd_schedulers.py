"""Stable Diffusion's schedulers, step for step as diffusers runs them.

A diffusers folder names its scheduler (``scheduler/scheduler_config.json``); users swap in
others (``DPMSolverMultistepScheduler.from_config(..., use_karras_sigmas=True)``). They expect the
images diffusers gives. Our own samplers (`samplers.sample`) are the textbook algorithms; the
schedulers differ from them in many small ways that change the images: DDIM and PNDM end at
``alphas_cumprod[0]`` when ``set_alpha_to_one`` is false (every real SD 1.x / 2.x folder), DDIM
steps to ``t - T // N`` whatever the spacing, PNDM repeats a timestep, Euler's initial noise is
``sqrt(sigma_max^2 + 1)`` for leading spacing, DPM-Solver's grids are ``linspace(0, T-1, N+1)``
without the last, Karras sigmas span a different range in each class, LMS integrates Lagrange
polynomials in sigma, and so on.

This module reproduces them: `Scheduler.from_config(config)` reads a scheduler config (every key
either implemented or refused by name; keys another class owns are ignored, as diffusers ignores
them; `sd_scheduler_config`), `plan(scheduler, num_steps, start_step)` is numpy's replay of
``set_timesteps`` and of the pipeline's loop (which timesteps the UNet sees, at which input scale,
with which step coefficients; `sd_scheduler_plans`), and `sample` is the jittable loop (one
`lax.scan` over the network evaluations), here.
The loop's state lives in the scheduler's own space, as in diffusers (the sigma-space
schedulers' sample is ``x_vp * sqrt(1 + sigma^2)``); the network sees ``c_in * x``.

Supported: DDIMScheduler, PNDMScheduler (PLMS, ``skip_prk_steps``), DDPMScheduler,
LMSDiscreteScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
HeunDiscreteScheduler, DPMSolverMultistepScheduler (dpmsolver++ and sde-dpmsolver++, orders 1-3)
and UniPCMultistepScheduler (bh2, in `solvers`).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion import schedules
from ldm_jax.diffusion.noise import normal as _normal, split as _split
from ldm_jax.diffusion.sd_scheduler_config import (  # noqa: F401  (re-exported: the public names)
    CLASS_KEYS, KINDS, SAMPLING_KEYS, SCHEDULER_CLASSES, Scheduler, schedule_from_scheduler_config)
from ldm_jax.diffusion.sd_scheduler_plans import alphas_cumprod, plan, timesteps  # noqa: F401


# ---------------------------------------------------------------------------------------------
# The loop


def _threshold(s: Scheduler, x0):
    """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3), as diffusers'
    _threshold_sample: s = the ratio-quantile of |x0| per example, clamped to [1, max]; then
    x0 is clipped to [-s, s] and divided by s. Else clip_sample's fixed range, if set."""
    o = s.options_dict
    if o.get("thresholding"):
        flat = jnp.abs(x0.reshape(x0.shape[0], -1))
        q = jnp.quantile(flat, o["dynamic_thresholding_ratio"], axis=1)
        q = jnp.clip(q, 1.0, o["sample_max_value"]).reshape((-1,) + (1,) * (x0.ndim - 1))
        return jnp.clip(x0, -q, q) / q
    if o.get("clip_sample"):
        r = o["clip_sample_range"]
        return jnp.clip(x0, -r, r)
    return x0


def _x0_eps_alpha(pred, out, x, a):
    """(x0, eps) from the network output at abar a (x = sqrt(a) x0 + sqrt(1 - a) eps)."""
    sa, sb = jnp.sqrt(a), jnp.sqrt(1.0 - a)
    if pred == "eps":
        return (x - sb * out) / sa, out
    if pred == "x0":
        return out, (x - sa * out) / sb
    return sa * x - sb * out, sa * out + sb * x  # v


def _x0_sigma(pred, out, x, sigma):
    """x0 from the network output in the sigma-space classes (x = x0 + sigma eps)."""
    if pred == "eps":
        return x - sigma * out
    if pred == "x0":
        return out
    return out * (-sigma / jnp.sqrt(sigma**2 + 1.0)) + x / (sigma**2 + 1.0)  # v


def _init_carry(kind, x):
    if kind == "pndm":
        return {"x": x, "ets": jnp.zeros((4,) + x.shape), "cur": x}
    if kind == "heun":
        return {"x": x, "d": jnp.zeros_like(x), "x_first": x}
    if kind == "lms":
        return {"x": x, "d": jnp.zeros((4,) + x.shape)}
    if kind == "dpm":
        return {"x": x, "m": jnp.zeros((2,) + x.shape)}
    return {"x": x}


def _step(s: Scheduler, eta, carry, out, inp, noise):
    """One scheduler.step(): (carry, out = the network output, inp = this evaluation's plan row)."""
    kind, pred, x = s.kind, s.prediction, carry["x"]
    if kind in ("ddim", "ddpm"):
        a, ap = inp["a_t"], inp["a_prev"]
        x0, eps = _x0_eps_alpha(pred, out, x, a)
        x0 = _threshold(s, x0)
        if kind == "ddim":
            std = eta * jnp.sqrt((1.0 - ap) / (1.0 - a) * (1.0 - a / ap))
            return {"x": jnp.sqrt(ap) * x0 + jnp.sqrt(jnp.maximum(1.0 - ap - std**2, 0.0)) * eps + std * noise, "x0": x0}
        alpha_t, beta_t = a / ap, 1.0 - a / ap
        mean = (jnp.sqrt(ap) * beta_t / (1.0 - a)) * x0 + (jnp.sqrt(alpha_t) * (1.0 - ap) / (1.0 - a)) * x
        var = beta_t if s["variance_type"] == "fixed_large" else jnp.maximum((1.0 - ap) / (1.0 - a) * beta_t, 1e-20)
        return {"x": mean + inp["noisy"] * jnp.sqrt(var) * noise, "x0": x0}
    if kind == "pndm":
        ets, mode = carry["ets"], inp["mode"]
        pushed = jnp.concatenate([ets[1:], out[None]], axis=0)  # newest last
        ets = jnp.where(mode == 1, ets, pushed)
        e = [ets[3], ets[2], ets[1], ets[0]]
        combos = [out, (out + carry["ets"][3]) / 2, (3 * e[0] - e[1]) / 2, (23 * e[0] - 16 * e[1] + 5 * e[2]) / 12,
                  (55 * e[0] - 59 * e[1] + 37 * e[2] - 9 * e[3]) / 24]
        m = jnp.select([mode == i for i in range(5)], combos)
        sample = jnp.where(mode == 1, carry["cur"], x)
        a, ap = inp["a_t"], inp["a_prev"]
        if pred == "v":
            m = jnp.sqrt(a) * m + jnp.sqrt(1.0 - a) * sample
        denom = a * jnp.sqrt(1.0 - ap) + jnp.sqrt(a * (1.0 - a) * ap)
        x_prev = jnp.sqrt(ap / a) * sample - (ap - a) * m / denom
        x0 = (sample - jnp.sqrt(1.0 - a) * m) / jnp.sqrt(a)
        return {"x": x_prev, "ets": ets, "cur": jnp.where(mode == 0, x, carry["cur"]), "x0": x0}
    if kind in ("euler", "euler_a", "lms"):
        sigma = inp["sigma"]
        x0 = _x0_sigma(pred, out, x, sigma)
        d = (x - x0) / sigma
        if kind == "euler":
            return {"x": x + d * (inp["sigma_next"] - sigma), "x0": x0}
        if kind == "euler_a":
            return {"x": x + d * (inp["sigma_down"] - sigma) + noise * inp["sigma_up"], "x0": x0}
        hist = jnp.concatenate([d[None], carry["d"][:-1]], axis=0)  # newest first
        return {"x": x + jnp.tensordot(inp["lms"], hist, axes=1), "d": hist, "x0": x0}
    if kind == "heun":
        # first order from sigma_k to sigma_k+1; the correction (odd k, at the step's end)
        # averages the two slopes and redoes the step from the stored sample
        first = inp["first"] > 0.5
        x0 = _threshold(s, _x0_sigma(pred, out, x, inp["sigma"]))
        d_now = (x - x0) / inp["sigma"]
        d = jnp.where(first, d_now, (carry["d"] + d_now) / 2)
        base = jnp.where(first, x, carry["x_first"])
        return {"x": base + d * inp["dt"], "d": d_now, "x_first": base, "x0": x0}
    if kind == "dpm":
        x0 = _threshold(s, (x - inp["sigma_t"] * out) / inp["alpha"] if pred == "eps" else
                        (out if pred == "x0" else inp["alpha"] * x - inp["sigma_t"] * out))
        m = carry["m"]
        x_next = inp["A"] * x + inp["B"][0] * x0 + inp["B"][1] * m[0] + inp["B"][2] * m[1] + inp["C"] * noise
        return {"x": x_next, "m": jnp.stack([x0, m[0]]), "x0": x0}
    raise ValueError(f"unknown scheduler kind {kind!r}")


STOCHASTIC = ("ddpm", "euler_a")  # always draw noise; ddim with eta > 0 and sde-dpmsolver++ too


def is_stochastic(s: Scheduler, eta=0.0) -> bool:
    """Whether sampling with `s` draws noise after the start (ddim only with eta > 0)."""
    return (s.kind in STOCHASTIC or (s.kind == "ddim" and eta > 0)
            or (s.kind == "dpm" and s["algorithm_type"] == "sde-dpmsolver++"))


def start_state(p: dict, noise, z0=None):
    """The loop's first state: text -> image, ``init_sigma * noise`` (diffusers' prepare_latents);
    from an image (img2img, inpainting below strength 1), ``add_noise(z0, noise, timesteps[0])``."""
    if z0 is None:
        return p["init_sigma"] * noise
    return p["start"][0] * z0 + p["start"][1] * noise


def sample(model_fn, s: Scheduler, shape, rng, num_steps: int, *, eta=0.0, x_T=None, start_step: int = 0,
           after_step=None, noise=None, return_trajectory: int = 0):
    """Run diffusers' pipeline loop with scheduler `s`: returns the final latents (in the
    scheduler's space, as diffusers returns them), and with `return_trajectory` = k > 0 also
    {"x_t", "pred_x0", "t"} every k evaluations (x_t variance-preserving).

    model_fn(x_in [B, ...], t [B] float32) -> the network's (guided) output; x_in is already
      scale_model_input's c_in * x. Wrap models with bound arrays in `jax.tree_util.Partial`.
    x_T: the first state, in the scheduler's space (`start_state`); default init_sigma * N(0, I).
    start_step: img2img's t_start (the plan starts at timesteps[t_start * order]).
    after_step: (x_vp, step, abar_next) -> x_vp after every evaluation (inpainting's blend at
      the level diffusers noises the known latents to; abar_next = 1 after the last).
    noise: [K, *shape] the noise of each evaluation (K = len(plan(...)["t"])), for the
      stochastic schedulers (default: drawn from rng; rng may be one key per example).
    """
    from ldm_jax.diffusion.model_fn import as_pytree_fn

    shape = tuple(int(d) for d in shape)
    p = plan(s, num_steps, start_step)
    K = len(p["t"])
    if noise is not None and tuple(noise.shape) != (K,) + shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {(K,) + shape} (one per network evaluation)")
    if s.kind == "unipc":
        return _sample_unipc(model_fn, s, shape, rng, num_steps, x_T=x_T, start_step=start_step,
                             after_step=after_step, return_trajectory=return_trajectory)
    hook = None if after_step is None else as_pytree_fn(after_step)
    tables = {k: v for k, v in p.items() if k not in ("init_sigma", "start")}
    return _loop(as_pytree_fn(model_fn), tables, rng, jnp.asarray(eta, jnp.float32), x_T, hook, noise,
                 jnp.float32(p["init_sigma"]), scheduler=s, shape=shape, record_every=int(return_trajectory),
                 draw=is_stochastic(s, 1.0))


def step_noise(rng, shape, num_evaluations: int):
    """The noise `sample` draws for its evaluations when none is given: [K, *shape], from the
    second half of `_split(rng, 2)` (one key, or one per example: then each example's noise
    depends on its own key only)."""
    return jax.vmap(lambda key: _normal(key, shape))(_split(rng, num_evaluations))


@jax.jit(static_argnames=("scheduler", "shape", "record_every", "draw"))
def _loop(model_fn, tables, rng, eta, x_T, after_step, noise, init_sigma, *, scheduler, shape, record_every, draw):
    init_key, loop_key = _split(rng, 2)
    x = init_sigma * _normal(init_key, shape) if x_T is None else x_T.astype(jnp.float32)
    K = tables["t"].shape[0]
    xs = dict(tables)
    if noise is not None:
        xs["noise"] = noise.astype(jnp.float32)
    elif draw:
        xs["noise"] = step_noise(loop_key, shape, K)
    xs["k"] = jnp.arange(K)
    batch = shape[0]
    record = None
    if record_every:
        n = math.ceil(K / record_every)
        record = {"x_t": jnp.zeros((n,) + shape), "pred_x0": jnp.zeros((n,) + shape)}

    def body(state, inp):
        carry, record = state
        x = carry["x"]
        out = model_fn(inp["c_in"] * x, jnp.broadcast_to(inp["t"], (batch,))).astype(jnp.float32)
        z = inp["noise"] if "noise" in inp else jnp.zeros(shape, jnp.float32)
        new = _step(scheduler, eta, carry, out, inp, z)
        x0 = new.pop("x0")
        carry = dict(carry, **new)
        if after_step is not None:
            space = inp["space"]
            carry["x"] = after_step(carry["x"] * space, inp["step"], inp["blend_abar"]) / space
        if record is not None:
            slot, keep = inp["k"] // record_every, inp["k"] % record_every == 0
            x_vp = inp["c_in"] * x  # the network's input: x in the variance-preserving space
            record = {"x_t": record["x_t"].at[slot].set(jnp.where(keep, x_vp, record["x_t"][slot])),
                      "pred_x0": record["pred_x0"].at[slot].set(jnp.where(keep, x0, record["pred_x0"][slot]))}
        return (carry, record), None

    (carry, record), _ = jax.lax.scan(body, (_init_carry(scheduler.kind, x), record), xs)
    if record is None:
        return carry["x"]
    return carry["x"], dict(record, t=tables["t"][::record_every])


def _sample_unipc(model_fn, s, shape, rng, num_steps, *, x_T, start_step, after_step, return_trajectory):
    from ldm_jax.diffusion import samplers

    ts = timesteps(s, num_steps, multistep=True).astype(np.int64)
    sched = alphas_cumprod(s)
    proc = schedules.NoiseSchedule("diffusers", 1.0 - sched / np.append(1.0, sched[:-1]))
    return samplers.sample(model_fn, proc, shape, rng, sampler="unipc", num_steps=num_steps,
                           prediction=s.prediction, times=np.append(ts, -1), order=s["solver_order"], x_T=x_T,
                           start_step=start_step, after_step=after_step, return_trajectory=return_trajectory)
