"""The plan of a Stable Diffusion scheduler's steps: numpy's replay of each diffusers class's
``set_timesteps`` and of the pipeline's loop (which timesteps the UNet sees, at which input scale,
with which step coefficients), read by `sd_schedulers`' jittable loop. See `sd_schedulers` for
what differs between the classes.
"""
from __future__ import annotations

import math

import numpy as np

from ldm_jax.diffusion import schedules
from ldm_jax.diffusion.sd_scheduler_config import Scheduler, schedule_from_scheduler_config


def alphas_cumprod(scheduler: Scheduler) -> np.ndarray:
    """The class's alphas_cumprod (float64), zero-terminal-SNR rescaled as diffusers does; the
    sigma-space classes then clip the last entry to 2^-24 so that sigma_max stays finite."""
    args = schedule_from_scheduler_config(scheduler.schedule_config())
    args = {k: v for k, v in args.items() if k not in ("prediction", "spacing", "steps_offset")}
    acp = np.array(schedules.make_schedule(**args).alphas_cumprod, np.float64)
    if args.get("zero_terminal_snr") and scheduler.kind in ("euler", "euler_a", "dpm", "unipc"):
        acp[-1] = 2.0**-24
    return acp


def timesteps(s: Scheduler, N: int, *, multistep: bool = False, rounded: bool = False) -> np.ndarray:
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
    ts = timesteps(s, N, multistep=False)
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
    ts = timesteps(s, N, rounded=True)
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
    base = timesteps(s, N, rounded=True)[::-1]  # increasing
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
    ts = timesteps(s, N, multistep=True)
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
    ts = timesteps(s, N, multistep=True)
    return dict(t=ts[begin:], c_in=np.ones(len(ts) - begin), space=np.ones(len(ts) - begin),
                blend_abar=np.append(acp[ts[begin + 1:].astype(int)], 1.0), init_sigma=1.0,
                start=_alpha_start(acp, ts[begin]))


_PLANNERS = {"ddim": _plan_ddim, "ddpm": _plan_ddpm, "pndm": _plan_pndm, "euler": _plan_euler,
             "euler_a": _plan_euler_a, "heun": _plan_heun, "lms": _plan_lms, "dpm": _plan_dpm, "unipc": _plan_unipc}
