"""Samplers: ddpm, ddim, plms, dpm_solver++, euler, heun; timestep spacing; classifier-free guidance.

`sample(model_fn, schedule, shape, rng, sampler=..., num_steps=...)` builds a per-step plan in
numpy (timesteps, abar, coefficients), then runs one jitted `lax.scan` over it. The plan, the rng,
eta, x_T and the bound arguments of a `jax.tree_util.Partial` model are traced, so the program is
compiled once per (model function, sampler, steps, shape) and reused for new seeds, prompts or
parameters. Every sampler starts from x_T ~ N(0, I) in the variance-preserving parameterisation
and returns x_0. Two hooks serve image editing: `start_step` starts part-way down the plan from a
given x_t (SDEdit), and `after_step` edits the state after every step (inpainting's blending).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from ldm_jax.diffusion import gaussian, processes, solvers
from ldm_jax.diffusion.model_fn import as_pytree_fn
from ldm_jax.diffusion.noise import normal as _normal, split as _split
from ldm_jax.diffusion.schedules import NoiseSchedule

SAMPLERS = ("ddpm", "ddim", "plms", "dpm_solver++", "euler", "heun", "edm", "unipc")
DISCRETE_SAMPLERS = SAMPLERS[:7]  # the discrete path's own; unipc runs in `solvers` on a DiscreteProcess
SPACINGS = ("leading", "trailing", "linspace")
PLMS_COEFFS = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))
KARRAS_MIN_ALPHA_BAR = 2.0**-24  # sigma_max stays finite under zero terminal SNR (as diffusers does)


def timesteps(num_train_steps: int, num_steps: int, spacing: str = "leading", offset: int = 0) -> np.ndarray:
    """The model timesteps visited, in decreasing order (Lin et al. 2023, Table 2).

    leading: arange(0, N) * (T // N) + offset; trailing: round(arange(T, 0, -T/N)) - 1;
    linspace: round(linspace(0, T - 1, N)). Only trailing and linspace always start at T - 1.
    """
    gaussian.check_choice("spacing", spacing, SPACINGS)
    T, N = num_train_steps, num_steps
    if not 1 <= N <= T:
        raise ValueError(f"num_steps must be between 1 and num_timesteps={T}, got {N}")
    if spacing == "leading":
        ts = np.arange(N) * (T // N) + offset
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / N)).astype(np.int64)[::-1] - 1
    else:
        ts = np.round(np.linspace(0, T - 1, N)).astype(np.int64)
    ts = np.clip(ts, 0, T - 1)
    if len(np.unique(ts)) != N:
        raise ValueError(f"spacing {spacing!r} with offset {offset} gives repeated timesteps for N={N}, T={T}")
    return ts[::-1].astype(np.int32).copy()


# ----------------------------------------------------------------------------- guidance


def classifier_free_guidance(model_fn, cond, uncond, guidance_scale, guidance_rescale=0.0) -> Partial:
    """Wrap a conditional model(x_t, t, context) into guided(x_t, t) (Ho & Salimans 2022).

    One batched forward per call: [uncond; cond] contexts with x_t and t repeated, then
    pred = u + s (c - u) (s as in LDM/SD, s = 1 means no guidance). guidance_rescale phi > 0
    rescales pred per example to the std of c and mixes phi * rescaled + (1 - phi) * pred
    (Lin et al. 2023, sec. 3.4; diffusers' rescale_noise_cfg). cond and uncond are pytrees with a
    leading batch axis (e.g. text embeddings [B, L, D]); scale and rescale are traced, so changing
    them does not recompile.
    """
    return Partial(_guided, as_pytree_fn(model_fn), cond, uncond, guidance_scale, guidance_rescale)


def _guided(model_fn, cond, uncond, scale, rescale, x_t, t):
    batch = x_t.shape[0]
    context = jax.tree.map(lambda u, c: jnp.concatenate([u, c], axis=0), uncond, cond)
    t = jnp.broadcast_to(t, (batch,))
    out = model_fn(jnp.concatenate([x_t, x_t], axis=0), jnp.concatenate([t, t], axis=0), context)
    out_u, out_c = out[:batch], out[batch:]
    guided = out_u + scale * (out_c - out_u)
    axes = tuple(range(1, x_t.ndim))
    std_c = jnp.std(out_c, axis=axes, keepdims=True)
    std_g = jnp.std(guided, axis=axes, keepdims=True)
    rescaled = guided * std_c / jnp.maximum(std_g, 1e-12)
    return rescale * rescaled + (1.0 - rescale) * guided


# ----------------------------------------------------------------------------- the plan


class _Config(NamedTuple):
    """Everything static about one compiled sampling program."""

    sampler: str
    num_steps: int
    shape: tuple
    prediction: str
    variance: str
    clip_x0: float | None
    order: int
    record_every: int
    start_step: int


def _plan(schedule: NoiseSchedule, sampler: str, num_steps: int, spacing: str, offset: int, karras_sigmas: bool):
    """Per-step float64/int arrays (leading axis = step) that the scan runs over."""
    T = schedule.num_timesteps
    abar = schedule.alphas_cumprod
    if sampler in ("euler", "heun", "edm"):
        sigma_table = np.sqrt((1.0 - abar) / np.maximum(abar, KARRAS_MIN_ALPHA_BAR))
        if karras_sigmas:  # Karras et al. 2022 eq. 5, rho = 7; t recovered by log-sigma interpolation
            rho, ramp = 7.0, np.linspace(0.0, 1.0, num_steps)
            lo, hi = sigma_table[0] ** (1 / rho), sigma_table[-1] ** (1 / rho)
            sigmas = (hi + ramp * (lo - hi)) ** rho
            t_model = np.interp(np.log(sigmas), np.log(sigma_table), np.arange(T)).astype(np.float32)
        else:
            t_model = timesteps(T, num_steps, spacing, offset)
            sigmas = sigma_table[t_model]
        sigma_next = np.append(sigmas[1:], 0.0)
        if sampler == "edm":  # the noisier time after the churn is found in this table (log sigma, increasing in t)
            plan_extra = dict(log_sigma_table=np.log(sigma_table))
        else:
            plan_extra = {}
        return dict(plan_extra, t=t_model, sigma=sigmas, sigma_next=sigma_next, t_next=np.append(t_model[1:], t_model[-1]))
    ts = timesteps(T, num_steps, spacing, offset)
    abar_t = abar[ts]
    abar_s = np.append(abar[ts[1:]], 1.0)
    plan = dict(t=ts, t_next=np.append(ts[1:], ts[-1]), abar_t=abar_t, abar_s=abar_s)
    if sampler == "ddpm":  # respaced reverse process over the visited steps (Improved DDPM sec. 4)
        ascending = abar_t[::-1]
        respaced = NoiseSchedule("respaced", 1.0 - ascending / np.append(1.0, ascending[:-1]))
        plan.update({k: v[::-1] for k, v in gaussian.reverse_tables(respaced).items()})
    return plan


def alpha_bar_at(schedule: NoiseSchedule, sampler: str, num_steps: int, step: int, *, spacing: str = "leading",
                 steps_offset: int = 0, karras_sigmas: bool = False) -> float:
    """abar of the noise level at which step `step` (0-based) of `sample`'s plan starts: what
    x_T must be noised to when sampling with `start_step=step` (SDEdit: x_t = sqrt(abar) x_0 +
    sqrt(1 - abar) eps)."""
    gaussian.check_choice("sampler", sampler, SAMPLERS)
    if not 0 <= step < num_steps:
        raise ValueError(f"step must be in [0, num_steps={num_steps}), got {step}")
    plan = _plan(schedule, sampler, int(num_steps), spacing, steps_offset, karras_sigmas)
    if "sigma" in plan:
        return float(1.0 / (1.0 + plan["sigma"][step] ** 2))
    return float(plan["abar_t"][step])


def sample(
    model_fn,
    schedule: NoiseSchedule,
    shape,
    rng,
    sampler: str = "ddim",
    num_steps: int = 50,
    prediction: str = "eps",
    eta=0.0,
    *,
    variance: str = "fixed_small",
    spacing: str = "leading",
    steps_offset: int = 0,
    karras_sigmas: bool = False,
    order: int = 2,
    clip_x0: float | None = None,
    x_T=None,
    return_trajectory: int = 0,
    start_step: int = 0,
    after_step=None,
    times=None,
    churn: solvers.Churn | None = None,
):
    """Draw x_0 [shape] by running `sampler` for `num_steps` network evaluations' worth of steps.

    `schedule` is a discrete `NoiseSchedule` or any `processes.Process`. A schedule (or a
    "discrete" process) runs the discrete path below, bit for bit as it always has, for the
    samplers it has; "unipc", "edm" and dpm_solver++ of order 3 run in `solvers` over the same
    timesteps. A continuous process (flow, edm, vdm) always runs in `solvers`: model_fn then
    receives float times in the process's own time, `times` may give the grid (default
    `proc.time_grid(num_steps)`), spacing is not used, and prediction may also be "velocity".
    churn: EDM's `solvers.Churn(s_churn, s_tmin, s_tmax, s_noise)` for sampler "edm".

    model_fn(x_t [B, ...] float32, t [B]) -> prediction with x_t's shape (twice the channels for
      variance="learned_range"). t is int32, except for euler/heun with karras_sigmas, where it is
      a fractional float32 timestep. Wrap models with bound arrays in `jax.tree_util.Partial`.
    sampler: "ddpm" (ancestral, DDPM eq. 11 / Improved DDPM respacing, any `variance`), "ddim"
      (Song et al. 2021 eq. 12, `eta`), "plms" (LDM's PLMS: pseudo-improved-Euler first step,
      then Adams-Bashforth orders 2-4 on eps), "dpm_solver++" (Lu et al. 2022 multistep, data
      prediction, `order` 1 or 2, first order at the first and last step; 3 runs in `solvers`),
      "euler" / "heun" (Karras et al. 2022 Alg. 1-2 in sigma-space; `karras_sigmas` for their
      rho=7 spacing), "unipc" (Zhao et al. 2023: UniP then UniC, one evaluation per step, `order`
      1-3, as diffusers' UniPCMultistepScheduler; in `solvers`).
    spacing / steps_offset: which timesteps are visited (see `timesteps`).
    clip_x0: clip predicted x_0 to [-c, c] at every step (pixel-space models).
    rng: one key, or a batch of keys [B] (then each example draws its own noise, so an example's
      result does not depend on the rest of the batch).
    x_T: initial noise (default drawn from rng); with `start_step`, the state x_t at that step.
    return_trajectory: k > 0 also returns {"x_t": [n, ...], "pred_x0": [n, ...], "t": [n]} for
      visited steps 0, k, 2k, ... (n = ceil(visited steps / k)).
    start_step: skip the first `start_step` steps of the plan and start from x_T at the noise
      level `alpha_bar_at(..., start_step)` (SDEdit, Meng et al. 2022; diffusers' img2img).
      Multistep samplers restart their history there.
    after_step: a `Partial` (x_next, i, abar_next) -> x_next applied after every step, with i
      the plan's step index and abar_next the noise level of x_next (1.0 after the last step),
      e.g. RePaint-style inpainting blending; it may also call `jax.debug.callback`.
    """
    gaussian.check_choice("sampler", sampler, SAMPLERS)
    schedule = processes.as_process(schedule)
    if schedule.continuous or sampler not in DISCRETE_SAMPLERS or order == 3:
        return _sample_in_solvers(model_fn, schedule, shape, rng, sampler, num_steps, prediction, eta,
                                  variance=variance, spacing=spacing, steps_offset=steps_offset,
                                  karras_sigmas=karras_sigmas, order=order, clip_x0=clip_x0, x_T=x_T,
                                  return_trajectory=return_trajectory, start_step=start_step,
                                  after_step=after_step, times=times, churn=churn)
    if times is not None:
        raise ValueError(f"times is for continuous processes and the unipc sampler, not {sampler!r} on a discrete schedule")
    if churn is not None and sampler != "edm":
        raise ValueError(f"churn is for the edm sampler, not {sampler!r}")
    schedule = schedule.schedule
    gaussian.check_choice("prediction", prediction, gaussian.PREDICTIONS)
    gaussian.check_choice("variance", variance, gaussian.VARIANCES)
    if order not in (1, 2):
        raise ValueError(f"order must be 1, 2 or 3 (dpm_solver++), got {order!r}")
    if return_trajectory < 0:
        raise ValueError(f"return_trajectory must be >= 0, got {return_trajectory}")
    shape = tuple(int(d) for d in shape)
    if not 0 <= start_step < num_steps:
        raise ValueError(f"start_step must be in [0, num_steps={num_steps}), got {start_step}")
    plan = _plan(schedule, sampler, int(num_steps), spacing, steps_offset, karras_sigmas)
    config = _Config(sampler, int(num_steps), shape, prediction, variance, clip_x0, order, int(return_trajectory),
                     int(start_step))
    if x_T is not None and tuple(x_T.shape) != shape:
        raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {shape}")
    table = plan.pop("log_sigma_table", None)
    plan = {k: np.asarray(v, np.int32 if k in ("t", "t_next") and v.dtype.kind == "i" else np.float32)[start_step:]
            for k, v in plan.items()}
    if table is not None:
        plan["log_sigma_table"] = np.asarray(table, np.float32)
    hook = None if after_step is None else as_pytree_fn(after_step)
    churn = solvers.Churn(*(jnp.float32(c) for c in (churn or solvers.Churn())))
    return _sample(as_pytree_fn(model_fn), plan, rng, jnp.asarray(eta, jnp.float32), x_T, hook, churn, config=config)


def _sample_in_solvers(model_fn, proc, shape, rng, sampler, num_steps, prediction, eta, *, variance, spacing,
                       steps_offset, karras_sigmas, order, clip_x0, x_T, return_trajectory, start_step, after_step,
                       times, churn):
    """`samplers.sample` for a continuous process, or for a sampler only `solvers` has."""
    if variance != "fixed_small":
        raise ValueError(f"variance {variance!r} is for the discrete ddpm sampler; {sampler!r} on a "
                         f"{proc.name} process uses the posterior variance (fixed_small)")
    if proc.continuous:
        if steps_offset or karras_sigmas:
            raise ValueError(f"steps_offset and karras_sigmas select discrete timesteps; a {proc.name} process "
                             "takes its grid from proc.time_grid (or times=...)")
    elif times is None:
        T = proc.schedule.num_timesteps
        if karras_sigmas:  # Karras et al. 2022 eq. 5 between the table's ends, at fractional t
            table = proc.schedule.sigmas
            sig = processes.karras_sigmas(table[0], min(table[-1], 1 / np.sqrt(KARRAS_MIN_ALPHA_BAR)), num_steps)
            ts = np.interp(np.log(sig), np.log(np.clip(table, 1e-30, None)), np.arange(T))
        else:
            ts = timesteps(T, num_steps, spacing, steps_offset)
        times = np.append(ts, -1)
    return solvers.sample(model_fn, proc, shape, rng, sampler, num_steps, prediction, eta, times=times,
                          order=order, clip_x0=clip_x0, x_T=x_T, return_trajectory=return_trajectory,
                          start_step=start_step, churn=churn or solvers.Churn(), after_step=after_step)


@functools.partial(jax.jit, static_argnames=("config",))
def _sample(model_fn, plan, rng, eta, x_T, after_step, churn, *, config: _Config):
    init_key, loop_key = _split(rng, 2)
    x = _normal(init_key, config.shape) if x_T is None else x_T.astype(jnp.float32)
    batch = config.shape[0]
    N = config.num_steps
    visited = N - config.start_step

    def model(x_t, t):
        return model_fn(x_t, jnp.broadcast_to(t, (batch,))).astype(jnp.float32)

    def predict(x_t, t, abar):  # -> (x0_hat, eps_hat)
        out = gaussian.split_learned_variance(model(x_t, t), config.variance)[0]
        return gaussian.predict_x0_eps(config.prediction, out, x_t, abar, config.clip_x0)

    step_fns = {
        "ddpm": _ddpm_step, "ddim": _ddim_step, "plms": _plms_step,
        "dpm_solver++": _dpm_step, "euler": _karras_step, "heun": _karras_step, "edm": _edm_step,
    }
    step, carry = step_fns[config.sampler], _init_carry(config, x)
    plan = dict(plan)
    log_sigma_table = plan.pop("log_sigma_table", None)
    ctx = dict(config=config, model=model, predict=predict, eta=eta, num_steps=N, churn=churn,
               log_sigma_table=log_sigma_table)
    xs = dict(plan, i=jnp.arange(config.start_step, N), key=_split(loop_key, visited))

    k = config.record_every
    if k:
        n = math.ceil(visited / k)
        record = {"x_t": jnp.zeros((n,) + config.shape), "pred_x0": jnp.zeros((n,) + config.shape)}
    else:
        record = None

    def body(state, inp):
        carry, record = state
        carry, x_t, pred_x0 = step(ctx, carry, inp)
        if after_step is not None:
            abar_next = inp["abar_s"] if "abar_s" in inp else 1.0 / (1.0 + inp["sigma_next"] ** 2)
            carry = dict(carry, x=after_step(carry["x"], inp["i"], abar_next))
        if record is not None:
            j = inp["i"] - config.start_step
            slot, keep = j // k, j % k == 0
            record = {
                "x_t": record["x_t"].at[slot].set(jnp.where(keep, x_t, record["x_t"][slot])),
                "pred_x0": record["pred_x0"].at[slot].set(jnp.where(keep, pred_x0, record["pred_x0"][slot])),
            }
        return (carry, record), None

    (carry, record), _ = jax.lax.scan(body, (carry, record), xs)
    x0 = carry["x"]
    if record is None:
        return x0
    return x0, dict(record, t=plan["t"][::k])


def _init_carry(config: _Config, x):
    if config.sampler == "plms":
        return {"x": x, "eps_history": jnp.zeros((3,) + x.shape), "count": jnp.zeros((), jnp.int32)}
    if config.sampler == "dpm_solver++":
        return {"x": x, "x0_prev": jnp.zeros_like(x), "h_prev": jnp.ones(())}
    return {"x": x}


# ----------------------------------------------------------------------------- the steps
# Each step: (ctx, carry, inp) -> (carry, x_t at this step (variance-preserving), predicted x_0).


def _ddpm_step(ctx, carry, inp):
    """Ancestral step x_{t'} = mu_theta + exp(log Sigma / 2) z, z = 0 at the last step (DDPM eq. 11)."""
    config, x = ctx["config"], carry["x"]
    out = ctx["model"](x, inp["t"])
    coefs = {k: inp[k] for k in ("alphas_cumprod", "posterior_mean_coef1", "posterior_mean_coef2",
                                 "log_variance_small", "log_variance_large", "log_betas")}
    p = gaussian.p_mean_variance_from(
        coefs, out, x, prediction=config.prediction, variance=config.variance, clip_x0=config.clip_x0
    )
    noise = _normal(inp["key"], x.shape)
    not_last = (inp["i"] < ctx["num_steps"] - 1).astype(jnp.float32)
    return {"x": p["mean"] + not_last * jnp.exp(0.5 * p["log_variance"]) * noise}, x, p["pred_x0"]


def ddim_update(x0, eps, abar_s, noise_std=0.0, noise=0.0):
    """DDIM (Song et al. 2021, eq. 12): x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s - s^2) eps + s z."""
    return jnp.sqrt(abar_s) * x0 + jnp.sqrt(jnp.maximum(1.0 - abar_s - noise_std**2, 0.0)) * eps + noise_std * noise


def ddim_noise_std(eta, abar_t, abar_s):
    """s = eta sqrt((1 - abar_s)/(1 - abar_t)) sqrt(1 - abar_t/abar_s) (Song et al. 2021, eq. 16)."""
    return eta * jnp.sqrt((1.0 - abar_s) / (1.0 - abar_t)) * jnp.sqrt(jnp.maximum(1.0 - abar_t / abar_s, 0.0))


def _ddim_step(ctx, carry, inp):
    x = carry["x"]
    x0, eps = ctx["predict"](x, inp["t"], inp["abar_t"])
    s = ddim_noise_std(ctx["eta"], inp["abar_t"], inp["abar_s"])
    noise = _normal(inp["key"], x.shape)
    return {"x": ddim_update(x0, eps, inp["abar_s"], s, noise)}, x, x0


def _plms_step(ctx, carry, inp):
    """LDM's PLMS (Liu et al. 2022): linear multistep on eps with coefficients (1), (3,-1)/2,
    (23,-16,5)/12, (55,-59,37,-9)/24 as history grows; the first step is a pseudo improved Euler
    step that averages eps at both ends (one extra network evaluation)."""
    x, hist, count = carry["x"], carry["eps_history"], carry["count"]
    abar_t, abar_s = inp["abar_t"], inp["abar_s"]
    eps = ctx["predict"](x, inp["t"], abar_t)[1]

    def warm_up(_):
        alpha_t, sigma_t = jnp.sqrt(abar_t), jnp.sqrt(1.0 - abar_t)
        x_next = ddim_update(gaussian.x0_from_eps(x, eps, alpha_t, sigma_t), eps, abar_s)
        eps_next = ctx["predict"](x_next, inp["t_next"], abar_s)[1]
        return (eps + eps_next) / 2.0

    def multistep(_):
        combos = [c[0] * eps + sum(ci * hist[j] for j, ci in enumerate(c[1:])) for c in PLMS_COEFFS[1:]]
        return jnp.where(count == 1, combos[0], jnp.where(count == 2, combos[1], combos[2]))

    has_next = inp["i"] < ctx["num_steps"] - 1
    eps_prime = jax.lax.cond(count == 0, lambda _: jax.lax.cond(has_next, warm_up, lambda _: eps, None), multistep, None)
    x0 = gaussian.x0_from_eps(x, eps_prime, jnp.sqrt(abar_t), jnp.sqrt(1.0 - abar_t))
    hist = jnp.concatenate([eps[None], hist[:-1]], axis=0)
    return {"x": ddim_update(x0, eps_prime, abar_s), "eps_history": hist, "count": count + 1}, x, x0


def dpm_solver_update(x, x0, abar_t, abar_s):
    """First-order DPM-Solver++ (Lu et al. 2022, eq. 9 with k=1), written with ratios so that the
    final step to sigma_s = 0 stays finite: x_s = (sigma_s/sigma_t) x - (sigma_s alpha_t/sigma_t - alpha_s) D."""
    alpha_t, sigma_t = jnp.sqrt(abar_t), jnp.sqrt(1.0 - abar_t)
    alpha_s, sigma_s = jnp.sqrt(abar_s), jnp.sqrt(1.0 - abar_s)
    return (sigma_s / sigma_t) * x - (sigma_s * alpha_t / sigma_t - alpha_s) * x0


def _dpm_step(ctx, carry, inp):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): D = (1 + 1/(2r)) x0_t - 1/(2r) x0_prev with
    r = h_prev / h, h = lambda_s - lambda_t, lambda = log(alpha/sigma); first order at the first
    and the last step (lower_order_final), or everywhere with order=1."""
    x, abar_t, abar_s = carry["x"], inp["abar_t"], inp["abar_s"]
    x0 = ctx["predict"](x, inp["t"], abar_t)[0]
    lam = lambda abar: 0.5 * (jnp.log(abar) - jnp.log1p(-abar))  # noqa: E731
    h = lam(abar_s) - lam(abar_t)
    r = carry["h_prev"] / h
    config = ctx["config"]
    second_order = (config.order == 2) & (inp["i"] > config.start_step) & (inp["i"] < ctx["num_steps"] - 1)
    d = jnp.where(second_order, (1.0 + 0.5 / r) * x0 - (0.5 / r) * carry["x0_prev"], x0)
    return {"x": dpm_solver_update(x, d, abar_t, abar_s), "x0_prev": x0, "h_prev": h}, x, x0


def _karras_step(ctx, carry, inp):
    """Karras et al. 2022 Alg. 1 (Euler) / Alg. 2 (Heun, no correction on the step to sigma = 0),
    on x_ve = x_vp * sqrt(1 + sigma^2); the network sees x_vp and t."""
    x_vp = carry["x"]
    sigma, sigma_next = inp["sigma"], inp["sigma_next"]
    x = x_vp * jnp.sqrt(1.0 + sigma**2)

    def denoise(x_ve, s, t):
        abar = 1.0 / (1.0 + s**2)
        return ctx["predict"](x_ve * jnp.sqrt(abar), t, abar)[0]

    x0 = denoise(x, sigma, inp["t"])
    d = (x - x0) / sigma
    x_next = x + (sigma_next - sigma) * d
    if ctx["config"].sampler == "heun":
        def correct(_):
            d_next = (x_next - denoise(x_next, sigma_next, inp["t_next"])) / sigma_next
            return x + (sigma_next - sigma) * (d + d_next) / 2.0

        x_next = jax.lax.cond(sigma_next > 0, correct, lambda _: x_next, None)
    return {"x": x_next / jnp.sqrt(1.0 + sigma_next**2)}, x_vp, x0


def _edm_step(ctx, carry, inp):
    """Karras et al. 2022 Alg. 2 on a discrete schedule, in their sigma-space: raise the noise to
    sigma_hat = (1 + gamma) sigma, gamma = min(S_churn / N, sqrt 2 - 1) where S_tmin <= sigma <=
    S_tmax, by adding sqrt(sigma_hat^2 - sigma^2) S_noise z, then a Heun step from sigma_hat (at the
    fractional timestep whose log sigma interpolates to it) to the next sigma."""
    churn, table = ctx["churn"], ctx["log_sigma_table"]
    sigma = inp["sigma"]
    inside = (churn.s_tmin <= sigma) & (sigma <= churn.s_tmax)
    gamma = jnp.where(inside, jnp.minimum(churn.s_churn / ctx["num_steps"], 2.0**0.5 - 1.0), 0.0)
    sigma_hat = sigma * (1.0 + gamma)
    t_hat = jnp.interp(jnp.log(sigma_hat), table, jnp.arange(table.shape[0], dtype=jnp.float32))
    t_hat = jnp.where(gamma > 0, t_hat, inp["t"])
    x_ve = carry["x"] * jnp.sqrt(1.0 + sigma**2)
    noise = _normal(inp["key"], x_ve.shape)
    # sqrt(sigma_hat^2 - sigma^2) written without the difference of squares: at gamma = 0 that
    # difference is a rounding error (~1e-6 after XLA's FMA contraction) whose root (~1e-3) is noise.
    x_ve = x_ve + sigma * jnp.sqrt(gamma * (2.0 + gamma)) * churn.s_noise * noise
    carry = {"x": x_ve / jnp.sqrt(1.0 + sigma_hat**2)}
    ctx = dict(ctx, config=ctx["config"]._replace(sampler="heun"))
    return _karras_step(ctx, carry, dict(inp, sigma=sigma_hat, t=t_hat))
