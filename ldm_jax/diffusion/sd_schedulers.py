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
them), `plan(scheduler, num_steps, start_step)` is numpy's replay of ``set_timesteps`` and of the
pipeline's loop (which timesteps the UNet sees, at which input scale, with which step
coefficients), and `sample` is the jittable loop (one `lax.scan` over the network evaluations).
The loop's state lives in the scheduler's own space, as in diffusers (the sigma-space
schedulers' sample is ``x_vp * sqrt(1 + sigma^2)``); the network sees ``c_in * x``.

Supported: DDIMScheduler, PNDMScheduler (PLMS, ``skip_prk_steps``), DDPMScheduler,
LMSDiscreteScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
HeunDiscreteScheduler, DPMSolverMultistepScheduler (dpmsolver++ and sde-dpmsolver++, orders 1-3)
and UniPCMultistepScheduler (bh2, in `solvers`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion import schedules
from ldm_jax.diffusion.noise import normal as _normal, split as _split

# Every __init__ argument of the supported diffusers 0.42 classes, with its default
# (tests/diffusion/test_sd_schedulers.py holds this table to diffusers' signatures).
_COMMON = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
           "trained_betas": None, "prediction_type": "epsilon", "steps_offset": 0}
_THRESHOLD = {"thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}
_SIGMA_KINDS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
CLASS_KEYS: dict[str, dict[str, Any]] = {
    "DDIMScheduler": {**_COMMON, **_THRESHOLD, "clip_sample": True, "set_alpha_to_one": True, "clip_sample_range": 1.0,
                      "timestep_spacing": "leading", "rescale_betas_zero_snr": False},
    "PNDMScheduler": {**_COMMON, "skip_prk_steps": False, "set_alpha_to_one": False, "timestep_spacing": "leading"},
    "DDPMScheduler": {**_COMMON, **_THRESHOLD, "variance_type": "fixed_small", "clip_sample": True,
                      "clip_sample_range": 1.0, "timestep_spacing": "leading", "rescale_betas_zero_snr": False},
    "LMSDiscreteScheduler": {**_COMMON, **_SIGMA_KINDS, "timestep_spacing": "linspace"},
    "EulerDiscreteScheduler": {**_COMMON, **_SIGMA_KINDS, "interpolation_type": "linear", "sigma_min": None,
                               "sigma_max": None, "timestep_spacing": "linspace", "timestep_type": "discrete",
                               "rescale_betas_zero_snr": False, "final_sigmas_type": "zero"},
    "EulerAncestralDiscreteScheduler": {**_COMMON, "timestep_spacing": "linspace", "rescale_betas_zero_snr": False},
    "HeunDiscreteScheduler": {**_COMMON, **_SIGMA_KINDS, "beta_start": 0.00085, "beta_end": 0.012,
                              "clip_sample": False, "clip_sample_range": 1.0, "timestep_spacing": "linspace"},
    "DPMSolverMultistepScheduler": {
        **_COMMON, **_THRESHOLD, **_SIGMA_KINDS, "solver_order": 2, "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint", "lower_order_final": True, "euler_at_final": False, "use_lu_lambdas": False,
        "use_flow_sigmas": False, "flow_shift": 1.0, "final_sigmas_type": "zero", "lambda_min_clipped": -math.inf,
        "variance_type": None, "timestep_spacing": "linspace", "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False, "time_shift_type": "exponential"},
    "UniPCMultistepScheduler": {
        **_COMMON, **_THRESHOLD, **_SIGMA_KINDS, "solver_order": 2, "predict_x0": True, "solver_type": "bh2",
        "lower_order_final": True, "disable_corrector": [], "solver_p": None, "use_flow_sigmas": False,
        "flow_shift": 1.0, "timestep_spacing": "linspace", "final_sigmas_type": "zero",
        "rescale_betas_zero_snr": False, "use_dynamic_shifting": False, "time_shift_type": "exponential",
        "sigma_min": None, "sigma_max": None, "shift_terminal": None},
}
KINDS = {"DDIMScheduler": "ddim", "PNDMScheduler": "pndm", "DDPMScheduler": "ddpm", "LMSDiscreteScheduler": "lms",
         "EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_a",
         "HeunDiscreteScheduler": "heun", "DPMSolverMultistepScheduler": "dpm", "UniPCMultistepScheduler": "unipc"}
# The keys each class implements here, beyond the betas (read by `_schedule_args`); every other
# key of CLASS_KEYS must keep its default.
_IMPLEMENTED = {
    "DDIMScheduler": {"clip_sample", "set_alpha_to_one", "clip_sample_range", "timestep_spacing", "steps_offset",
                      "prediction_type", *_THRESHOLD, "rescale_betas_zero_snr"},
    "PNDMScheduler": {"skip_prk_steps", "set_alpha_to_one", "timestep_spacing", "steps_offset", "prediction_type"},
    "DDPMScheduler": {"variance_type", "clip_sample", "clip_sample_range", "timestep_spacing", "steps_offset",
                      "prediction_type", *_THRESHOLD, "rescale_betas_zero_snr"},
    "LMSDiscreteScheduler": {"use_karras_sigmas", "timestep_spacing", "steps_offset", "prediction_type"},
    "EulerDiscreteScheduler": {"use_karras_sigmas", "interpolation_type", "sigma_min", "sigma_max",
                               "timestep_spacing", "steps_offset", "prediction_type", "rescale_betas_zero_snr",
                               "final_sigmas_type"},
    "EulerAncestralDiscreteScheduler": {"timestep_spacing", "steps_offset", "prediction_type",
                                        "rescale_betas_zero_snr"},
    "HeunDiscreteScheduler": {"use_karras_sigmas", "clip_sample", "clip_sample_range", "timestep_spacing",
                              "steps_offset", "prediction_type"},
    "DPMSolverMultistepScheduler": {"solver_order", "algorithm_type", "solver_type", "lower_order_final",
                                    "euler_at_final", "use_karras_sigmas", "final_sigmas_type", "timestep_spacing",
                                    "steps_offset", "prediction_type", *_THRESHOLD, "rescale_betas_zero_snr"},
    "UniPCMultistepScheduler": {"solver_order", "timestep_spacing", "steps_offset", "prediction_type",
                                "rescale_betas_zero_snr"},
}
# Values each implemented key accepts (None: any value of the right type, checked where read).
_ALLOWED = {
    "prediction_type": {"DDIMScheduler": ("epsilon", "v_prediction", "sample"),
                        "DDPMScheduler": ("epsilon", "v_prediction", "sample"),
                        "PNDMScheduler": ("epsilon", "v_prediction"),
                        "EulerAncestralDiscreteScheduler": ("epsilon", "v_prediction"),
                        None: ("epsilon", "v_prediction", "sample")},
    "timestep_spacing": ("leading", "trailing", "linspace"),
    "interpolation_type": ("linear",),  # diffusers' log_linear grid is increasing, with N + 2 sigmas
    "final_sigmas_type": ("zero", "sigma_min"),
    "algorithm_type": ("dpmsolver++", "sde-dpmsolver++"),
    "solver_type": ("midpoint", "heun"),
    "variance_type": ("fixed_small", "fixed_large"),
    "skip_prk_steps": (True,),
}
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
SCHEDULER_CLASSES = tuple(KINDS)


# The keys of schedule_from_scheduler_config's result that configure sampling, not make_schedule.
SAMPLING_KEYS = ("prediction", "spacing", "steps_offset")

_BETA_SCHEDULES = {"scaled_linear": "scaled_linear", "linear": "linear",
                   "squaredcos_cap_v2": "cosine"}
_SPACINGS = ("leading", "trailing", "linspace")
# Defaults of the diffusers scheduler classes, for configs that omit a key.
_LINSPACE_DEFAULT = {"EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                     "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
                     "LMSDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
                     "KDPM2AncestralDiscreteScheduler", "UniPCMultistepScheduler",
                     "DEISMultistepScheduler"}
_OUR_SCALED_LINEAR = (0.00085, 0.012)  # make_schedule("scaled_linear") defaults
_OUR_LINEAR = (1e-4, 0.02)  # make_schedule("linear") defaults


def schedule_from_scheduler_config(config: Mapping[str, Any]) -> dict:
    """diffusers scheduler config (``scheduler_config.json``) -> our schedule and sampler options.

    Returns ``dict(name, num_timesteps, zero_terminal_snr, [beta_start, beta_end, rescale],
    prediction, spacing, steps_offset)``: everything but ``SAMPLING_KEYS`` are the arguments of
    ``make_schedule`` (beta endpoints only when they differ from its defaults; ``rescale=False``
    for a "linear" schedule with T != 1000, since diffusers does not rescale); ``prediction``
    ("eps" | "v" | "x0"), ``spacing`` and ``steps_offset`` go to the sampler. Raises ValueError
    naming the key for values we do not implement (``trained_betas``, other beta schedules...).
    """
    cls = config.get("_class_name", "")
    heun = cls == "HeunDiscreteScheduler"
    get = lambda key, default: default if config.get(key) is None else config[key]

    if config.get("trained_betas") is not None:
        raise ValueError("scheduler config trained_betas is not supported (only named schedules)")
    beta_schedule = get("beta_schedule", "linear")
    if beta_schedule not in _BETA_SCHEDULES:
        raise ValueError(f"scheduler config beta_schedule={beta_schedule!r} is not supported; "
                         f"allowed: {', '.join(_BETA_SCHEDULES)}")
    prediction_type = get("prediction_type", "epsilon")
    if prediction_type not in _PREDICTIONS:
        raise ValueError(f"scheduler config prediction_type={prediction_type!r} is not "
                         f"supported; allowed: {', '.join(_PREDICTIONS)}")
    spacing = get("timestep_spacing", "linspace" if cls in _LINSPACE_DEFAULT else "leading")
    if spacing not in _SPACINGS:
        raise ValueError(f"scheduler config timestep_spacing={spacing!r} is not supported; "
                         f"allowed: {', '.join(_SPACINGS)}")
    num_timesteps = int(get("num_train_timesteps", 1000))

    name = _BETA_SCHEDULES[beta_schedule]
    out: dict[str, Any] = dict(name=name, num_timesteps=num_timesteps,
                               zero_terminal_snr=bool(get("rescale_betas_zero_snr", False)))
    beta_start = float(get("beta_start", 0.00085 if heun else 1e-4))
    beta_end = float(get("beta_end", 0.012 if heun else 0.02))
    ours = {"scaled_linear": _OUR_SCALED_LINEAR, "linear": _OUR_LINEAR}.get(name)
    if ours is not None and not (math.isclose(beta_start, ours[0], rel_tol=1e-9)
                                 and math.isclose(beta_end, ours[1], rel_tol=1e-9)):
        out.update(beta_start=beta_start, beta_end=beta_end)
    if name == "linear" and num_timesteps != 1000:
        out["rescale"] = False
    out.update(prediction=_PREDICTIONS[prediction_type], spacing=spacing,
               steps_offset=int(get("steps_offset", 0)))
    return out


@dataclasses.dataclass(frozen=True)
class Scheduler:
    """A diffusers scheduler config, validated: `cls` (class name), `kind`, `options` (the
    config with every key of the class, defaults filled in, as a sorted tuple of pairs),
    `ignored` (keys of the config that belong to other classes: diffusers ignores them too).
    Hashable: it is part of a compiled program's static description."""

    cls: str
    options: tuple
    ignored: tuple = ()

    @property
    def kind(self) -> str:
        return KINDS[self.cls]

    def __getitem__(self, key):
        return dict(self.options)[key]

    @property
    def prediction(self) -> str:
        """"eps" | "v" | "x0": what the network predicts, as the config says."""
        return _PREDICTIONS[self["prediction_type"]]

    @property
    def order(self) -> int:
        """Network evaluations per step of diffusers' loop (2 for Heun)."""
        return 2 if self.kind == "heun" else 1

    @classmethod
    def from_config(cls, config: Mapping[str, Any], class_name: str | None = None) -> "Scheduler":
        """A diffusers scheduler config (``scheduler_config.json`` as a dict; ``_class_name``
        names the class unless `class_name` does). Raises ValueError naming the class or the
        key and the values allowed for anything not reproduced exactly."""
        name = class_name or config.get("_class_name")
        if name not in KINDS:
            raise ValueError(f"scheduler class {name!r} is not supported; supported: {', '.join(KINDS)}")
        keys = CLASS_KEYS[name]
        options = dict(keys)
        for key, value in config.items():
            if key.startswith("_") or key not in keys:
                continue
            options[key] = keys[key] if value is None and keys[key] is not None and key != "trained_betas" else value
        for key, value in options.items():
            _check_key(name, key, value, keys[key])
        if name == "UniPCMultistepScheduler" and options["prediction_type"] == "sample":
            raise ValueError("UniPCMultistepScheduler prediction_type='sample' is not supported; "
                             "allowed: epsilon, v_prediction")
        ignored = tuple(sorted(k for k in config if not k.startswith("_") and k not in keys))
        return cls(name, tuple(sorted((k, _freeze(v)) for k, v in options.items())), ignored)

    def schedule_config(self) -> dict:
        """The betas part, as `interop.diffusers.schedule_from_scheduler_config` reads it."""
        return {k: self[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                                     "trained_betas")} | {"prediction_type": self["prediction_type"],
                                                          "rescale_betas_zero_snr": self.options_dict.get(
                                                              "rescale_betas_zero_snr", False),
                                                          "_class_name": self.cls}

    @property
    def options_dict(self) -> dict:
        return dict(self.options)


def _freeze(value):
    return tuple(value) if isinstance(value, list) else value


def _check_key(cls: str, key: str, value, default) -> None:
    if key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas"):
        return  # the betas: `interop.diffusers.schedule_from_scheduler_config` checks them
    if key not in _IMPLEMENTED[cls]:
        same = value == default or (isinstance(value, float) and isinstance(default, float)
                                    and math.isnan(value) and math.isnan(default))
        if not same and not (isinstance(value, (list, tuple)) and not value and default in ([], ())):
            raise ValueError(f"{cls} config {key}={value!r} is not supported (only its default {default!r} is "
                             "reproduced exactly)")
        return
    allowed = _ALLOWED.get(key)
    if isinstance(allowed, dict):
        allowed = allowed.get(cls, allowed[None])
    if allowed is not None and value not in allowed:
        raise ValueError(f"{cls} config {key}={value!r} is not supported; allowed: {', '.join(map(repr, allowed))}")
    if key in ("clip_sample", "set_alpha_to_one", "thresholding", "use_karras_sigmas", "lower_order_final",
               "euler_at_final", "rescale_betas_zero_snr") and not isinstance(value, bool):
        raise ValueError(f"{cls} config {key}={value!r} must be true or false")
    if key == "solver_order" and value not in ((1, 2, 3) if cls == "DPMSolverMultistepScheduler" else (1, 2, 3)):
        raise ValueError(f"{cls} config solver_order={value!r} is not supported; allowed: 1, 2, 3")
    if key == "steps_offset" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"{cls} config steps_offset={value!r} must be an integer >= 0")
    if key in ("clip_sample_range", "sample_max_value", "dynamic_thresholding_ratio") and not (
            isinstance(value, (int, float)) and value > 0):
        raise ValueError(f"{cls} config {key}={value!r} must be a positive number")
    if key in ("sigma_min", "sigma_max") and value is not None and not (isinstance(value, (int, float)) and value > 0):
        raise ValueError(f"{cls} config {key}={value!r} must be a positive number or null")


# ---------------------------------------------------------------------------------------------
# The plan: numpy's replay of set_timesteps and of the pipeline's loop


def alphas_cumprod(scheduler: Scheduler) -> np.ndarray:
    """The class's alphas_cumprod (float64), zero-terminal-SNR rescaled as diffusers does; the
    sigma-space classes then clip the last entry to 2^-24 so that sigma_max stays finite."""
    args = schedule_from_scheduler_config(scheduler.schedule_config())
    args = {k: v for k, v in args.items() if k not in ("prediction", "spacing", "steps_offset")}
    acp = np.array(schedules.make_schedule(**args).alphas_cumprod, np.float64)
    if args.get("zero_terminal_snr") and scheduler.kind in ("euler", "euler_a", "dpm", "unipc"):
        acp[-1] = 2.0**-24
    return acp


def _timesteps(s: Scheduler, N: int, *, multistep: bool = False, rounded: bool = False) -> np.ndarray:
    """Each class's set_timesteps grid (float64, decreasing). Multistep classes (DPM-Solver,
    UniPC) space N + 1 points and drop the last; the alpha-space classes (DDIM, DDPM, PNDM)
    round linspace to integers, the sigma-space ones keep it fractional."""
    T, spacing, offset = s["num_train_timesteps"], s["timestep_spacing"], s["steps_offset"]
    if multistep:
        if spacing == "linspace":
            return np.linspace(0, T - 1, N + 1).round()[::-1][:-1].astype(np.int64).astype(np.float64)
        if spacing == "leading":
            return ((np.arange(0, N + 1) * (T // (N + 1))).round()[::-1][:-1] + offset).astype(np.float64)
        return (np.arange(T, 0, -T / N).round() - 1).astype(np.float64)
    if spacing == "linspace":
        if rounded:
            return np.linspace(0, T - 1, N).round()[::-1].astype(np.float64)
        return np.linspace(0, T - 1, N, dtype=np.float32)[::-1].astype(np.float64)
    if spacing == "leading":
        return ((np.arange(0, N) * (T // N)).round()[::-1] + offset).astype(np.float64)
    return (np.arange(T, 0, -T / N).round() - 1).astype(np.float64)


def _sigma_to_t(sigma, log_sigmas):
    """diffusers' `_sigma_to_t`: the fractional timestep whose log sigma interpolates to sigma."""
    sigma = np.atleast_1d(np.asarray(sigma, np.float64))
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)


def _karras(sigma_min, sigma_max, n):
    """Karras et al. 2022 eq. 5 with rho = 7."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / 7.0), sigma_max ** (1 / 7.0)
    return (hi + ramp * (lo - hi)) ** 7.0


def _sigma_grid(s: Scheduler, N: int, acp: np.ndarray):
    """(timesteps, sigmas without the final one) of Euler / Euler-a / Heun / LMS."""
    table = np.sqrt((1 - acp) / acp)
    log_table = np.log(table)
    ts = _timesteps(s, N, multistep=False)
    if s.options_dict.get("interpolation_type", "linear") == "log_linear":
        sig = np.exp(np.linspace(np.log(table[-1]), np.log(table[0]), N + 1))
    else:
        sig = np.interp(ts, np.arange(len(table)), table)
    if s.options_dict.get("use_karras_sigmas"):
        lo = s.options_dict.get("sigma_min") or sig[-1]
        hi = s.options_dict.get("sigma_max") or sig[0]
        sig = _karras(lo, hi, N)
        ts = _sigma_to_t(sig, log_table)
    return ts, sig


def _final_sigma(s: Scheduler, acp) -> float:
    return math.sqrt((1 - acp[0]) / acp[0]) if s.options_dict.get("final_sigmas_type") == "sigma_min" else 0.0


def _f32(x):
    return np.asarray(x, np.float32).astype(np.float64)


def plan(s: Scheduler, num_steps: int, start_step: int = 0) -> dict:
    """What diffusers' pipeline loop does with `s` for `num_steps` inference steps, starting at
    step `start_step` (img2img: ``timesteps[start_step * order:]``), as per-evaluation arrays.

    Always: ``t`` (the UNet's timestep), ``c_in`` (scale_model_input's factor), ``step`` (the
    inference step each evaluation belongs to), ``blend_abar`` (the noise level, as abar, that
    inpainting noises the known latents to after this evaluation; 1 after the last),
    ``space`` (x_vp = space * x after this evaluation); scalars ``init_sigma`` (x_T's scale) and
    ``start`` = (a, b): the img2img start x = a z0 + b noise. Plus each kind's coefficients.
    """
    N = int(num_steps)
    T = s["num_train_timesteps"]
    if not 1 <= N <= T:
        raise ValueError(f"num_steps must be between 1 and num_train_timesteps={T}, got {N}")
    if not 0 <= start_step < N:
        raise ValueError(f"start_step must be in [0, {N}), got {start_step}")
    acp = alphas_cumprod(s)
    kind = s.kind
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        p = _PLANNERS[kind](s, N, acp, start_step * s.order)
    K = len(p["t"])
    p["step"] = np.asarray(p.get("step", np.arange(K) + start_step), np.int32)
    out = {k: (np.asarray(v, np.float32) if k != "step" else v) for k, v in p.items()
           if k not in ("init_sigma", "start")}
    out["init_sigma"] = np.float32(p["init_sigma"])
    out["start"] = np.asarray(p["start"], np.float32)
    return out


def _alpha_start(acp, t):
    return (math.sqrt(acp[int(t)]), math.sqrt(1 - acp[int(t)]))


def _plan_ddim(s, N, acp, begin):
    T = s["num_train_timesteps"]
    ts = _timesteps(s, N, rounded=True)
    final = 1.0 if s.options_dict.get("set_alpha_to_one", True) else acp[0]
    prev = ts - T // N
    a_prev = np.where(prev >= 0, acp[np.clip(prev, 0, T - 1).astype(int)], final)
    ts, a_prev = ts[begin:], a_prev[begin:]
    blend = np.append(acp[ts[1:].astype(int)], 1.0)
    return dict(t=ts, c_in=np.ones_like(ts), a_t=acp[ts.astype(int)], a_prev=a_prev, blend_abar=blend,
                space=np.ones_like(ts), init_sigma=1.0, start=_alpha_start(acp, ts[0]))


def _plan_ddpm(s, N, acp, begin):
    p = _plan_ddim(s, N, acp, begin)
    T = s["num_train_timesteps"]
    prev = p["t"] - T // N
    p["a_prev"] = np.where(prev >= 0, acp[np.clip(prev, 0, T - 1).astype(int)], 1.0)
    p["noisy"] = (p["t"] > 0).astype(np.float64)
    return p


def _plan_pndm(s, N, acp, begin):
    """PLMS with skip_prk_steps: timesteps [t_0, t_1, t_1, t_2, ...] (the second repeated); the
    second evaluation averages with the first and restarts from the first's sample."""
    T = s["num_train_timesteps"]
    ratio = T // N
    base = _timesteps(s, N, rounded=True)[::-1]  # increasing
    ts = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1][begin:]
    final = 1.0 if s["set_alpha_to_one"] else acp[0]
    K = len(ts)
    a_t, a_prev, mode = np.zeros(K), np.zeros(K), np.zeros(K)
    n_ets = 0
    for k, t in enumerate(ts):  # the counter logic of PNDMScheduler.step_plms
        prev = t - ratio
        if k == 1:
            prev, t = t, t + ratio
            mode[k] = 1  # average with the stored output, restart from the stored sample
        else:
            n_ets = min(n_ets + 1, 4)
            mode[k] = 0 if (k == 0 and n_ets == 1) else n_ets
        a_t[k] = acp[int(t)]
        a_prev[k] = acp[int(prev)] if prev >= 0 else final
    blend = np.append(acp[ts[1:].astype(int)], 1.0)
    step = np.maximum(np.arange(K) - 1, 0) + begin
    return dict(t=ts, c_in=np.ones(K), a_t=a_t, a_prev=a_prev, mode=mode, blend_abar=blend, space=np.ones(K),
                step=step, init_sigma=1.0, start=_alpha_start(acp, ts[0]))


def _vp(sig):
    """VE sigma -> (x_vp = space * x_ve, abar)."""
    return 1.0 / np.sqrt(1.0 + sig**2), 1.0 / (1.0 + sig**2)


def _sigma_common(s, ts, sig_all, begin, K_steps, init_sigma):
    """The fields every sigma-space class shares: sig_all holds sigmas per evaluation plus the final."""
    sig = sig_all[begin:-1] if begin else sig_all[:-1]
    nxt = sig_all[begin + 1:]
    space, abar = _vp(nxt)
    blend = np.append(abar[:-1], 1.0)
    return dict(t=ts[begin:], c_in=1.0 / np.sqrt(sig**2 + 1.0), sigma=sig, sigma_next=nxt, space=space,
                blend_abar=blend, init_sigma=init_sigma, start=(1.0, sig_all[begin]))


def _init_sigma(s, sig_all):
    m = float(np.max(sig_all))
    return m if s["timestep_spacing"] in ("linspace", "trailing") else math.sqrt(m * m + 1.0)


def _plan_euler(s, N, acp, begin):
    ts, sig = _sigma_grid(s, N, acp)
    sig_all = _f32(np.append(sig, _final_sigma(s, acp)))
    return _sigma_common(s, _f32(ts), sig_all, begin, N, _init_sigma(s, sig_all))


def _plan_euler_a(s, N, acp, begin):
    p = _plan_euler(s, N, acp, begin)
    fr, to = p["sigma"], p["sigma_next"]
    up = np.sqrt(to**2 * (fr**2 - to**2) / fr**2)
    p.update(sigma_up=up, sigma_down=np.sqrt(to**2 - up**2))
    return p


def _plan_heun(s, N, acp, begin):
    ts, sig = _sigma_grid(s, N, acp)
    sig = _f32(np.append(sig, 0.0))
    sig_all = np.concatenate([sig[:1], np.repeat(sig[1:-1], 2), sig[-1:]])  # 2N entries
    ts_all = _f32(np.concatenate([ts[:1], np.repeat(ts[1:], 2)]))  # 2N - 1 evaluations
    K = len(ts_all)
    first = (np.arange(K) % 2 == 0)
    # The step each evaluation takes: first order from sigmas[k] to sigmas[k+1]; the correction
    # (odd k) converts with sigmas[k] and completes the step from sigmas[k-1].
    sigma_in = sig_all[:K]
    init = _init_sigma(s, sig_all)
    p = _sigma_common(s, ts_all, sig_all, begin, N, init)
    prev = sig_all[np.maximum(np.arange(K) - 1, 0)]
    dt = np.where(first, sig_all[1:K + 1] - sigma_in, sigma_in - prev)
    p.update(first=first[begin:].astype(np.float64), dt=dt[begin:], step=np.arange(begin, K) // 2)
    return p


def _lms_coefficient(sig, order, t, current):
    """diffusers' get_lms_coefficient, integrated exactly (the integrand is a polynomial)."""
    poly = np.polynomial.Polynomial([1.0])
    for k in range(order):
        if k != current:
            poly = poly * np.polynomial.Polynomial([-sig[t - k], 1.0]) / (sig[t - current] - sig[t - k])
    integral = poly.integ()
    return integral(sig[t + 1]) - integral(sig[t])


def _plan_lms(s, N, acp, begin):
    ts, sig = _sigma_grid(s, N, acp)
    sig_all = _f32(np.append(sig, 0.0))
    p = _sigma_common(s, _f32(ts), sig_all, begin, N, _init_sigma(s, sig_all))
    K = N - begin
    coeffs = np.zeros((K, 4))
    for k in range(K):
        i = begin + k  # the scheduler's step_index
        order = min(i + 1, 4)
        have = min(k + 1, 4)  # derivatives stored since this run began
        for j in range(min(order, have)):
            coeffs[k, j] = _lms_coefficient(sig_all, order, i, j)
    p["lms"] = coeffs
    return p


def _alpha_sigma(sig):
    alpha = 1.0 / np.sqrt(sig**2 + 1.0)
    return alpha, sig * alpha


def _plan_dpm(s, N, acp, begin):
    """DPMSolverMultistepScheduler: each step x' = A x + B . (m0, m1, m2) + C z, with m the data
    predictions (newest first) and the order chosen as its step() chooses."""
    o = s.options_dict
    table = np.sqrt((1 - acp) / acp)
    log_table = np.log(table)
    ts = _timesteps(s, N, multistep=True)
    if o["use_karras_sigmas"]:
        sig = _karras(table[0], table[-1], N)
        ts = _sigma_to_t(sig, log_table)
        if o["beta_schedule"] != "squaredcos_cap_v2":
            ts = ts.round()
    else:
        sig = np.interp(ts, np.arange(len(table)), table)
    sig_all = _f32(np.append(sig, _final_sigma(s, acp)))
    order_cfg, sde = o["solver_order"], o["algorithm_type"] == "sde-dpmsolver++"
    n = len(ts)
    alpha, sigma = _alpha_sigma(sig_all)
    lam = np.log(alpha) - np.log(sigma)
    A, B, C = np.zeros(n), np.zeros((n, 3)), np.zeros(n)
    lower_nums = 0
    for i in range(begin, n):
        final = i == n - 1 and (o["euler_at_final"] or (o["lower_order_final"] and n < 15)
                                or o["final_sigmas_type"] == "zero")
        second = i == n - 2 and o["lower_order_final"] and n < 15
        if order_cfg == 1 or lower_nums < 1 or final:
            order = 1
        elif order_cfg == 2 or lower_nums < 2 or second:
            order = 2
        else:
            order = 3
        lower_nums = min(lower_nums + 1, order_cfg)
        a_t, s_t, s_s0 = alpha[i + 1], sigma[i + 1], sigma[i]
        h = lam[i + 1] - lam[i]
        em = np.exp(-h)
        if sde:
            A[i] = s_t / s_s0 * em
            c0, noise = a_t * (1.0 - np.exp(-2.0 * h)), s_t * np.sqrt(1.0 - np.exp(-2.0 * h))
        else:
            A[i] = s_t / s_s0
            c0, noise = -a_t * (em - 1.0), 0.0
        b = np.array([c0, 0.0, 0.0])
        if order >= 2:
            h0 = lam[i] - lam[i - 1]
            r0 = h0 / h
            d1_0 = np.array([1.0, -1.0, 0.0]) / r0
            if order == 2:
                if o["solver_type"] == "midpoint":
                    c1 = 0.5 * c0
                else:
                    c1 = a_t * ((1.0 - np.exp(-2.0 * h)) / (-2.0 * h) + 1.0) if sde else a_t * ((em - 1.0) / h + 1.0)
                b = b + c1 * d1_0
            else:
                h1 = lam[i - 1] - lam[i - 2]
                r1 = h1 / h
                d1_1 = np.array([0.0, 1.0, -1.0]) / r1
                d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                if sde:
                    e2 = np.exp(-2.0 * h)
                    b = b + a_t * ((1.0 - e2) / (-2.0 * h) + 1.0) * d1 + a_t * ((1.0 - e2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5) * d2
                else:
                    b = b + a_t * ((em - 1.0) / h + 1.0) * d1 - a_t * ((em - 1.0 + h) / h**2 - 0.5) * d2
        if not np.isfinite(h):  # the step to sigma = 0: x' = m0 exactly
            A[i], b, noise = 0.0, np.array([1.0, 0.0, 0.0]), 0.0
        B[i], C[i] = b, noise
    sl = slice(begin, n)
    space = np.ones(n - begin)
    blend = np.append(alpha[begin + 1:n] ** 2, 1.0)
    a0, s0 = _alpha_sigma(sig_all[begin])
    return dict(t=_f32(ts)[sl], c_in=space, alpha=alpha[sl], sigma_t=sigma[sl], A=A[sl], B=B[sl], C=C[sl],
                space=space, blend_abar=blend, init_sigma=1.0, start=(a0, s0))


def _plan_unipc(s, N, acp, begin):
    """UniPC runs in `solvers` on the timesteps diffusers uses (`unipc_times`)."""
    ts = _timesteps(s, N, multistep=True)
    return dict(t=ts[begin:], c_in=np.ones(len(ts) - begin), space=np.ones(len(ts) - begin),
                blend_abar=np.append(acp[ts[begin + 1:].astype(int)], 1.0), init_sigma=1.0,
                start=_alpha_start(acp, ts[begin]))


_PLANNERS = {"ddim": _plan_ddim, "ddpm": _plan_ddpm, "pndm": _plan_pndm, "euler": _plan_euler,
             "euler_a": _plan_euler_a, "heun": _plan_heun, "lms": _plan_lms, "dpm": _plan_dpm, "unipc": _plan_unipc}


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

    ts = _timesteps(s, num_steps, multistep=True).astype(np.int64)
    sched = alphas_cumprod(s)
    proc = schedules.NoiseSchedule("diffusers", 1.0 - sched / np.append(1.0, sched[:-1]))
    return samplers.sample(model_fn, proc, shape, rng, sampler="unipc", num_steps=num_steps,
                           prediction=s.prediction, times=np.append(ts, -1), order=s["solver_order"], x_T=x_T,
                           start_step=start_step, after_step=after_step, return_trajectory=return_trajectory)
