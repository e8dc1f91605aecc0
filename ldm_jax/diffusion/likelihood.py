"""Likelihood terms and the full variational bound in bits per dimension.

L_vlb = L_0 + sum_{t>=1} L_t + L_T (DDPM eq. 5, 0-based t): L_t = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)),
L_0 = -log p(x_0 | x_1) (the decoder), L_T = KL(q(x_T | x_0) || N(0, I)) (the prior).

For every process (`processes.py`), `ode_log_likelihood` gives the exact log-likelihood through the
probability-flow ODE (Song et al. 2021, App. D); `nats_to_bits_per_dim` converts it.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr

from ldm_jax.diffusion import gaussian, processes
from ldm_jax.diffusion.model_fn import as_pytree_fn
from ldm_jax.diffusion.schedules import NoiseSchedule

DECODERS = ("discretized", "continuous")


def normal_kl(mean1, logvar1, mean2, logvar2):
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def mean_flat(x):
    """Mean over all axes but the first (the batch)."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def continuous_gaussian_log_likelihood(x, mean, log_variance):
    """Elementwise log N(x; mean, e^log_variance) in nats (the decoder for continuous latents)."""
    return -0.5 * (math.log(2 * math.pi) + log_variance + (x - mean) ** 2 * jnp.exp(-log_variance))


def discretized_gaussian_log_likelihood(x, mean, log_scale, num_bins: int = 256):
    """Elementwise log-probability of pixel data x in [-1, 1] under a Gaussian discretised to
    `num_bins` bins of width 2/(num_bins - 1) (DDPM sec. 3.3, eq. 13); the edge bins extend to
    -inf and +inf so the probabilities over the bins sum to one. `log_scale` is log std.

    Uses exact log-CDFs (log_ndtr) rather than Improved DDPM's tanh approximation.
    """
    half_bin = 1.0 / (num_bins - 1)
    inv_std = jnp.exp(-log_scale)
    upper = (x - mean + half_bin) * inv_std
    lower = (x - mean - half_bin) * inv_std
    log_cdf_upper = log_ndtr(upper)  # log P(X <= x + half)
    log_sf_lower = log_ndtr(-lower)  # log P(X >= x - half)
    # log(Phi(upper) - Phi(lower)) computed stably on whichever tail is thinner. log(1 - e^a) as
    # log(-expm1(a)): at the clamp a = -1e-12, log1p(-exp(a)) is log(0) in float32, and its
    # infinite gradient turns into NaN even in the branch `where` discards.
    log1mexp = lambda a: jnp.log(-jnp.expm1(jnp.minimum(a, -1e-12)))  # noqa: E731
    mid_lower_tail = log_cdf_upper + log1mexp(log_ndtr(lower) - log_cdf_upper)
    mid_upper_tail = log_sf_lower + log1mexp(log_ndtr(-upper) - log_sf_lower)
    mid = jnp.where(lower + upper < 0, mid_lower_tail, mid_upper_tail)
    edge = 1.0 - half_bin / 2  # bins are centred on the grid points; edges are beyond these
    return jnp.where(x < -edge, log_cdf_upper, jnp.where(x > edge, log_sf_lower, mid))


def prior_kl(schedule: NoiseSchedule, x0):
    """L_T per example: KL(q(x_T | x_0) || N(0, I)) summed over dimensions, in nats."""
    t = jnp.full((x0.shape[0],), schedule.num_timesteps - 1, jnp.int32)
    mean, var = gaussian.q_mean_variance(schedule, x0, t)
    kl = normal_kl(mean, jnp.log(var), 0.0, 0.0)
    return jnp.sum(kl, axis=tuple(range(1, x0.ndim)))


def vlb_terms(schedule: NoiseSchedule, x0, x_t, t, p, decoder: str = "discretized"):
    """Per-example L_t (nats, summed over dims) for timesteps t [B], given p = p_mean_variance(...).

    t = 0 gives the decoder term -log p(x_0 | x_1); t >= 1 the KL between the true posterior and
    the model's reverse kernel (DDPM eq. 5).
    """
    true_mean, _, true_log_var = gaussian.q_posterior_mean_variance(schedule, x0, x_t, t)
    kl = normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])
    if decoder == "discretized":
        nll = -discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])
    elif decoder == "continuous":
        nll = -continuous_gaussian_log_likelihood(x0, p["mean"], p["log_variance"])
    else:
        gaussian.check_choice("decoder", decoder, DECODERS)
    per_dim = jnp.where(gaussian.broadcast_to_rank(t == 0, x0), nll, kl)
    return jnp.sum(per_dim, axis=tuple(range(1, x0.ndim)))


def bits_per_dim(
    model_fn,
    schedule: NoiseSchedule,
    x0,
    rng,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    decoder: str = "discretized",
    clip_x0: float | None = None,
):
    """The full variational bound of x0 [B, ...] in bits per dimension, with every one of the T
    terms evaluated (a lax.scan over t, one model call per t, one noise draw per t and example),
    as Improved DDPM's `calc_bpd_loop`.

    decoder: "discretized" for 8-bit pixel data in [-1, 1] (256 bins, DDPM eq. 13) or
    "continuous" (a Gaussian density; for latents, the result is then bits per latent dimension).
    model_fn(x_t, t) -> output; pass a `jax.tree_util.Partial` to keep its parameters traced.

    Returns dict (per example, [B]): total, prior (L_T), decoder (L_0), diffusion (sum of the
    KL terms for t >= 1), all in bits/dim, and terms [B, T] (L_t per t, bits/dim).
    """
    gaussian.check_choice("prediction", prediction, gaussian.PREDICTIONS)
    gaussian.check_choice("variance", variance, gaussian.VARIANCES)
    gaussian.check_choice("decoder", decoder, DECODERS)
    return _bits_per_dim(
        as_pytree_fn(model_fn), schedule, x0, rng,
        prediction=prediction, variance=variance, decoder=decoder, clip_x0=clip_x0,
    )


@functools.partial(jax.jit, static_argnames=("schedule", "prediction", "variance", "decoder", "clip_x0"))
def _bits_per_dim(model_fn, schedule, x0, rng, *, prediction, variance, decoder, clip_x0):
    x0 = jnp.asarray(x0, jnp.float32)
    batch = x0.shape[0]
    nats_to_bpd = 1.0 / (math.prod(x0.shape[1:]) * math.log(2.0))

    def term(_, t_scalar):
        t = jnp.full((batch,), t_scalar, jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(rng, t_scalar), x0.shape, jnp.float32)
        x_t = gaussian.q_sample(schedule, x0, t, noise)
        p = gaussian.p_mean_variance(
            schedule, model_fn(x_t, t), x_t, t, prediction=prediction, variance=variance, clip_x0=clip_x0
        )
        return None, vlb_terms(schedule, x0, x_t, t, p, decoder)

    _, terms = jax.lax.scan(term, None, jnp.arange(schedule.num_timesteps, dtype=jnp.int32))
    terms = terms.T * nats_to_bpd  # [B, T]
    prior = prior_kl(schedule, x0) * nats_to_bpd
    decoder_term, diffusion = terms[:, 0], jnp.sum(terms[:, 1:], axis=1)
    return dict(total=prior + decoder_term + diffusion, prior=prior, decoder=decoder_term, diffusion=diffusion, terms=terms)


# ----------------------------------------------------------------------------- probability-flow ODE

DIVERGENCES = ("exact", "hutchinson")
SOLVERS = ("heun", "rk4")
EXACT_DIVERGENCE_MAX_DIMS = 64  # the default divergence is exact up to this many dims per example
_CLEAN_END = {"flow": 1e-5}  # flow's x0 prediction divides by sigma = t: start just above 0


def ode_time_grid(proc: processes.Process, num_steps: int, t_eps: float | None = None) -> np.ndarray:
    """The num_steps + 1 times (float32, increasing) at which `ode_log_likelihood` evaluates the
    ODE, from the clean end t_eps up to proc.t_max.

    t_eps defaults to proc.t_min (EDM's sigma_min, 0 for VDM and discrete), or 1e-5 for flow, where
    an x0 prediction's eps = (x_t - alpha x0)/t is undefined at t = 0. EDM gets its sampler's
    Karras grid (rho-spaced, eq. 5) from t_eps to sigma_max: uniform in sigma would put one step
    across the whole range below sigma ~ 0.8 where the data's structure lives. The other
    processes are uniform in their own time (for VDM's near-linear gamma, about uniform in log-SNR;
    discrete time is a fractional float).
    """
    if t_eps is None:
        t_eps = _CLEAN_END.get(proc.name, proc.t_min)
    if not proc.t_min <= t_eps < proc.t_max:
        raise ValueError(f"t_eps must lie in [t_min, t_max) = [{proc.t_min}, {proc.t_max}), got {t_eps!r}")
    if isinstance(proc, processes.EDMProcess):
        grid = processes.karras_sigmas(t_eps, proc.sigma_max, num_steps + 1, proc.rho)[::-1]
    else:
        grid = np.linspace(t_eps, proc.t_max, num_steps + 1)
    return np.ascontiguousarray(grid, np.float32)


def ode_log_likelihood(
    model_fn,
    proc: processes.Process,
    x0,
    rng,
    *,
    prediction: str = "velocity",
    num_steps: int = 100,
    divergence: str | None = None,
    num_probes: int = 1,
    solver: str = "rk4",
    t_eps: float | None = None,
    return_interval: bool = False,
):
    """log p(x0) in nats per example [B] through the probability-flow ODE (Song et al. 2021,
    "Score-Based Generative Modeling through SDEs", App. D.2):

        dx/dt = f(x, t) = alpha'(t) x0_hat + sigma'(t) eps_hat,
        log p_{t_eps}(x0) = log N(x(t_max); 0, prior_std^2 I) + int_{t_eps}^{t_max} div_x f(x(t), t) dt,

    x(t_eps) = x0, with (x0_hat, eps_hat) from the network's `prediction` ("eps" | "x0" | "v" |
    "velocity", `processes.to_x0_eps`) and the integral taken along ONE trajectory by a fixed-step
    `solver` ("heun": second order, 2 evaluations per step; "rk4": 4) over `ode_time_grid` (EDM's
    Karras grid, otherwise uniform in t). It is the density of the model's marginal at t_eps
    (for discrete, the schedule's t = 0 with sigma_0 ~ 0.03, not abar = 1), and the prior is
    the process's `prior_std`, which is only approximately the marginal at t_max (a bias of order
    the signal left there: alpha(t_max) = 0.068 for SD's scaled_linear schedule).

    Accuracy on Gaussian data in 4 dims (tests/diffusion/test_ode_likelihood.py), max error
    against the exact ODE, 100 steps: RK4 1e-5 (EDM, VDM) to 1e-4 (flow); Heun 1e-3 (flow, VDM),
    2e-2 (EDM). RK4 costs twice Heun's evaluations per step and is still 10-1000x closer at equal
    cost, hence the default. The discrete schedule's alpha, sigma have a kink at every integer t
    (log sigma is piecewise linear), which holds any fixed-step solver to ~5e-3 there.

    divergence: "exact" (the Jacobian's trace, one jvp per dimension, vmapped: for small D) or
    "hutchinson" (Skilling-Hutchinson: E[v^T J v] = tr J for Rademacher probes v; `num_probes` K
    probes, fixed along the trajectory, K jvps per evaluation, drawn from `rng`). Default: exact
    when an example has <= 64 dimensions, else hutchinson.

    return_interval: also return half_width [B], so that ll +- half_width is a 95% interval of the
    Hutchinson estimate: 1.96 std_k(ll_k) / sqrt(K) over the K per-probe estimates ll_k (which
    share the trajectory and differ only in the divergence integral). It covers the probes'
    randomness, not the solver's discretisation error; 0 for exact, inf for K = 1 (std_k is the
    sample standard deviation).

    model_fn(x_t, t [B] in the process's time) -> prediction, each example on its own (the
    divergence is taken through the whole batch at once: no batch statistics); pass a
    `jax.tree_util.Partial` (the process itself is a pytree) so parameters, VDM's gamma included,
    stay traced: one program per (model function, process settings, shape, prediction, solver).
    The ODE needs f at t_max: "eps" is undefined where alpha(t_max) = 0 (flow) and is refused
    there. See `nats_to_bits_per_dim` for bits/dim.
    """
    gaussian.check_choice("prediction", prediction, processes.PREDICTIONS)
    gaussian.check_choice("solver", solver, SOLVERS)
    dims = math.prod(np.shape(x0)[1:])
    if divergence is None:
        divergence = "exact" if dims <= EXACT_DIVERGENCE_MAX_DIMS else "hutchinson"
    gaussian.check_choice("divergence", divergence, DIVERGENCES)
    if not (isinstance(num_steps, int) and num_steps >= 1):
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if not (isinstance(num_probes, int) and num_probes >= 1):
        raise ValueError(f"num_probes must be an integer >= 1, got {num_probes!r}")
    if prediction == "eps" and isinstance(proc, processes.FlowProcess):
        raise ValueError("prediction 'eps' is undefined at flow's t = 1 (alpha = 0, x0 = (x_t - sigma eps)/alpha); "
                         "use 'velocity', 'x0' or 'v'")
    times = ode_time_grid(proc, num_steps, t_eps)
    with jax.ensure_compile_time_eval():  # a Python float, even under an outer jit
        prior_std = float(proc.prior_std)
    # Drawn outside the ODE's program, whose compile time would double with the RNG's.
    probes = None if divergence == "exact" else jax.random.rademacher(rng, (num_probes,) + np.shape(x0), jnp.float32)
    ll, half_width = _ode_log_likelihood(
        as_pytree_fn(model_fn), proc, x0, probes, jnp.asarray(times), prior_std, prediction=prediction, solver=solver)
    return (ll, half_width) if return_interval else ll


@functools.partial(jax.jit, static_argnames=("prediction", "solver"))
def _ode_log_likelihood(model_fn, proc, x0, probes, times, prior_std, *, prediction, solver):
    """probes: Rademacher [K, B, ...] (Hutchinson) or None (exact divergence)."""
    x0 = jnp.asarray(x0, jnp.float32)
    batch, event = x0.shape[0], x0.shape[1:]
    dims = math.prod(event)
    sum_event = lambda a: jnp.sum(a, axis=tuple(range(a.ndim - len(event), a.ndim)))  # noqa: E731
    exact = probes is None
    if exact:  # basis vector d in every example at once: (J e_d)_d = J_dd
        probes = jnp.broadcast_to(jnp.eye(dims, dtype=jnp.float32).reshape((dims, 1) + event), (dims,) + x0.shape)
    num_probes = probes.shape[0]

    def velocity(x, t_scalar):
        t = jnp.full((batch,), t_scalar, jnp.float32)
        alpha, sigma, d_alpha, d_sigma = proc.alpha_sigma_derivatives(t)
        x0_hat, eps_hat = processes.to_x0_eps(prediction, model_fn(x, t), x, alpha, sigma, d_alpha, d_sigma)
        return processes.target_for("velocity", x0_hat, eps_hat, alpha, sigma, d_alpha, d_sigma)

    def dynamics(x, t_scalar):
        """(f(x, t) [B, ...], v_k^T J v_k [K, B]): one primal evaluation, K linearised ones."""
        f, f_jvp = jax.linearize(lambda y: velocity(y, t_scalar), x)
        return f, sum_event(probes * jax.vmap(f_jvp)(probes))

    def heun(x, t0, t1):
        h = t1 - t0
        f0, c0 = dynamics(x, t0)
        f1, c1 = dynamics(x + h * f0, t1)
        return x + 0.5 * h * (f0 + f1), 0.5 * h * (c0 + c1)

    def rk4(x, t0, t1):
        h, tm = t1 - t0, 0.5 * (t0 + t1)
        f1, c1 = dynamics(x, t0)
        f2, c2 = dynamics(x + 0.5 * h * f1, tm)
        f3, c3 = dynamics(x + 0.5 * h * f2, tm)
        f4, c4 = dynamics(x + h * f3, t1)
        return x + h / 6 * (f1 + 2 * f2 + 2 * f3 + f4), h / 6 * (c1 + 2 * c2 + 2 * c3 + c4)

    step = {"heun": heun, "rk4": rk4}[solver]

    def body(carry, t_pair):
        x, integral = carry
        x, d_integral = step(x, t_pair[0], t_pair[1])
        return (x, integral + d_integral), None

    init = (x0, jnp.zeros(probes.shape[:2], jnp.float32))
    (x_end, integral), _ = jax.lax.scan(body, init, jnp.stack([times[:-1], times[1:]], axis=1))
    log_prior = -0.5 * sum_event(x_end**2) / prior_std**2 - dims * (jnp.log(prior_std) + 0.5 * math.log(2 * math.pi))
    if exact:
        return log_prior + jnp.sum(integral, axis=0), jnp.zeros((batch,), jnp.float32)
    ll_k = log_prior + integral  # [K, B]
    spread = jnp.std(ll_k, axis=0, ddof=1) if num_probes > 1 else jnp.full((batch,), jnp.inf)
    return jnp.mean(ll_k, axis=0), 1.96 * spread / math.sqrt(num_probes)


def nats_to_bits_per_dim(ll, dims: int, pixel_data: bool = False):
    """Bits per dimension from log-likelihoods `ll` (nats per example) of `dims`-dimensional data:
    -ll / (dims ln 2) for continuous data (latents). pixel_data: ll is a density over 8-bit data
    scaled to [-1, 1] (bins of width 1/127.5) and dequantized, and the answer is the discrete
    data's: bits/dim = -(ll - dims ln 127.5) / (dims ln 2) = -ll / (dims ln 2) + log2(127.5), as
    score_sde's "offset" of 7 bits (a uniform density on [-1, 1]^D gives ~8 bits/dim)."""
    ll = jnp.asarray(ll, jnp.float32)
    if pixel_data:
        ll = ll - dims * math.log(127.5)
    return -ll / (dims * math.log(2.0))
