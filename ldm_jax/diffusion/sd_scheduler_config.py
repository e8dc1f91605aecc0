"""Stable Diffusion's scheduler configs: `Scheduler.from_config` reads a diffusers
``scheduler_config.json`` (every key of the supported classes either implemented or refused by
name), and `schedule_from_scheduler_config` turns it into our noise schedule's arguments. The
plan of a scheduler's steps is in `sd_scheduler_plans`, its loop in `sd_schedulers`, which
re-exports what is here.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from ldm_jax.diffusion import schedules


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
