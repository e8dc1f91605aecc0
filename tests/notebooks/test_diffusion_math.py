"""notebooks/diffusion_math.ipynb, top to bottom in its small setting, with its printed numbers held
to their closed forms: the spread of q(x_t | x_0), zero terminal SNR, the moments and component
weights of what every sampler draws with the optimal denoiser, the variational bound lying
above the data's entropy and preferring the right model, and part 5's four processes: their
endpoints, the mixture drawn on each, and the probability-flow ODE's exact likelihood.
"""
import math
import re

import numpy as np
import pytest

from ldm_jax.diffusion import samplers
from tests.notebooks.execute import image_outputs, outputs_text, run_notebook

# A printed line's label: outputs_text joins a figure's text/plain "<Figure ...>" to the next line.
LABEL = r"\s*([^<>\n]+?)"
# "label: mean (+0.123, -0.456)  std (0.789, 0.812)  weights (0.500, 0.300, 0.200)"
SAMPLE_STATS = re.compile(LABEL + r": mean \((\S+), (\S+)\)  std \((\S+), (\S+)\)  weights \(([^)]*)\)")
# Part 5: "flow: alpha_sigma(t_min) (1.00000, 0.00000)  alpha_sigma(t_max) (0.00000, 1.00000)  log-SNR from
# +inf to -inf  prior_std 1.0000"
ENDPOINTS = re.compile(LABEL + r": alpha_sigma\(t_min\) \((\S+), (\S+)\)  alpha_sigma\(t_max\) \((\S+), (\S+)\)  "
                       r"log-SNR from (\S+) to (\S+)  prior_std (\S+)$", re.M)
PROCESSES = ("discrete", "flow", "flow (shift 3)", "edm", "vdm (init)")
PROCESS_SAMPLERS = ("heun", "dpm_solver++")


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    nb = run_notebook("diffusion_math.ipynb", {"SMALL": True}, cwd=tmp_path_factory.mktemp("diffusion_math"))
    return nb, outputs_text(nb)


@pytest.mark.slow
def test_every_part_draws_its_figure(executed):
    nb, _ = executed
    # q(x_t | x_0), the schedules, the denoiser's arrows, the trajectories, the VLB terms; part 5's
    # log-SNR curves and its grid of samples
    assert image_outputs(nb) == 5 + 2


@pytest.mark.slow
def test_forward_process_spread_matches_its_closed_form(executed):
    _, text = executed
    rows = re.findall(r"std of x_t (\S+) \(closed form (\S+)\)", text)
    assert len(rows) == 2 * 7  # two schedules, seven timesteps
    for measured, predicted in rows:
        assert float(measured) == pytest.approx(float(predicted), rel=0.03)


@pytest.mark.slow
def test_only_the_rescaled_schedule_ends_at_zero_snr(executed):
    _, text = executed
    rows = {label: (float(abar_T), float(end)) for label, abar_T, end in
            re.findall(LABEL + r": abar_1 \S+  abar_T (\S+)  log-SNR from \S+ to (\S+)$", text, re.M)}
    assert len(rows) == 5
    zero = rows.pop("scaled_linear + zero SNR")
    assert zero == (0.0, -math.inf)
    for label, (abar_T, end) in rows.items():
        assert 0.0 < abar_T < 0.01 and math.isfinite(end), label
    assert rows["scaled_linear"][0] == pytest.approx(0.0047, abs=2e-4)  # SD's leak (Lin et al. 2024, sec. 2)


def sample_stats(text) -> dict:
    """label: (mean [2], std [2], weights [K]) of every line printed in SAMPLE_STATS's format."""
    stats = {}
    for label, *numbers, weights in SAMPLE_STATS.findall(text):
        stats[label] = (np.asarray(numbers[:2], float), np.asarray(numbers[2:], float),
                        np.asarray(weights.split(", "), float))
    return stats


@pytest.mark.slow
def test_every_sampler_with_the_oracle_draws_the_mixture(executed):
    _, text = executed
    # part 5's lines are labelled "process / sampler"
    stats = {label: s for label, s in sample_stats(text).items() if " / " not in label}
    true_mean, true_std, true_weights = stats.pop("mixture (closed form)")
    assert sorted(stats) == sorted(samplers.SAMPLERS)
    for name, (mean, std, weights) in stats.items():
        # 2048 points from one x_T: sampling errors ~0.02 on a mean, ~0.01 on a weight; 25 steps
        # get the clusters' spread right to ~10% (SMALL's numbers: 6-11% off)
        np.testing.assert_allclose(mean, true_mean, atol=0.08, err_msg=name)
        np.testing.assert_allclose(weights, true_weights, atol=0.04, err_msg=name)
        np.testing.assert_allclose(std, true_std, rtol=0.15, err_msg=name)
    # DDIM with eta = 0 is Euler's method on the probability-flow ODE (Karras et al. 2022, sec. 3)
    for a, b in zip(stats["ddim"], stats["euler"]):
        np.testing.assert_allclose(a, b, atol=2e-3)


@pytest.mark.slow
def test_variational_bound_is_above_the_entropy_and_ranks_the_models(executed):
    _, text = executed
    entropy = float(re.search(r"entropy of the data, -E log p\(x\) in closed form: (\S+) bits/dim", text).group(1))
    vlb = {label: float(total) for label, total in re.findall(LABEL + r": VLB (\S+) bits/dim", text)}
    assert set(vlb) == {"oracle, fixed_small", "oracle, fixed_large", "single Gaussian, fixed_small"}
    # E[VLB] >= E[-log p_model] >= the entropy, for any model; the optimal denoiser with the wider
    # reverse variance comes closest (SMALL: 0.47 < 0.67 < 1.31 < 2.53 bits/dim).
    assert entropy < vlb["oracle, fixed_large"] < vlb["oracle, fixed_small"] < vlb["single Gaussian, fixed_small"]
    assert vlb["oracle, fixed_large"] < entropy + 0.5
    assert vlb["single Gaussian, fixed_small"] > vlb["oracle, fixed_small"] + 0.5


@pytest.mark.slow
def test_every_process_ends_where_its_closed_form_says(executed):
    _, text = executed
    rows = {label: tuple(map(float, numbers)) for label, *numbers in ENDPOINTS.findall(text)}
    assert sorted(rows) == sorted(PROCESSES)
    for label, (a_min, s_min, a_max, s_max, snr_min, snr_max, prior_std) in rows.items():
        for a, s, snr in ((a_min, s_min, snr_min), (a_max, s_max, snr_max)):
            if s > 0 and a > 0:  # log-SNR = 2 log(alpha / sigma); sigma printed to 1e-5 (VDM's 0.00129: 0.4%)
                assert snr == pytest.approx(2 * math.log(a / s), abs=0.02), label
    # Rectified flow: alpha = 1 - t, sigma = t on [0, 1], with or without SD3's shift (which moves the grid)
    for label in ("flow", "flow (shift 3)"):
        assert rows[label] == (1.0, 0.0, 0.0, 1.0, math.inf, -math.inf, 1.0)
    # EDM: alpha = 1, sigma = t from sigma_min = 0.002 to sigma_max = 80, the prior N(0, sigma_max^2 + 1)
    a_min, s_min, a_max, s_max, snr_min, snr_max, prior_std = rows["edm"]
    assert (a_min, s_min, a_max, s_max) == (1.0, 0.002, 1.0, 80.0)
    assert snr_min == pytest.approx(-2 * math.log(0.002), abs=1e-3)
    assert snr_max == pytest.approx(-2 * math.log(80.0), abs=1e-3)
    assert prior_std == pytest.approx(math.sqrt(80.0**2 + 1), abs=1e-4)
    # Variance preserving: alpha^2 + sigma^2 = 1 at both ends, the prior N(0, I)
    for label in ("discrete", "vdm (init)"):
        a_min, s_min, a_max, s_max, _, _, prior_std = rows[label]
        assert a_min**2 + s_min**2 == pytest.approx(1.0, abs=1e-4), label
        assert a_max**2 + s_max**2 == pytest.approx(1.0, abs=1e-4), label
        assert prior_std == 1.0, label
    # VDM at initialization: gamma = -log-SNR is linear from -13.3 to 5 up to a monotone part of
    # order 1e-4, so alpha(1)^2 = sigmoid(-5)
    _, _, a_max, _, snr_min, snr_max, _ = rows["vdm (init)"]
    assert (snr_min, snr_max) == (pytest.approx(13.3, abs=0.01), pytest.approx(-5.0, abs=0.01))
    assert a_max**2 == pytest.approx(1 / (1 + math.exp(5.0)), abs=2e-5)
    # The discrete process is part 2's scaled_linear schedule: the same abar_1, abar_T and log-SNR range
    abar_1, abar_T, first, last = map(float, re.search(
        r"scaled_linear: abar_1 (\S+)  abar_T (\S+)  log-SNR from (\S+) to (\S+)$", text, re.M).groups())
    a_min, _, a_max, _, snr_min, snr_max, _ = rows["discrete"]
    assert a_min**2 == pytest.approx(abar_1, abs=2e-5)
    assert a_max**2 == pytest.approx(abar_T, rel=2e-3)
    assert (snr_min, snr_max) == (pytest.approx(first, abs=0.006), pytest.approx(last, abs=0.006))


@pytest.mark.slow
def test_every_process_with_the_oracle_draws_the_mixture(executed):
    _, text = executed
    stats = sample_stats(text)
    true_mean, true_std, true_weights = stats.pop("mixture (closed form)")  # printed by part 3
    stats = {label: s for label, s in stats.items() if " / " in label}
    assert sorted(stats) == sorted(f"{p} / {s}" for p in PROCESSES for s in PROCESS_SAMPLERS)
    for label, (mean, std, weights) in stats.items():
        # part 3's tolerances: 2048 points from one x_T (sampling errors ~0.02 on a mean, ~0.01 on a
        # weight); 20 steps get the spread to ~10% (SMALL's numbers: 0.2-7% off, the most for EDM)
        np.testing.assert_allclose(mean, true_mean, atol=0.08, err_msg=label)
        np.testing.assert_allclose(weights, true_weights, atol=0.04, err_msg=label)
        np.testing.assert_allclose(std, true_std, rtol=0.15, err_msg=label)


@pytest.mark.slow
def test_the_last_step_narrows_the_clusters_as_its_log_snr_says(executed):
    _, text = executed
    line = LABEL + r": last step from log-SNR (\S+)  thin clusters' width (\S+) of the data's \(closed form (\S+)\)"
    rows = {label: tuple(map(float, numbers)) for label, *numbers in re.findall(line, text)}
    assert sorted(rows) == sorted(f"{p} / {s}" for p in PROCESSES for s in PROCESS_SAMPLERS)
    steps = int(re.search(r"(\d+) steps per process", text).group(1))
    for label, (log_snr, width, closed_form) in rows.items():
        # The last step lands on E[x_0 | x_t], whose spread in a cluster of variance lambda = 0.01 is
        # sqrt(lambda / (lambda + e^-logSNR)) of the cluster's (SMALL: measured 0.00-0.08 above it:
        # the path's error before the last step, and ~900 points per width)
        assert closed_form == pytest.approx(math.sqrt(0.01 / (0.01 + math.exp(-log_snr))), abs=2e-3), label
        assert width == pytest.approx(closed_form, abs=0.12), label
        process = label.split(" / ")[0]
        # Each grid's last time before the clean end: flow's t = 1/N, shifted 3/(N + 2); EDM's sigma_min
        expected = {"flow": 2 * math.log(steps - 1), "flow (shift 3)": 2 * math.log((steps - 1) / 3),
                    "edm": -2 * math.log(0.002)}.get(process)
        if expected is not None:
            assert log_snr == pytest.approx(expected, abs=2e-3), label
        # Grids that end near log-SNR 3 visibly narrow the thin clusters, EDM's and VDM's (12) do not
        if process in ("discrete", "flow (shift 3)"):
            assert width < 0.7, label
        if process in ("edm", "vdm (init)"):
            assert width > 0.95, label


@pytest.mark.slow
def test_ode_likelihood_is_the_mixtures_log_density(executed):
    _, text = executed
    rows = {label: tuple(map(float, numbers)) for label, *numbers in re.findall(
        LABEL + r": ode log p mean (\S+)  exact mean (\S+)  max \|diff\| (\S+)", text)}
    assert sorted(rows) == sorted(["flow", "edm", "vdm (init)", "vdm (gamma_max 10)"])
    assert len({exact for _, exact, _ in rows.values()}) == 1  # the same points for every process
    worst = {label: max_diff for label, (_, _, max_diff) in rows.items()}
    # Flow: alpha(1) = 0, so the prior is exactly x_1's law; what is left is RK4's error over 100
    # steps (1e-4 in likelihood.py's docstring) and the clean end at t = 1e-5 (1e-8 here).
    # SMALL measured 1.6e-4 at most, 1e-5 on the mean.
    assert worst["flow"] < 2e-3
    # EDM: the prior N(0, sigma_max^2 + 1) is centred at 0, x at sigma_max = 80 at the data's mean
    # m = (-0.2, -0.2): a point whose path ends at 80 z is off by about m.z / 80 (0.012 at |z| = 3.5),
    # plus the clean end's sigma_min = 0.002 (1e-3). SMALL measured 6.0e-3 (the full setting's 64
    # points: 7.5e-3).
    assert worst["edm"] < 2e-2
    # VDM at init keeps alpha(1) = sqrt(sigmoid(-5)) = 0.082 of the signal: off by about
    # 0.082 m.z (0.08 at |z| = 3.5). SMALL measured 3.8e-2 (full: 5.1e-2).
    assert worst["vdm (init)"] < 0.1
    # ... and that is the cause: with gamma_max = 10, alpha(1) = 0.0067, twelve times less, and so
    # is the error (SMALL: 3.2e-3, 12x below; full: 4.0e-3).
    assert worst["vdm (gamma_max 10)"] < min(1e-2, worst["vdm (init)"] / 5)
    # Over the points the prior's error is linear in z and averages out (its expectation: minus the
    # KL of x_t_max's law from the prior, < 3e-4 nats); SMALL: 1e-5 (flow) to 1.3e-3 (VDM at init)
    for label, (ode, exact, _) in rows.items():
        assert ode == pytest.approx(exact, abs=1e-3 if label == "flow" else 5e-3), label
