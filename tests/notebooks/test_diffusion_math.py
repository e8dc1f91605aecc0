"""notebooks/diffusion_math.ipynb, top to bottom in its small setting, with its printed numbers held
to their closed forms: the spread of q(x_t | x_0), zero terminal SNR, the moments and component
weights of what every sampler draws with the optimal denoiser, and the variational bound lying
above the data's entropy and preferring the right model.
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


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    nb = run_notebook("diffusion_math.ipynb", {"SMALL": True}, cwd=tmp_path_factory.mktemp("diffusion_math"))
    return nb, outputs_text(nb)


@pytest.mark.slow
def test_every_part_draws_its_figure(executed):
    nb, _ = executed
    # q(x_t | x_0), the schedules, the denoiser's arrows, the trajectories, the VLB terms
    assert image_outputs(nb) == 5


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


@pytest.mark.slow
def test_every_sampler_with_the_oracle_draws_the_mixture(executed):
    _, text = executed
    stats = {}
    for label, *numbers, weights in SAMPLE_STATS.findall(text):
        stats[label] = (np.asarray(numbers[:2], float), np.asarray(numbers[2:], float),
                        np.asarray(weights.split(", "), float))
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
