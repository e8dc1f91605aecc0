"""Diffusion processes x_t = alpha(t) x_0 + sigma(t) eps, behind one interface.

    proc = make_process("flow")                       # rectified flow, alpha = 1 - t, sigma = t, t in [0, 1]
    proc = make_process("edm", sigma_min=0.002, sigma_max=80.0)    # alpha = 1, sigma = t
    proc = make_process("vdm")                        # variance preserving, learned monotone gamma(t)
    proc = make_process("discrete", schedule=schedules.make_schedule("scaled_linear", 1000))
    alpha, sigma = proc.alpha_sigma(t)                # t [B] in the process's own time; jittable, differentiable

A process knows its time interval, its noise levels and their time derivatives, the grid of times a
sampler visits, and how its time maps to the network's timestep input. Every process is a pytree
(`jax.tree_util.register_dataclass`): static settings are metadata, and VDM's learned schedule
parameters are leaves, so a process crosses `jax.jit` and trains like any parameter.

Predictions (REFERENCE.md, "Continuous processes"): a network predicts one of
  eps, x0, v (= alpha eps - sigma x0; Salimans & Ho 2022), or velocity (= alpha' x0 + sigma' eps,
  the probability-flow ODE's dx/dt; for flow eps - x0, SD3's target).
`to_x0_eps` and `target_for` convert between all of them for every process.
"""
from __future__ import annotations

import abc
import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.schedules import NoiseSchedule

PROCESSES = ("discrete", "flow", "edm", "vdm")
PREDICTIONS = ("eps", "x0", "v", "velocity")


def _check(key, value, allowed):
    if value not in allowed:
        raise ValueError(f"unknown {key} {value!r}; allowed: {', '.join(map(repr, allowed))}")


def _per_example(a, x):
    """a [B] (or a scalar) reshaped to broadcast against x [B, ...]."""
    a = jnp.asarray(a, jnp.float32)
    return a if a.ndim == 0 else a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


class Process(abc.ABC):
    """x_t = alpha(t) x_0 + sigma(t) eps with eps ~ N(0, I), t in [t_min, t_max]; sampling runs from
    t_max (where x_t is drawn from `prior_std`) down to the clean end t_min."""

    name: str = ""
    continuous: bool = True
    variance_preserving: bool = False

    @property
    @abc.abstractmethod
    def t_min(self) -> float:
        """The clean end of the time interval."""

    @property
    @abc.abstractmethod
    def t_max(self) -> float:
        """The noisy end, where sampling starts."""

    @abc.abstractmethod
    def alpha_sigma(self, t):
        """(alpha(t), sigma(t)), float32 arrays of t's shape."""

    def alpha_sigma_derivatives(self, t):
        """(alpha, sigma, d alpha/dt, d sigma/dt) at t (forward-mode differentiation)."""
        t = jnp.asarray(t, jnp.float32)
        (alpha, sigma), (d_alpha, d_sigma) = jax.jvp(self.alpha_sigma, (t,), (jnp.ones_like(t),))
        return alpha, sigma, d_alpha, d_sigma

    def log_snr(self, t):
        """lambda(t) = log(alpha^2 / sigma^2)."""
        alpha, sigma = self.alpha_sigma(t)
        return 2.0 * (jnp.log(alpha) - jnp.log(sigma))

    def time_at_log_snr(self, log_snr):
        """The time at which the log-SNR is `log_snr` (log-SNR falls with t): by bisection unless a
        process knows its closed form. Used by EDM's stochastic sampler to find the noisier time."""
        lo = jnp.full(jnp.shape(log_snr), self.t_min, jnp.float32)
        hi = jnp.full(jnp.shape(log_snr), self.t_max, jnp.float32)

        def halve(_, bounds):
            lo, hi = bounds
            mid = 0.5 * (lo + hi)
            above = self.log_snr(mid) > log_snr  # mid is still too clean
            return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

        lo, hi = jax.lax.fori_loop(0, 40, halve, (lo, hi))
        return 0.5 * (lo + hi)

    @property
    def prior_std(self):
        """Standard deviation of the N(0, prior_std^2 I) that x_{t_max} is drawn from (unit-variance
        data noised to t_max: sqrt(alpha^2 + sigma^2) at t_max); a float32 scalar, traceable."""
        alpha, sigma = self.alpha_sigma(jnp.float32(self.t_max))
        return jnp.sqrt(alpha**2 + sigma**2)

    @abc.abstractmethod
    def time_grid(self, num_steps: int) -> np.ndarray:
        """The num_steps + 1 times a sampler visits, t_max first, ending at the clean end."""

    def network_time(self, t):
        """What the network's timestep embedding receives for process time t."""
        return t

    def sample_time(self, rng, batch: int):
        """Training times t ~ U(t_min, t_max) (a process may shift them; see `FlowProcess.shift`)."""
        return jax.random.uniform(rng, (batch,), jnp.float32, self.t_min, self.t_max)


def _static(cls, data_fields=()):
    """Register a dataclass as a pytree whose fields are metadata except `data_fields`."""
    fields = [f.name for f in dataclasses.fields(cls)]
    return jax.tree_util.register_dataclass(
        cls, data_fields=list(data_fields), meta_fields=[f for f in fields if f not in data_fields])


# ----------------------------------------------------------------------------- discrete


@dataclasses.dataclass(frozen=True, eq=False)
class DiscreteProcess(Process):
    """The discrete variance-preserving schedule (DDPM), integer time 0..T-1: `samplers.sample`
    runs it exactly as it runs the `NoiseSchedule` itself. Time -1 stands for the clean data
    (abar = 1), the end of every sampling grid."""

    schedule: NoiseSchedule
    name = "discrete"
    continuous = False
    variance_preserving = True

    @property
    def t_min(self) -> float:
        return 0.0

    @property
    def t_max(self) -> float:
        return float(self.schedule.num_timesteps - 1)

    def alpha_sigma(self, t):
        """Integer t reads the schedule's table; fractional t interpolates log sigma linearly in t
        (as `NoiseSchedule.alphas_cumprod_at`, but differentiable at the grid points too)."""
        t = jnp.asarray(t)
        clean = t < 0
        if jnp.issubdtype(t.dtype, jnp.integer):
            abar = self.schedule.alphas_cumprod_at(jnp.maximum(t, 0))
        else:
            log_sigma = jnp.asarray(np.log(np.clip(self.schedule.sigmas, 1e-30, 1e15)), jnp.float32)
            tc = jnp.where(t < 0.0, 0.0, jnp.where(t > self.t_max, self.t_max, t))  # clip, full gradient at the ends
            lo = jnp.minimum(jnp.floor(tc), self.t_max - 1).astype(jnp.int32)
            w = tc - lo
            abar = jax.nn.sigmoid(-2.0 * ((1.0 - w) * log_sigma[lo] + w * log_sigma[lo + 1]))
        abar = jnp.where(clean, 1.0, abar)
        return jnp.sqrt(abar), jnp.sqrt(1.0 - abar)

    def log_snr(self, t):
        return self.schedule.log_snr(t)

    def time_at_log_snr(self, log_snr):
        """Fractional t by linear interpolation of log sigma in t (as k-diffusion)."""
        log_sigma = np.log(np.clip(self.schedule.sigmas, 1e-30, 1e15))  # increasing in t
        return jnp.interp(-0.5 * log_snr, jnp.asarray(log_sigma, jnp.float32),
                          jnp.arange(self.schedule.num_timesteps, dtype=jnp.float32))

    def time_grid(self, num_steps: int) -> np.ndarray:
        """Evenly spaced ("trailing") timesteps, then -1 (clean)."""
        T = self.schedule.num_timesteps
        ts = np.round(np.arange(T, 0, -T / num_steps)).astype(np.int64) - 1
        return np.append(ts, -1).astype(np.int32)

    def sample_time(self, rng, batch: int):
        return jax.random.randint(rng, (batch,), 0, self.schedule.num_timesteps, jnp.int32)


# ----------------------------------------------------------------------------- rectified flow


def shift_time(t, shift: float):
    """SD3's resolution-dependent shift t' = shift t / (1 + (shift - 1) t) (Esser et al. 2024, sec. 5.3.2;
    diffusers' FlowMatchEulerDiscreteScheduler): shift > 1 spends more time at high noise."""
    return shift * t / (1.0 + (shift - 1.0) * t)


@dataclasses.dataclass(frozen=True)
class FlowProcess(Process):
    """Rectified flow / flow matching (Liu et al. 2022; Lipman et al. 2023): alpha = 1 - t, sigma = t,
    t in [0, 1]; velocity = eps - x_0. `shift` applies SD3's time shift to the sampling grid and to
    the training times. The network sees 1000 t (SD3's timestep)."""

    shift: float = 1.0
    name = "flow"

    @property
    def t_min(self) -> float:
        return 0.0

    @property
    def t_max(self) -> float:
        return 1.0

    def alpha_sigma(self, t):
        t = jnp.asarray(t, jnp.float32)
        return 1.0 - t, t

    def log_snr(self, t):
        t = jnp.asarray(t, jnp.float32)
        return 2.0 * (jnp.log1p(-t) - jnp.log(t))

    def time_at_log_snr(self, log_snr):
        return jax.nn.sigmoid(-0.5 * jnp.asarray(log_snr, jnp.float32))  # t/(1-t) = e^{-lambda/2}

    def time_grid(self, num_steps: int) -> np.ndarray:
        """linspace(1, 0, num_steps + 1), shifted."""
        return shift_time(np.linspace(1.0, 0.0, num_steps + 1), self.shift).astype(np.float32)

    def network_time(self, t):
        return 1000.0 * t

    def sample_time(self, rng, batch: int):
        return shift_time(jax.random.uniform(rng, (batch,), jnp.float32), self.shift)


# ----------------------------------------------------------------------------- EDM


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 eq. 5: sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    ramp = np.linspace(0.0, 1.0, num_steps)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


@dataclasses.dataclass(frozen=True)
class EDMProcess(Process):
    """Karras et al. 2022 (EDM): alpha = 1, sigma = t, sampling from sigma_max down the rho-spaced
    grid to sigma_min, then 0. sigma_data is the data's standard deviation, used by EDM's
    preconditioning (`preconditioning`) and loss weight. The network sees c_noise = ln(sigma)/4."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    rho: float = 7.0
    name = "edm"

    @property
    def t_min(self) -> float:
        return self.sigma_min

    @property
    def t_max(self) -> float:
        return self.sigma_max

    def alpha_sigma(self, t):
        t = jnp.asarray(t, jnp.float32)
        return jnp.ones_like(t), t

    def log_snr(self, t):
        return -2.0 * jnp.log(jnp.asarray(t, jnp.float32))

    def time_at_log_snr(self, log_snr):
        return jnp.exp(-0.5 * jnp.asarray(log_snr, jnp.float32))

    @property
    def prior_std(self):
        return jnp.float32(math.sqrt(self.sigma_max**2 + 1.0))

    def time_grid(self, num_steps: int) -> np.ndarray:
        return np.append(karras_sigmas(self.sigma_min, self.sigma_max, num_steps, self.rho), 0.0).astype(np.float32)

    def network_time(self, t):
        return 0.25 * jnp.log(t)

    def preconditioning(self, sigma):
        """EDM's Table 1: (c_skip, c_out, c_in) with D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)."""
        sd2 = self.sigma_data**2
        sigma = jnp.asarray(sigma, jnp.float32)
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / jnp.sqrt(sigma**2 + sd2)
        c_in = 1.0 / jnp.sqrt(sigma**2 + sd2)
        return c_skip, c_out, c_in


# ----------------------------------------------------------------------------- VDM


def vdm_gamma_init(rng, gamma_min: float = -13.3, gamma_max: float = 5.0, features: int = 1024) -> dict:
    """Parameters of VDM's monotone gamma network (Kingma et al. 2021, App. H; google-research/vdm's
    NoiseSchedule_NNet): a linear part whose bias and slope set the endpoints, plus a small
    monotone nonlinear part."""
    k2, k3 = jax.random.split(rng)
    return {
        "l1": {"kernel": jnp.full((1, 1), gamma_max - gamma_min, jnp.float32),
               "bias": jnp.full((1,), gamma_min, jnp.float32)},
        "l2": {"kernel": 0.01 * jax.random.normal(k2, (1, features), jnp.float32),
               "bias": jnp.zeros((features,), jnp.float32)},
        "l3": {"kernel": 0.01 * jax.random.normal(k3, (features, 1), jnp.float32)},
    }


def vdm_gamma(params, t):
    """gamma(t) = l1(t) + l3(2 sigmoid(l2(2t - 1)) - 1) / features, with |kernels| so every layer,
    and so gamma, is non-decreasing in t (VDM's DenseMonotone)."""
    t = jnp.asarray(t, jnp.float32)[..., None]
    h = t @ jnp.abs(params["l1"]["kernel"]) + params["l1"]["bias"]
    u = (2.0 * t - 1.0) @ jnp.abs(params["l2"]["kernel"]) + params["l2"]["bias"]
    u = 2.0 * (jax.nn.sigmoid(u) - 0.5)
    h = h + u @ jnp.abs(params["l3"]["kernel"]) / params["l3"]["kernel"].shape[0]
    return h[..., 0]


@dataclasses.dataclass(frozen=True)
class VDMProcess(Process):
    """Variational diffusion (Kingma et al. 2021): alpha^2 = sigmoid(-gamma(t)), sigma^2 =
    sigmoid(gamma(t)), t in [0, 1], with gamma the learned monotone network (`params`, trained with
    the model; endpoints start at gamma_min and gamma_max). With `learned=False` gamma is linear
    between the fixed endpoints. The network sees 1000 t."""

    params: dict | None = None
    gamma_min: float = -13.3
    gamma_max: float = 5.0
    learned: bool = True
    name = "vdm"
    variance_preserving = True

    @property
    def t_min(self) -> float:
        return 0.0

    @property
    def t_max(self) -> float:
        return 1.0

    def init_params(self, rng) -> dict:
        """Fresh gamma parameters ({} when the schedule is fixed)."""
        return vdm_gamma_init(rng, self.gamma_min, self.gamma_max) if self.learned else {}

    def bind(self, params) -> "VDMProcess":
        """This process with gamma's parameters `params`."""
        return dataclasses.replace(self, params=params)

    def gamma(self, t):
        if not self.learned:
            return self.gamma_min + (self.gamma_max - self.gamma_min) * jnp.asarray(t, jnp.float32)
        if self.params is None:
            raise ValueError("this VDM process has no gamma parameters: bind them with proc.bind(params)")
        return vdm_gamma(self.params, t)

    def alpha_sigma(self, t):
        g = self.gamma(t)
        return jnp.sqrt(jax.nn.sigmoid(-g)), jnp.sqrt(jax.nn.sigmoid(g))

    def log_snr(self, t):
        return -self.gamma(t)

    @property
    def prior_std(self):
        return jnp.float32(1.0)

    def time_grid(self, num_steps: int) -> np.ndarray:
        return np.linspace(1.0, 0.0, num_steps + 1).astype(np.float32)

    def network_time(self, t):
        return 1000.0 * t


for _cls in (FlowProcess, EDMProcess):
    _static(_cls)
_static(DiscreteProcess)
_static(VDMProcess, data_fields=("params",))


def make_process(name: str, **kwargs) -> Process:
    """The process `name` with its settings: "discrete" (schedule=NoiseSchedule), "flow" (shift),
    "edm" (sigma_min, sigma_max, sigma_data, rho), "vdm" (gamma_min, gamma_max, learned; its
    gamma parameters come from `init_params` and `bind`)."""
    _check("process", name, PROCESSES)
    cls = {"discrete": DiscreteProcess, "flow": FlowProcess, "edm": EDMProcess, "vdm": VDMProcess}[name]
    allowed = [f.name for f in dataclasses.fields(cls) if f.name != "params"]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown} for process {name!r}; allowed: {allowed}")
    if name == "discrete" and not isinstance(kwargs.get("schedule"), NoiseSchedule):
        raise ValueError("process 'discrete' needs schedule=<a NoiseSchedule from schedules.make_schedule>")
    for key, value in kwargs.items():
        if key == "learned":
            if not isinstance(value, bool):
                raise ValueError(f"vdm learned must be True or False, got {value!r}")
        elif key != "schedule" and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                    or not math.isfinite(value)):
            raise ValueError(f"{name} {key} must be a finite number, got {value!r}")
    for key in ("sigma_data", "rho"):
        if name == "edm" and key in kwargs and not kwargs[key] > 0:
            raise ValueError(f"edm {key} must be > 0, got {kwargs[key]!r}")
    if name == "flow" and not kwargs.get("shift", 1.0) > 0:
        raise ValueError(f"flow shift must be > 0, got {kwargs['shift']!r}")
    if name == "edm" and not 0 < kwargs.get("sigma_min", 0.002) < kwargs.get("sigma_max", 80.0):
        raise ValueError(f"edm needs 0 < sigma_min < sigma_max, got {kwargs}")
    if name == "vdm" and not kwargs.get("gamma_min", -13.3) < kwargs.get("gamma_max", 5.0):
        raise ValueError(f"vdm needs gamma_min < gamma_max, got {kwargs}")
    return cls(**kwargs)


def as_process(schedule_or_process) -> Process:
    """A process from a `Process` or a discrete `NoiseSchedule`."""
    if isinstance(schedule_or_process, NoiseSchedule):
        return DiscreteProcess(schedule_or_process)
    if isinstance(schedule_or_process, Process):
        return schedule_or_process
    raise TypeError(f"expected a Process or a NoiseSchedule, got {type(schedule_or_process).__name__}")


# ----------------------------------------------------------------------------- predictions


def to_x0_eps(prediction: str, output, x_t, alpha, sigma, d_alpha=None, d_sigma=None):
    """(x0_hat, eps_hat) from a network output of type `prediction` at noise level (alpha, sigma)
    (per-example [B] or scalars). Solves x_t = alpha x0 + sigma eps together with
      eps:  eps = output;   x0: x0 = output;
      v:    v = alpha eps - sigma x0  ->  x0 = (alpha x_t - sigma v)/(alpha^2 + sigma^2),
                                          eps = (sigma x_t + alpha v)/(alpha^2 + sigma^2);
      velocity: u = alpha' x0 + sigma' eps  ->  x0 = (sigma' x_t - sigma u)/(alpha sigma' - sigma alpha'),
                                                eps = (alpha u - alpha' x_t)/(alpha sigma' - sigma alpha').
    eps is undefined where alpha = 0 (pure noise) and x0 where sigma = 0.
    """
    _check("prediction", prediction, PREDICTIONS)
    a, s = _per_example(alpha, x_t), _per_example(sigma, x_t)
    if prediction == "eps":
        return (x_t - s * output) / a, output
    if prediction == "x0":
        return output, (x_t - a * output) / s
    if prediction == "v":
        norm = a**2 + s**2
        return (a * x_t - s * output) / norm, (s * x_t + a * output) / norm
    if d_alpha is None or d_sigma is None:
        raise ValueError("velocity prediction needs the time derivatives d_alpha and d_sigma")
    da, ds = _per_example(d_alpha, x_t), _per_example(d_sigma, x_t)
    det = a * ds - s * da
    return (ds * x_t - s * output) / det, (a * output - da * x_t) / det


def target_for(prediction: str, x0, eps, alpha, sigma, d_alpha=None, d_sigma=None):
    """What a network with this `prediction` should output for (x0, eps) at (alpha, sigma)."""
    _check("prediction", prediction, PREDICTIONS)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    a, s = _per_example(alpha, x0), _per_example(sigma, x0)
    if prediction == "v":
        return a * eps - s * x0
    if d_alpha is None or d_sigma is None:
        raise ValueError("velocity prediction needs the time derivatives d_alpha and d_sigma")
    return _per_example(d_alpha, x0) * x0 + _per_example(d_sigma, x0) * eps


def x0_error_scale(prediction: str, alpha, sigma, d_alpha=None, d_sigma=None):
    """c with |target - output| = c |x0 - x0_hat| at fixed x_t (per example): 1 for x0, alpha/sigma
    for eps, (alpha^2 + sigma^2)/sigma for v, |alpha' sigma - sigma' alpha|/sigma for velocity.
    So a loss weight w in x0-space is w / c^2 on the prediction's own error (min-SNR, EDM)."""
    _check("prediction", prediction, PREDICTIONS)
    alpha, sigma = jnp.asarray(alpha, jnp.float32), jnp.asarray(sigma, jnp.float32)
    if prediction == "x0":
        return jnp.ones_like(alpha)
    if prediction == "eps":
        return alpha / sigma
    if prediction == "v":
        return (alpha**2 + sigma**2) / sigma
    return jnp.abs(d_alpha * sigma - d_sigma * alpha) / sigma
