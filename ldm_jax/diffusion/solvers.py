"""Samplers over any process (`processes.Process`): euler, heun, ddim, ddpm, dpm_solver++ (1-3),
unipc and EDM's stochastic sampler, written with alpha(t), sigma(t) and their time derivatives only.

`samplers.sample` calls `sample` here for the continuous processes and for the samplers the
discrete path does not have. A sampler visits `times` t_0 = t_max > t_1 > ... > t_N (the clean
end; `proc.time_grid(N)` unless given) and evaluates the network at t_0..t_{N-1}:
- euler / heun integrate the probability-flow ODE dx/dt = alpha' x0_hat + sigma' eps_hat in the
  process's own time (for EDM that is Karras et al.'s sigma-space Alg. 1; for flow, SD3's Euler on
  the velocity). Heun does not correct the last step (Karras et al. 2022, Alg. 1).
- ddim / ddpm / dpm_solver++ / unipc work in log-SNR lambda = log(alpha/sigma) and need only alpha
  and sigma at the grid (Lu et al. 2022; Zhao et al. 2023), so they run any process unchanged.
- edm: Karras et al. 2022 Alg. 2: raise the noise by gamma = min(S_churn/N, sqrt(2) - 1) where
  S_tmin <= sigma/alpha <= S_tmax, then a Heun step; the noisier time comes from
  `proc.time_at_log_snr`, so it runs every process.
The loop is one jitted `lax.scan`; the process is a traced pytree (VDM's learned gamma stays a
leaf), and the model a `Partial`, so new parameters or prompts reuse the compiled program.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion import processes as processes_lib
from ldm_jax.diffusion.model_fn import as_pytree_fn
from ldm_jax.diffusion.noise import normal, split

SOLVERS = ("euler", "heun", "ddim", "ddpm", "dpm_solver++", "unipc", "edm")


class Churn(NamedTuple):
    """EDM's stochastic sampler settings (Karras et al. 2022, Alg. 2 and Table 5)."""

    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = float("inf")
    s_noise: float = 1.0


class _Config(NamedTuple):
    sampler: str
    num_steps: int
    shape: tuple
    prediction: str
    order: int
    clip_x0: float | None
    record_every: int
    start_step: int
    lower_order_final: bool


def check_times(times, proc: processes_lib.Process) -> np.ndarray:
    """A sampling grid: 1-D, at least 2 times, strictly decreasing (towards the clean end)."""
    times = np.asarray(times)
    if times.ndim != 1 or times.size < 2:
        raise ValueError(f"times must be a 1-D grid of at least 2 times (num_steps + 1), got shape {times.shape}")
    if not np.all(np.diff(times.astype(np.float64)) < 0):
        raise ValueError(f"times must decrease strictly from the noisy end to the clean end, got {times}")
    if proc.continuous:
        return times.astype(np.float32)
    return times.astype(np.int32) if np.all(times == np.round(times)) else times.astype(np.float32)


def sample(model_fn, proc, shape, rng, sampler: str = "euler", num_steps: int = 50, prediction: str = "eps",
           eta=0.0, *, times=None, order: int = 2, clip_x0: float | None = None, x_T=None,
           return_trajectory: int = 0, start_step: int = 0, churn: Churn = Churn(),
           lower_order_final: bool = True, after_step=None):
    """Draw x_0 [shape] from `proc` with `sampler` over num_steps steps (see the module docstring).

    times: the grid (num_steps + 1 times, decreasing to the clean end); default proc.time_grid.
    eta: ddim's noise (0 deterministic, 1 ancestral); ddpm is ddim with eta = 1.
    order: dpm_solver++ 1, 2 or 3 (multistep, data prediction); unipc 1, 2 or 3.
    lower_order_final: lower orders at the end, as diffusers' multistep schedulers: dpm_solver++'s
      last step first order and, under 15 steps, the one before at most second order; unipc's
      order at most the number of steps left. A step to sigma = 0 is first order regardless.
    x_T: the initial state (default proc.prior_std * N(0, I)); with start_step, the state at
      grid time times[start_step] (SDEdit).
    churn: `Churn(s_churn, s_tmin, s_tmax, s_noise)` for sampler "edm".
    after_step: (x_next, i, abar_next) -> x_next after every step i, as in `samplers.sample`, with
      abar_next = alpha^2 / (alpha^2 + sigma^2) at the next time (the variance-preserving
      process's alpha-bar at the same log-SNR; 1 at the clean end): a progress tick, or a blend
      for processes where alpha^2 + sigma^2 = 1.
    """
    processes_lib._check("sampler", sampler, SOLVERS)
    processes_lib._check("prediction", prediction, processes_lib.PREDICTIONS)
    max_order = 3
    if not 1 <= order <= max_order:
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    shape = tuple(int(d) for d in shape)
    times = check_times(proc.time_grid(int(num_steps)) if times is None else times, proc)
    if len(times) != num_steps + 1:
        raise ValueError(f"times has {len(times)} entries; num_steps={num_steps} needs {num_steps + 1}")
    if not 0 <= start_step < num_steps:
        raise ValueError(f"start_step must be in [0, num_steps={num_steps}), got {start_step}")
    if return_trajectory < 0:
        raise ValueError(f"return_trajectory must be >= 0, got {return_trajectory}")
    if x_T is not None and tuple(x_T.shape) != shape:
        raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {shape}")
    if prediction == "eps" and start_step == 0:
        try:
            alpha_max = float(proc.alpha_sigma(jnp.asarray(times[:1]))[0][0])
        except jax.errors.ConcretizationTypeError:  # learned (traced) noise levels: VDM's alpha is never 0
            alpha_max = None
        if alpha_max == 0.0:
            raise ValueError(f"prediction 'eps' cannot start at t={times[0]}, where alpha = 0 (pure noise: x0 is "
                             "undefined from eps); predict 'velocity', 'v' or 'x0', or start the grid below it")
    config = _Config(sampler, int(num_steps), shape, prediction, int(order), clip_x0, int(return_trajectory),
                     int(start_step), bool(lower_order_final))
    churn = Churn(*(jnp.float32(c) for c in churn))
    hook = None if after_step is None else as_pytree_fn(after_step)
    return _sample(as_pytree_fn(model_fn), proc, jnp.asarray(times), rng, jnp.asarray(eta, jnp.float32), x_T, churn,
                   hook, config=config)


def _levels(proc, t):
    """(alpha, sigma, alpha', sigma') at times t; discrete integer times have no derivatives."""
    if jnp.issubdtype(t.dtype, jnp.integer):
        alpha, sigma = proc.alpha_sigma(t)
        return alpha, sigma, jnp.zeros_like(alpha), jnp.zeros_like(sigma)
    return proc.alpha_sigma_derivatives(t)


@functools.partial(jax.jit, static_argnames=("config",))
def _sample(model_fn, proc, times, rng, eta, x_T, churn, after_step, *, config: _Config):
    init_key, loop_key = split(rng, 2)
    batch, N = config.shape[0], config.num_steps
    if x_T is None:
        x = proc.prior_std * normal(init_key, config.shape) if config.start_step == 0 else None
    else:
        x = x_T.astype(jnp.float32)
    alpha, sigma, d_alpha, d_sigma = _levels(proc, times)

    def predict(x_t, t, a, s, da, ds):
        out = model_fn(x_t, jnp.broadcast_to(t, (batch,))).astype(jnp.float32)
        x0, eps = processes_lib.to_x0_eps(config.prediction, out, x_t, a, s, da, ds)
        if config.clip_x0 is not None:
            x0 = jnp.clip(x0, -config.clip_x0, config.clip_x0)
            eps = (x_t - a * x0) / s
        return x0, eps

    ctx = dict(config=config, predict=predict, eta=eta, proc=proc, churn=churn)
    steps = jnp.arange(config.start_step, N)
    xs = dict(i=steps, t=times[steps], t_next=times[steps + 1], key=split(loop_key, N - config.start_step),
              a=alpha[steps], s=sigma[steps], da=d_alpha[steps], ds=d_sigma[steps],
              a_next=alpha[steps + 1], s_next=sigma[steps + 1], da_next=d_alpha[steps + 1], ds_next=d_sigma[steps + 1])
    step = _STEPS[config.sampler]
    carry = {"x": x, "hist_x0": jnp.zeros((max(config.order, 3),) + config.shape), "hist_lam": jnp.zeros((3,)),
             "count": jnp.zeros((), jnp.int32)}

    k = config.record_every
    visited = N - config.start_step
    record = ({"x_t": jnp.zeros((math.ceil(visited / k),) + config.shape),
               "pred_x0": jnp.zeros((math.ceil(visited / k),) + config.shape)} if k else None)

    def body(state, inp):
        carry, record = state
        x_t = carry["x"]
        carry, pred_x0 = step(ctx, carry, inp)
        if after_step is not None:
            a2, s2 = jnp.square(inp["a_next"]), jnp.square(inp["s_next"])
            carry = dict(carry, x=after_step(carry["x"], inp["i"], a2 / (a2 + s2)))
        if record is not None:
            j = inp["i"] - config.start_step
            slot, keep = j // k, j % k == 0
            record = {"x_t": record["x_t"].at[slot].set(jnp.where(keep, x_t, record["x_t"][slot])),
                      "pred_x0": record["pred_x0"].at[slot].set(jnp.where(keep, pred_x0, record["pred_x0"][slot]))}
        return (carry, record), None

    (carry, record), _ = jax.lax.scan(body, (carry, record), xs)
    if record is None:
        return carry["x"]
    return carry["x"], dict(record, t=times[config.start_step:N][::k])


# ----------------------------------------------------------------------------- the steps
# (ctx, carry, inp) -> (carry, predicted x_0 at this step).


def _lam(a, s):
    """log-SNR / 2 = log(alpha / sigma) (-inf at alpha = 0, +inf at sigma = 0)."""
    return jnp.log(a) - jnp.log(s)


def _euler_heun_step(ctx, carry, inp):
    x, dt = carry["x"], inp["t_next"] - inp["t"]
    x0, eps = ctx["predict"](x, inp["t"], inp["a"], inp["s"], inp["da"], inp["ds"])
    d = inp["da"] * x0 + inp["ds"] * eps
    # The step to the clean end (sigma = 0) lands on x0_hat: Euler's x + (0 - sigma) d in sigma-space
    # (EDM) and in t (flow) alike, and the only meaning a jump to a discrete schedule's "clean" has.
    x_next = jnp.where(inp["s_next"] == 0, inp["a_next"] * x0, x + dt * d)
    if ctx["config"].sampler == "heun":
        def correct(_):
            x0n, epsn = ctx["predict"](x_next, inp["t_next"], inp["a_next"], inp["s_next"], inp["da_next"],
                                       inp["ds_next"])
            return x + dt * (d + inp["da_next"] * x0n + inp["ds_next"] * epsn) / 2.0

        x_next = jax.lax.cond(inp["i"] < ctx["config"].num_steps - 1, correct, lambda _: x_next, None)
    return dict(carry, x=x_next), x0


def _ddim_step(ctx, carry, inp, eta=None):
    """DDIM (Song et al. 2021, eq. 12) for any process: x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z,
    c = eta sigma_s sqrt(1 - e^{-2h}), h = lambda_s - lambda_t (c^2 is the posterior variance at eta = 1)."""
    x = carry["x"]
    x0, eps = ctx["predict"](x, inp["t"], inp["a"], inp["s"], inp["da"], inp["ds"])
    eta = ctx["eta"] if eta is None else eta
    ratio = inp["a"] * inp["s_next"] / (inp["a_next"] * inp["s"])  # e^{-h}
    c = eta * inp["s_next"] * jnp.sqrt(jnp.maximum(1.0 - ratio**2, 0.0))
    z = normal(inp["key"], x.shape)
    x_next = inp["a_next"] * x0 + jnp.sqrt(jnp.maximum(inp["s_next"] ** 2 - c**2, 0.0)) * eps + c * z
    return dict(carry, x=x_next), x0


def _ddpm_step(ctx, carry, inp):
    """Ancestral sampling from the posterior q(x_s | x_t, x0_hat) (DDPM eq. 7 for any alpha, sigma):
    DDIM with eta = 1."""
    return _ddim_step(ctx, carry, inp, eta=1.0)


def multistep_order(config: _Config, i, count):
    """The order a multistep solver may use at step i after `count` model evaluations (diffusers'
    rule: warm up one order per step; with lower_order_final the last step first order and, under
    15 steps, the one before at most second)."""
    order = jnp.minimum(config.order, count + 1)
    if config.lower_order_final:
        last = i == config.num_steps - 1
        second_last = (i == config.num_steps - 2) & (config.num_steps < 15)
        order = jnp.where(last, 1, jnp.where(second_last, jnp.minimum(order, 2), order))
    return order


def _push(hist, value):
    return jnp.concatenate([value[None], hist[:-1]], axis=0)


def _dpm_step(ctx, carry, inp):
    """DPM-Solver++ multistep (Lu et al. 2022, Alg. 2; order 3 as diffusers' third-order update) in
    data prediction, h = lambda_s - lambda_t; written with the ratios e^{-h} and alpha_s so the step to
    sigma_s = 0 and the step from alpha_t = 0 stay finite."""
    x, config = carry["x"], ctx["config"]
    x0, _ = ctx["predict"](x, inp["t"], inp["a"], inp["s"], inp["da"], inp["ds"])
    lam_t, lam_s = _lam(inp["a"], inp["s"]), _lam(inp["a_next"], inp["s_next"])
    h = lam_s - lam_t
    m0, m1, m2 = x0, carry["hist_x0"][0], carry["hist_x0"][1]
    h0, h1 = lam_t - carry["hist_lam"][0], carry["hist_lam"][0] - carry["hist_lam"][1]
    r0, r1 = h0 / h, h1 / h
    phi1 = -jnp.expm1(-h)  # 1 - e^{-h}
    base = inp["s_next"] / inp["s"] * x + (inp["a_next"] - inp["s_next"] * inp["a"] / inp["s"]) * m0
    d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
    second = base + 0.5 * inp["a_next"] * phi1 * d1_0
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    third = base + inp["a_next"] * (1.0 - phi1 / h) * d1 - inp["a_next"] * ((h - phi1) / h**2 - 0.5) * d2
    order = multistep_order(config, inp["i"], carry["count"])
    order = jnp.where(inp["s_next"] == 0, 1, order)  # to sigma = 0: h is infinite (diffusers' final_sigmas_type "zero")
    x_next = jnp.where(order == 1, base, jnp.where(order == 2, second, third))
    return dict(carry, x=x_next, hist_x0=_push(carry["hist_x0"], x0), hist_lam=_push(carry["hist_lam"], lam_t),
                count=carry["count"] + 1), x0


def _edm_step(ctx, carry, inp):
    """Karras et al. 2022 Alg. 2: churn (noise raised to sigma_hat = (1 + gamma) sigma in the
    scaled space x / alpha, gamma = min(S_churn / N, sqrt 2 - 1) inside [S_tmin, S_tmax]), then Heun."""
    x, proc, churn, config = carry["x"], ctx["proc"], ctx["churn"], ctx["config"]
    sigma_ve = inp["s"] / inp["a"]
    inside = (churn.s_tmin <= sigma_ve) & (sigma_ve <= churn.s_tmax) & jnp.isfinite(sigma_ve)
    gamma = jnp.where(inside, jnp.minimum(churn.s_churn / config.num_steps, math.sqrt(2.0) - 1.0), 0.0)
    lam = 2.0 * _lam(inp["a"], inp["s"])
    t_hat = jnp.where(gamma > 0, proc.time_at_log_snr(lam - 2.0 * jnp.log1p(gamma)), inp["t"]).astype(jnp.float32)
    a_hat, s_hat, da_hat, ds_hat = proc.alpha_sigma_derivatives(t_hat)
    z = normal(inp["key"], x.shape)
    sigma_ve_hat = s_hat / a_hat
    extra = jnp.sqrt(jnp.maximum(sigma_ve_hat**2 - sigma_ve**2, 0.0)) * churn.s_noise
    x_hat = jnp.where(gamma > 0, a_hat * (x / inp["a"] + extra * z), x)
    inp = dict(inp, t=t_hat, a=a_hat, s=s_hat, da=da_hat, ds=ds_hat)
    return _euler_heun_step(dict(ctx, config=config._replace(sampler="heun")), dict(carry, x=x_hat), inp)


def _unipc_step(ctx, carry, inp):
    """UniPC (Zhao et al. 2023) with B(h) = e^h - 1 ("bh2") in data prediction, as diffusers'
    UniPCMultistepScheduler with its defaults: a multistep UniP step, then at the next step UniC,
    which redoes that step with the model output at its end point; that output is reused by the
    next UniP, so one model evaluation per step. With h = lambda_s - lambda_t, r_k = (lambda_{t_k}
    - lambda_t) / h and D_k = (x0_k - x0_t) / r_k (k over earlier steps, and UniC's new point at r = 1):
      x_s = (sigma_s / sigma_t) x_t + alpha_s (1 - e^{-h}) (x0_t + sum_k rho_k D_k),
    UniP's rho solving its moment equations over the history and UniC's over the history and the
    new point (`_unipc_weights`). UniC and the UniP it redoes share everything but the sum, so the
    corrected state is the predicted one plus alpha_s (1 - e^{-h}) times the change in the sum (no
    extra carry). The history keeps the model's x0 at the uncorrected point (as diffusers)."""
    x_pred, config = carry["x"], ctx["config"]
    x0, _ = ctx["predict"](x_pred, inp["t"], inp["a"], inp["s"], inp["da"], inp["ds"])
    lam_t = _lam(inp["a"], inp["s"])
    hist_x0, hist_lam, count = carry["hist_x0"], carry["hist_lam"], carry["count"]

    # UniC: redo the last step (from the time of hist[0] to t) at the order its UniP used.
    h = lam_t - hist_lam[0]
    r = [(hist_lam[k] - hist_lam[0]) / h for k in (1, 2)]
    d = [(hist_x0[k] - hist_x0[0]) / r[k - 1] for k in (1, 2)]
    d_t = x0 - hist_x0[0]
    b = _unipc_b(h, 3)
    corrector_sums = (0.5 * d_t,  # order 1: diffusers' rho = 1/2 (the limit h -> 0 of b_0)
                      _weighted(_unipc_weights((r[0], 1.0), b), (d[0], d_t)),
                      _weighted(_unipc_weights((r[1], r[0], 1.0), b), (d[1], d[0], d_t)))
    change = [c - p for c, p in zip(corrector_sums, _unipc_predictor_sums(r, d, b))]
    change = _pick(_unipc_order(config, inp["i"] - 1, count - 1), change)
    x = jnp.where(count > 0, x_pred - inp["a"] * jnp.expm1(-h) * change, x_pred)

    # UniP: from the corrected state to the next time.
    h = _lam(inp["a_next"], inp["s_next"]) - lam_t
    r = [(hist_lam[k] - lam_t) / h for k in (0, 1)]
    d = [(hist_x0[k] - x0) / r[k] for k in (0, 1)]
    base = inp["s_next"] / inp["s"] * x + (inp["a_next"] - inp["s_next"] * inp["a"] / inp["s"]) * x0
    # The step to sigma = 0 is first order whatever the rule: there h = inf, and a higher-order
    # term would extrapolate over an infinite lambda interval.
    order = jnp.where(inp["s_next"] == 0, 1, _unipc_order(config, inp["i"], count))
    x_next = base - inp["a_next"] * jnp.expm1(-h) * _pick(order, _unipc_predictor_sums(r, d, _unipc_b(h, 2)))
    return dict(carry, x=x_next, hist_x0=_push(hist_x0, x0), hist_lam=_push(hist_lam, lam_t),
                count=count + 1), x0


def _unipc_order(config: _Config, i, count):
    """The order of UniPC's predictor at step i after `count` model evaluations (diffusers'
    UniPCMultistepScheduler.step): min(order, count + 1), one order more per step of warm-up, and
    with lower_order_final at most N - i, so order 3 ends 3, 2, 1 whatever N (DPM-Solver's
    `multistep_order` lowers only the last two steps, the second only under 15 steps). The
    corrector at step i runs at the order of the step it redoes, i - 1."""
    order = jnp.minimum(config.order, count + 1)
    if config.lower_order_final:
        order = jnp.minimum(order, config.num_steps - i)
    return order


def _unipc_b(h, n):
    """UniPC's right-hand sides b_k, k < n, for B(h) = e^{-h} - 1 in data prediction:
    b_k = (k + 1)! phi_{k+2}(-h) / phi_1(-h) (-> 1/(k + 2) as h -> 0), with phi_1(z) = (e^z - 1)/z
    and phi_{k+1}(z) = (phi_k(z) - 1/k!)/z, by diffusers' recursion (so that the roundings match)."""
    hh = -h
    b_h = jnp.expm1(hh)
    h_phi = b_h / hh - 1.0  # hh phi_2(hh)
    b, factorial = [], 1.0
    for k in range(1, n + 1):
        b.append(h_phi * factorial / b_h)
        factorial *= k + 1
        h_phi = h_phi / hh - 1.0 / factorial
    return b


def _unipc_predictor_sums(r, d, b):
    """sum_k rho_k D_k of UniP of orders 1, 2, 3 (order 2 with diffusers' rho = 1/2); r[0], d[0]
    belong to the latest earlier step."""
    return jnp.zeros_like(d[0]), 0.5 * d[0], _weighted(_unipc_weights((r[1], r[0]), b), (d[1], d[0]))


def _unipc_weights(nodes, b):
    """rho solving UniPC's R rho = b: sum_k rho_k nodes[k]^j = b[j] for j < len(nodes) (2 or 3).

    nodes[0] is the oldest step. At alpha = 0 (a flow process's first step) its lambda is -inf, so
    its r = -inf and its D = (x0_k - x0_t) / r = 0; in the limit its rho -> 0 and the others solve
    the system without that node and the highest-moment equation, which is what is used there."""
    full = _lagrange_solve(nodes, b)
    reduced = (0.0,) + _lagrange_solve(nodes[1:], b)
    far = jnp.isinf(nodes[0])
    return tuple(jnp.where(far, rho_reduced, rho) for rho_reduced, rho in zip(reduced, full))


def _lagrange_solve(nodes, b):
    """The transposed Vandermonde system sum_k rho_k nodes[k]^j = b[j] (j < n) in closed form:
    rho_k = sum_j c_kj b[j], with c_k the coefficients of node k's Lagrange polynomial."""
    rhos = []
    for k, node in enumerate(nodes):
        coeffs, denom = [1.0], 1.0  # prod_{m != k} (x - nodes[m]), lowest power first
        for other in nodes[:k] + nodes[k + 1:]:
            shifted = [0.0] + coeffs  # x p(x)
            coeffs = [xp - other * p for xp, p in zip(shifted, coeffs + [0.0])]  # x p(x) - other p(x)
            denom = denom * (node - other)
        rhos.append(sum(c * b_j for c, b_j in zip(coeffs, b)) / denom)
    return tuple(rhos)


def _weighted(rhos, ds):
    return sum(rho * d for rho, d in zip(rhos, ds))


def _pick(order, by_order):
    """by_order[order - 1] for a traced order 1..3: a where-chain, so the unused orders' entries
    may be non-finite (they use history not yet filled)."""
    return jnp.where(order == 1, by_order[0], jnp.where(order == 2, by_order[1], by_order[2]))


_STEPS = {"euler": _euler_heun_step, "heun": _euler_heun_step, "ddim": _ddim_step, "ddpm": _ddpm_step,
          "dpm_solver++": _dpm_step, "unipc": _unipc_step, "edm": _edm_step}
