"""A run's record is never lost: the stored config (versioned, migrated, never overwritten), the
changes allowed on resume, the workdir lock, damaged checkpoints and a disk that fills up.

Most of these need no training: a workdir with a config.json, or a toy stage (a 3-parameter
model) through the real loop, checkpoints and metrics writer."""
import errno
import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ldm_jax import config as config_lib
from ldm_jax import optim
from ldm_jax.runs import workdir as workdir_lib
from ldm_jax.runs import checkpoint as checkpoint_lib
from ldm_jax.runs import run_record
from ldm_jax.runs.checkpoint import CheckpointSaveError, DamagedCheckpointError, StageCheckpoints
from ldm_jax.runs.writer import MetricWriter
from ldm_jax.runtime import sharding
from ldm_jax.training import loop
from ldm_jax.training.state import TrainState, apply_gradients
from tests.digest import tree_digest
from tests.training.tiny import ROOT, load_base, tiny_config

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures")


def _stored_run(tmp_path, config=None) -> str:
    """A workdir holding only a stored config (as a run's first act writes it)."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    run_record.write_config(str(workdir), config if config is not None else tiny_config("/data"))
    return str(workdir)


# ---------------------------------------------------------------------------------------------
# The stored config: written once, versioned, migrated


def test_stored_config_carries_its_version_and_reads_back_equal(tmp_path):
    config = tiny_config("/data")
    workdir = _stored_run(tmp_path, config)
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["config_version"] == run_record.CONFIG_VERSION
    assert workdir_lib.load_workdir_config(workdir).to_dict() == workdir_lib._tuples(config.to_dict())


def test_version_1_config_of_last_month_reads_as_written(tmp_path):
    """config_v1_base.json: configs/base.py as the loop wrote it until this change (no version key)."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    shutil.copy(os.path.join(FIXTURES, "config_v1_base.json"), workdir / "config.json")
    loaded = workdir_lib.load_workdir_config(str(workdir))
    assert loaded.to_dict() == workdir_lib._tuples(load_base().to_dict())


def test_version_1_config_from_before_three_keys_existed_gets_the_values_it_was_trained_with(tmp_path):
    """config_v1_2026-11-22_214526c.json: written before train.cache_latents,
    text_encoder.train_token_embedding and autoencoder.perceptual_weight existed. The migration
    gives the behaviour of that time, not today's defaults (True, False, 1.0)."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    shutil.copy(os.path.join(FIXTURES, "config_v1_2026-11-22_214526c.json"), workdir / "config.json")
    loaded = workdir_lib.load_workdir_config(str(workdir))
    assert loaded.train.cache_latents is False
    assert loaded.text_encoder.train_token_embedding is True
    assert loaded.autoencoder.perceptual_weight == 1.0
    assert loaded.train.steps == 2000 and loaded.unet.block_out_channels == (32, 64)  # that run's own values


@pytest.mark.parametrize("stored, read", [(-1, None), (3000, 3000), (0, 0)])
def test_version_2_disc_start_minus_one_reads_as_none(tmp_path, stored, read):
    """Until config_version 3, autoencoder.disc_start=-1 meant "never"; now None says it."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    with open(os.path.join(FIXTURES, "config_v1_base.json")) as f:
        config = json.load(f)
    config["config_version"] = 2
    config["autoencoder"]["disc_start"] = stored
    (workdir / "config.json").write_text(json.dumps(config))
    assert workdir_lib.load_workdir_config(str(workdir)).autoencoder.disc_start == read


def test_disc_start_minus_one_is_refused_naming_none():
    config = load_base()
    config.autoencoder.disc_start = -1
    with pytest.raises(ValueError, match=r"autoencoder\.disc_start=-1 .*or None for never"):
        config_lib.validate(config)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["optim"].pop("lr"), r"key optim\.lr is missing \(config_version 1\)"),
    (lambda c: c["train"].update(fancy=1), r"unknown key train\.fancy"),
    (lambda c: c.update(config_version=99), r"config_version=99 is not one this ldm_jax reads"),
    (lambda c: c.update(config_version=2) or c["train"].pop("cache_latents"),
     r"key train\.cache_latents is missing \(config_version 2\)"),
])
def test_stored_config_that_cannot_be_read_as_trained_is_an_error_naming_the_key(tmp_path, edit, message):
    workdir = tmp_path / "run"
    workdir.mkdir()
    with open(os.path.join(FIXTURES, "config_v1_base.json")) as f:
        stored = json.load(f)
    edit(stored)
    (workdir / "config.json").write_text(json.dumps(stored))
    with pytest.raises(run_record.RunConfigError, match=message):
        workdir_lib.load_workdir_config(str(workdir))


def test_corrupt_config_json_names_the_file(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text('{"seed": 0, "data": {"na')
    with pytest.raises(run_record.RunConfigError, match=r"config\.json: not valid JSON"):
        workdir_lib.load_workdir_config(str(workdir))


# ---------------------------------------------------------------------------------------------
# Resuming with another config


def test_resume_with_a_training_key_changed_is_refused_and_writes_nothing(tmp_path):
    workdir = _stored_run(tmp_path)
    before = tree_digest(workdir)
    config = tiny_config("/data")
    config.diffusion.prediction = "v"
    config.optim.lr = 5e-4
    with pytest.raises(run_record.RunConfigError) as e:
        loop.train_and_evaluate(config, workdir)
    assert "diffusion.prediction: stored 'eps', given 'v'" in str(e.value)
    assert "optim.lr: stored 0.001, given 0.0005" in str(e.value)
    assert "another --workdir" in str(e.value)
    assert tree_digest(workdir) == before


def test_resume_with_allowed_changes_records_them_and_keeps_config_json(tmp_path):
    workdir = _stored_run(tmp_path)
    config_json = open(os.path.join(workdir, "config.json")).read()
    config = tiny_config("/data")
    config.train.steps = 8
    config.eval.num_samples = 16
    diffs = run_record.check_resume(workdir, config, run_record.load(workdir))
    assert diffs == [("eval.num_samples", 8, 16), ("train.steps", 4, 8)]
    run_record.append_history(workdir, diffs)
    assert open(os.path.join(workdir, "config.json")).read() == config_json
    history = run_record.read_history(workdir)
    assert [(h["key"], h["old"], h["new"]) for h in history] == diffs and all(h["time"] for h in history)
    loaded = workdir_lib.load_workdir_config(workdir)  # the run's config now: stored + history
    assert loaded.train.steps == 8 and loaded.eval.num_samples == 16
    config.train.steps = 10  # a second resume compares with the effective config
    assert run_record.check_resume(workdir, config, run_record.load(workdir)) == [("train.steps", 8, 10)]


def test_autoencoder_steps_may_grow_only_before_the_diffusion_stage_has_a_checkpoint(tmp_path):
    workdir = _stored_run(tmp_path)
    config = tiny_config("/data", ae_steps=6)
    assert run_record.check_resume(workdir, config, run_record.load(workdir), also=("autoencoder.steps",))
    with pytest.raises(run_record.RunConfigError, match="autoencoder.steps: stored 4, given 6"):
        run_record.check_resume(workdir, config, run_record.load(workdir))


def test_checkpoints_without_a_config_are_not_resumed(tmp_path):
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "ldm" / "2").mkdir(parents=True)
    with pytest.raises(run_record.RunConfigError, match="holds checkpoints but no config.json"):
        loop.train_and_evaluate(tiny_config("/data"), str(workdir))


# ---------------------------------------------------------------------------------------------
# The lock


def test_a_second_trainer_on_the_same_workdir_is_refused_naming_the_first(tmp_path):
    """Another process holds the lock: training refuses, naming its pid, and writes nothing (the
    train command prints this as its one error: line)."""
    workdir = _stored_run(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from ldm_jax.runs.run_record import WorkdirLock\n"
        f"with WorkdirLock({workdir!r}):\n print('locked', flush=True); time.sleep(120)")],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = tree_digest(workdir)
        with pytest.raises(run_record.WorkdirInUseError, match=rf"in use by another training process "
                                                               rf"\(pid {holder.pid} on .*train\.lock"):
            loop.train_and_evaluate(tiny_config("/data"), workdir)
        assert tree_digest(workdir) == before
    finally:
        holder.kill()
        holder.wait()
    with run_record.WorkdirLock(workdir):  # released when its holder died
        pass


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints and a full disk, through the real loop with a toy model


def _toy(config):
    tx = optim.make_optimizer(lr=0.05, total_steps=100)

    def init_fn(rng):
        return TrainState.create({"w": jnp.linspace(-1.0, 1.0, 3)}, tx, rng)

    def step_fn(state, batch, frozen):
        loss_of = lambda p: jnp.mean((p["w"][None, :] - jnp.mean(batch["image"], axis=(1, 2))) ** 2)  # noqa: E731
        loss, grads = jax.value_and_grad(loss_of)(state.params)
        state, info = apply_gradients(state, grads, loss, tx)
        return state, {"loss": loss, **info}

    return init_fn, step_fn


def _run_toy(config, workdir, steps, writer=True):
    init_fn, step_fn = _toy(config)
    w = MetricWriter(workdir) if writer else None
    try:
        return loop.run_stage("toy", config=config, workdir=workdir, mesh=sharding.make_mesh(), writer=w,
                              init_fn=init_fn, step_fn=step_fn, total_steps=steps, data=loop.data_config(config))
    finally:
        if w is not None:
            w.close()


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in ("toy/images_per_s", "toy/step_time_s")}
                for line in f]


@pytest.fixture(scope="module")
def toy_config(shapes_dir):
    config = tiny_config(shapes_dir)
    config.train.log_every = 1
    config.train.checkpoint_every = 2
    config.train.keep_checkpoints = 10
    return config


@pytest.fixture(scope="module")
def toy_reference(toy_config, tmp_path_factory):
    """The toy stage trained 6 steps without interruption."""
    workdir = str(tmp_path_factory.mktemp("toy_reference"))
    _run_toy(toy_config, workdir, 6)
    state = StageCheckpoints(workdir, "toy").restore_raw()[0]
    return workdir, state


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(max(os.path.getsize(path) // 2, 1) - 1)


def _largest_file(folder):
    files = [os.path.join(r, n) for r, _, ns in os.walk(folder) for n in ns if n != checkpoint_lib.MANIFEST]
    return max(files, key=os.path.getsize)


def test_a_truncated_latest_checkpoint_is_set_aside_and_the_run_resumes_exactly(toy_config, toy_reference, tmp_path,
                                                                                 caplog):
    reference, ref_state = toy_reference
    workdir = str(tmp_path)
    _run_toy(toy_config, workdir, 4)
    damaged = _largest_file(os.path.join(workdir, "checkpoints", "toy", "4"))
    _truncate(damaged)
    with caplog.at_level(logging.WARNING, logger="ldm_jax.train"):
        _run_toy(toy_config, workdir, 6)
    assert any(damaged in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)
    folder = os.path.join(workdir, "checkpoints", "toy")
    assert os.path.isdir(os.path.join(folder, "4.damaged"))  # kept, not deleted
    state = StageCheckpoints(workdir, "toy").restore_raw()[0]
    for a, b in zip(jax.tree.leaves(ref_state), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert _rows(workdir) == _rows(reference)  # steps 3-4 logged once, as in the uninterrupted run


def test_readers_name_the_damaged_file_and_the_other_steps(toy_config, toy_reference, tmp_path):
    reference, _ = toy_reference
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    missing = _largest_file(os.path.join(workdir, "checkpoints", "toy", "6"))
    os.remove(missing)
    with pytest.raises(DamagedCheckpointError, match=rf"{missing} is missing; saved toy steps: \[2, 4, 6\]"):
        workdir_lib.restore_stage(workdir, "toy", sharding.make_mesh())
    state, _ = workdir_lib.restore_stage(workdir, "toy", sharding.make_mesh(), step=4)  # the others still read
    assert int(state["step"]) == 4


def test_no_complete_checkpoint_left_is_an_error_that_moves_nothing(toy_config, toy_reference, tmp_path):
    reference, _ = toy_reference
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    for step in (2, 4, 6):
        _truncate(_largest_file(os.path.join(workdir, "checkpoints", "toy", str(step))))
    before = tree_digest(workdir)
    with pytest.raises(DamagedCheckpointError, match="no complete checkpoint is left: .*Nothing was changed"):
        _run_toy(toy_config, workdir, 8, writer=False)
    assert tree_digest(workdir) == before


def test_disk_full_while_saving_keeps_the_previous_checkpoint(toy_config, toy_reference, tmp_path, monkeypatch):
    """A save that fails half-way (the file system raises ENOSPC after orbax has started writing
    the step) stops the run with an error naming the folder and the last complete step."""
    workdir = str(tmp_path)
    real_save = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        if step == 4:
            os.makedirs(os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp-1"), exist_ok=True)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    with pytest.raises(CheckpointSaveError, match=r"could not save checkpoint step 4 to .*toy: No space left on "
                                                  r"device; the last complete checkpoint is step 2"):
        _run_toy(toy_config, workdir, 6)
    monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
    _run_toy(toy_config, workdir, 6)  # space again: resumes from step 2 and finishes
    reference, ref_state = toy_reference
    state = StageCheckpoints(workdir, "toy").restore_raw()[0]
    for a, b in zip(jax.tree.leaves(ref_state), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert _rows(workdir) == _rows(reference)
    assert not [n for n in os.listdir(os.path.join(workdir, "checkpoints", "toy")) if "tmp" in n]
