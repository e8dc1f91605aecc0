"""notebooks/stable_diffusion.ipynb, top to bottom, on a tiny random Stable Diffusion folder with SD
1.5's real layout and configs (tests/sd_folders.py: its PNDM scheduler; 16 x 16 images, 8 x 8 x 4
latents) with 4 steps.

Random weights make no pictures worth looking at, so the checks are on what can fail: every task
runs, each image's printed statistics are finite and not constant, seeds, samplers and guidance
behave as the notebook says, each section draws its figure, and nothing is downloaded.
"""
import math
import re

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from tests.notebooks.execute import image_outputs, outputs_text, run_notebook  # noqa: E402
from tests.sd_folders import make_sd_folder  # noqa: E402

STEPS = 4
# Each sampler, image-to-image strength and task is a compiled program of ~10 s CPU: the test runs
# three (the folder's scheduler, which serves the first grid, the sampler comparison and the
# guidance strip; image -> image; inpainting). The samplers and schedulers are tested in
# tests/diffusion and tests/test_sd_pipeline_parity.py, and against the oracle in test_diffusion_math.py.
SAMPLERS_COMPARED = ("scheduler",)
GUIDANCE_SCALES = (1.0, 7.5)  # one compiled program serves the whole strip: two points show it
STRENGTHS = (0.5,)
# "label: mean 0.123  std 0.045  finite True", as the notebook's `summary` prints them (the label
# excludes "<>": outputs_text joins a figure's text/plain "<Figure ...>" to the next line)
STATS = re.compile(r"\s*([^<>\n]+?): mean (\S+)  std (\S+)  finite (True|False)")


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    folder = make_sd_folder(tmp_path_factory.mktemp("sd_tiny") / "sd15", "sd15")
    nb = run_notebook("stable_diffusion.ipynb",
                      {"MODEL_PATH": str(folder), "SMALL": True, "STEPS": STEPS, "SAMPLERS_COMPARED": SAMPLERS_COMPARED,
                       "GUIDANCE_SCALES": GUIDANCE_SCALES, "IMG2IMG_STRENGTHS": STRENGTHS},
                      cwd=tmp_path_factory.mktemp("run"))
    return nb, outputs_text(nb)


def images_in_cell(nb, marker: str) -> int:
    """image/png outputs of the one code cell whose source contains `marker`."""
    cells = [c for c in nb.cells if c.cell_type == "code" and marker in c.source]
    assert len(cells) == 1, f"{len(cells)} code cells contain {marker!r}"
    return sum("image/png" in out.get("data", {}) for out in cells[0].get("outputs", []))


@pytest.mark.slow
def test_every_image_is_finite_and_not_constant(executed):
    _, text = executed
    stats = {label: (float(mean), float(std), finite) for label, mean, std, finite in STATS.findall(text)}
    expected = (["seed 0", "seed 1"] + list(SAMPLERS_COMPARED) + [f"guidance {g:g}" for g in GUIDANCE_SCALES]
                + [f"strength {s:g}" for s in STRENGTHS] + ["inpaint seed 0", "inpaint seed 1"])
    assert sorted(stats) == sorted(expected)
    for label, (mean, std, finite) in stats.items():
        assert finite == "True" and math.isfinite(mean) and math.isfinite(std), label
        assert 0.0 <= mean <= 1.0, label  # output_type="float" is in [0, 1]
        assert std > 1e-3, label  # a constant image (what NaN latents become once clipped) fails


@pytest.mark.slow
def test_seeds_samplers_and_guidance_act_as_documented(executed):
    _, text = executed
    stats = {label: (float(mean), float(std)) for label, mean, std, _ in STATS.findall(text)}
    # Same prompt and seed: the folder's scheduler (the default sampler), the guidance strip at 7.5 (the
    # default scale) and the first grid's seed-0 image (image i depends on seed i alone) are one
    # computation; guidance 1 is another image.
    assert stats["scheduler"] == stats["guidance 7.5"] == stats["seed 0"]
    assert stats["guidance 1"] != stats["guidance 7.5"]
    differences = dict(re.findall(r"([^<>\s]+): mean .*\|Δ scheduler\| (\S+)", text))
    assert differences == {"scheduler": "0.000"}


@pytest.mark.slow
def test_each_section_draws_its_figure_and_nothing_is_downloaded(executed):
    nb, text = executed
    assert images_in_cell(nb, "for name in SAMPLERS_COMPARED") == 1  # the sampler comparison
    assert images_in_cell(nb, "for scale in GUIDANCE_SCALES") == 1  # the guidance strip
    assert image_outputs(nb) == 5  # and text -> image, image -> image, inpainting
    assert "DOWNLOAD_FROM_HUB is False" in text
    assert f"images 16 x 16, {STEPS} steps, 2 seeds in the first grid" in text  # SMALL: at most 2 images
    assert "default sampler 'scheduler'" in text  # the folder's own PNDMScheduler, run exactly
