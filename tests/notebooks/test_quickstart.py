"""notebooks/quickstart_colab_tpu.ipynb top to bottom in its small setting: tiny networks trained
for a few dozen steps on the test session's small shapes build, then generation, the denoising
trajectory and prompt accuracy."""
import json
import os
import re

import pytest

from tests.notebooks.execute import image_outputs, outputs_text, run_notebook
from tests.sizes import SMALL_SHAPES
from tests.training.tiny import cheap_compilation_env


def kernel_env() -> dict:
    """The kernel's environment: one CPU device instead of the session's four (as on a Colab CPU
    runtime: no SPMD partitioning to compile; tests/training covers several devices), and the
    training tests' cheap compilation (tests/training/tiny.py: XLA's CPU backend without LLVM's
    optimisation passes, its generic emitters, "rbg" keys). Compiling the steps and samplers is
    nearly all of this notebook's time on a CPU: measured on one core, opt level 0 and one device
    took it from ~120 s to ~65 s of CPU time, while the tiny models' few dozen steps run a few
    seconds slower in all. Nothing checked here depends on which random stream initialised them."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    env = cheap_compilation_env({"XLA_FLAGS": flags + " --xla_force_host_platform_device_count=1"})
    return {"XLA_FLAGS": env["XLA_FLAGS"], "JAX_DEFAULT_PRNG_IMPL": env["JAX_DEFAULT_PRNG_IMPL"]}


@pytest.fixture(scope="module")
def executed(shapes_dir, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("quickstart")
    nb = run_notebook("quickstart_colab_tpu.ipynb", {"SMALL": True, "DATA_DIR": shapes_dir}, cwd=cwd,
                      env=kernel_env())
    return nb, os.path.join(cwd, "runs", "quickstart"), shapes_dir


@pytest.mark.slow
def test_trains_both_stages_into_the_workdir(executed):
    nb, workdir, _ = executed
    for stage in ("autoencoder", "ldm"):
        assert os.listdir(os.path.join(workdir, "checkpoints", stage)), stage
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    # SMALL trains 20 steps per stage, logged every 5.
    assert [r["step"] for r in rows if "ldm/loss" in r] == [5, 10, 15, 20]
    assert [r["step"] for r in rows if "autoencoder/loss" in r] == [5, 10, 15, 20]
    text = outputs_text(nb)
    assert "'status': 'done', 'step': 20" in text  # the printed summary
    assert "on cpu: 1 device(s)" in text


@pytest.mark.slow
def test_small_setting_uses_the_tests_shapes_build(executed):
    """SMALL's dataset options are tests/sizes.py's, so the session's build is reused, not rebuilt."""
    _, workdir, shapes_dir = executed
    with open(os.path.join(workdir, "config.json")) as f:
        data = json.load(f)["data"]
    assert data["data_dir"] == shapes_dir and data["options"] == SMALL_SHAPES


@pytest.mark.slow
def test_shows_data_losses_grid_trajectory_and_accuracy(executed):
    nb, _, _ = executed
    assert image_outputs(nb) == 5  # examples, loss curves, prompt grid, trajectory, accuracy bars
    text = outputs_text(nb)
    # 3 sampler steps in SMALL: x_t and predicted x0 recorded at every step.
    assert "3 recorded steps of 3" in text


@pytest.mark.slow
def test_prints_prompt_accuracy_of_both_splits(executed):
    nb, workdir, _ = executed
    text = outputs_text(nb)
    found = dict(re.findall(r"prompt accuracy \((\w+)\): ([\d.]+)%", text))
    assert set(found) == {"test", "heldout"}
    with open(os.path.join(workdir, "eval", "20", "prompt_accuracy.json")) as f:
        record = json.load(f)
    for split in ("test", "heldout"):
        result = record["result"][split]
        assert result["num_samples"] == 8  # EVAL_SAMPLES of the small setting
        assert float(found[split]) == pytest.approx(100 * result["ok"], abs=0.05)
        # The checker's verdicts on 8 samples: a fraction k/8, no more than any one attribute's.
        assert 8 * result["ok"] == round(8 * result["ok"])
        assert result["ok"] <= min(result["colour_ok"], result["shape_ok"], result["position_ok"]), result
