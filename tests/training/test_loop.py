"""End-to-end training on a tiny configuration: both stages, resume, faults, devices."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import optim
from ldm_jax.runs.checkpoint import ShapeMismatchError, StageCheckpoints
from ldm_jax.runs.run_record import RunConfigError
from ldm_jax.runtime import sharding
from ldm_jax.training import ldm_stage, loop
from ldm_jax.training.state import TrainState, apply_gradients
from tests.digest import tree_digest
from tests.training.tiny import cheap_compilation, tiny_config


@pytest.fixture(scope="module", autouse=True)
def _cheap_compilation():
    """The training loop's programs compile cheaply here (see tests/training/tiny.py)."""
    with cheap_compilation():
        yield


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def stage_state(workdir, stage):
    ckpt = StageCheckpoints(workdir, stage)
    step = ckpt.latest_step()
    restored = ckpt.restore_raw(step)[0]
    ckpt.close()
    return step, restored


@pytest.fixture(scope="module")
def full_run(shapes_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    summary = loop.train_and_evaluate(tiny_config(shapes_dir), workdir)
    return workdir, summary


@pytest.mark.slow
def test_both_stages_train_checkpoint_and_log(full_run):
    workdir, summary = full_run
    assert summary["status"] == "done" and summary["step"] == 4
    assert stage_state(workdir, "autoencoder")[0] == 4 and stage_state(workdir, "ldm")[0] == 4
    rows = read_metrics(workdir)
    ldm_losses = [r["ldm/loss"] for r in rows if "ldm/loss" in r]
    assert len(ldm_losses) == 2 and all(np.isfinite(ldm_losses))
    assert any("autoencoder/recon_ok" in r for r in rows)
    assert os.path.exists(os.path.join(workdir, "samples", "step_0000004.png"))
    with open(os.path.join(workdir, "eval", "prompt_accuracy_4.json")) as f:
        acc = json.load(f)
    assert set(acc) == {"test", "heldout"}
    logged = {k: v for r in rows if r["step"] == 4 for k, v in r.items() if k.startswith("eval/")}
    for split, result in acc.items():
        assert {f"eval/{split}/{k}": v for k, v in result.items()} == {
            k: v for k, v in logged.items() if k.startswith(f"eval/{split}/")}  # the file is what was logged
        # The checker's verdicts on eval.num_samples = 8 samples: fractions k/8, and a sample is
        # right when its colour, shape and position all are.
        attributes = [result[k] for k in ("colour_ok", "shape_ok", "position_ok")]
        assert set(result) == {"ok", "colour_ok", "shape_ok", "position_ok"}
        assert all(8 * v == round(8 * v) for v in result.values()), result
        assert max(sum(attributes) - 2, 0.0) - 1e-9 <= result["ok"] <= min(attributes), result
    assert any(name.startswith("events.out.tfevents") for _, _, files in os.walk(workdir) for name in files)


@pytest.mark.slow
def test_resume_is_bitwise_exact(full_run, shapes_dir, tmp_path):
    """Stop after 2 steps of each stage and resume: the final parameters equal the uninterrupted run's."""
    reference, _ = full_run
    workdir = str(tmp_path)
    first = tiny_config(shapes_dir, ae_steps=2)
    first.stages = ("autoencoder",)
    loop.train_and_evaluate(first, workdir)
    for ldm_steps in (2, 4):
        config = tiny_config(shapes_dir, ldm_steps=ldm_steps)
        config.eval.splits = ()  # no prompt-accuracy sweep (the test above checks it): parameters only
        loop.train_and_evaluate(config, workdir)
    for stage in ("autoencoder", "ldm"):
        (step_a, a), (step_b, b) = stage_state(reference, stage), stage_state(workdir, stage)
        assert step_a == step_b == 4
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_one_and_four_devices_give_the_same_losses(full_run, shapes_dir, tmp_path):
    reference, _ = full_run
    config = tiny_config(shapes_dir)
    config.mesh.data = 1
    config.eval.splits = ()  # losses only
    loop.train_and_evaluate(config, str(tmp_path))
    ref = [r for r in read_metrics(reference) if "ldm/loss" in r]
    one = [r for r in read_metrics(str(tmp_path)) if "ldm/loss" in r]
    np.testing.assert_allclose([r["ldm/loss"] for r in one], [r["ldm/loss"] for r in ref], rtol=1e-4)
    np.testing.assert_allclose([r["autoencoder/loss"] for r in read_metrics(str(tmp_path)) if "autoencoder/loss" in r],
                               [r["autoencoder/loss"] for r in read_metrics(reference) if "autoencoder/loss" in r], rtol=1e-4)


@pytest.mark.slow
def test_resuming_with_a_different_architecture_is_refused_before_anything_is_written(full_run, shapes_dir,
                                                                                       tmp_path):
    reference, _ = full_run
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)  # the shared run stays read-only
    before = tree_digest(workdir)
    config = tiny_config(shapes_dir, ldm_steps=6)
    config.unet.block_out_channels = (16, 48)
    with pytest.raises(RunConfigError, match=r"unet\.block_out_channels: stored \[16, 32\], given \[16, 48\]"):
        loop.train_and_evaluate(config, workdir)
    assert tree_digest(workdir) == before


def test_restoring_a_checkpoint_into_another_architecture_names_the_parameter(full_run, shapes_dir):
    """The shape check behind the config check (a checkpoint read without its run's config)."""
    reference, _ = full_run
    config = tiny_config(shapes_dir)
    config.unet.block_out_channels = (16, 48)
    models = ldm_stage.build_models(config)
    target = jax.eval_shape(lambda rng: ldm_stage.init_state(config, models, rng), jax.random.PRNGKey(0))
    ckpt = StageCheckpoints(reference, "ldm")
    try:
        with pytest.raises(ShapeMismatchError, match=r"params/unet/.* has shape .*, but the config gives"):
            ckpt.restore(target)
    finally:
        ckpt.close()


def test_nonfinite_updates_stop_the_run_and_keep_the_last_checkpoint(shapes_dir, tmp_path):
    config = tiny_config(shapes_dir)
    config.train.max_nonfinite = 2
    config.train.log_every = 1
    config.train.checkpoint_every = 2
    tx = optim.make_optimizer(lr=0.1, total_steps=10)

    def init_fn(rng):
        return TrainState.create({"w": jnp.ones(3)}, tx, rng)

    def step_fn(state, batch, frozen):  # the loss turns NaN from the 4th step on
        loss_of = lambda p: jnp.mean(p["w"] ** 2) * jnp.mean(batch["image"] ** 2)  # noqa: E731
        loss, grads = jax.value_and_grad(loss_of)(state.params)
        loss = jnp.where(state.step >= 3, jnp.nan, loss)
        state, info = apply_gradients(state, grads, loss, tx)
        return state, {"loss": loss, **info}

    mesh = sharding.make_mesh()
    with pytest.raises(loop.NonFiniteError, match="2 consecutive non-finite updates by step 5.*step 4\\) is intact"):
        loop.run_stage("toy", config=config, workdir=str(tmp_path), mesh=mesh, writer=None, init_fn=init_fn,
                       step_fn=step_fn, total_steps=10, data=loop.data_config(config))
    step, state = stage_state(str(tmp_path), "toy")
    assert step == 4 and int(state["nonfinite"]) == 1 and np.all(np.isfinite(state["params"]["w"]))
