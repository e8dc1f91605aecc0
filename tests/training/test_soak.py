"""The random-kill soak (tools/kill_soak.py) with 2 kills: a run SIGKILLed and resumed twice,
once while a checkpoint is being written and once at a random row or moment, ends bitwise equal to an uninterrupted
one (checkpoints of both stages, metrics rows), and every restart resumed from the newest
complete checkpoint."""
import importlib.util
import os

import pytest

from tests.training.tiny import ROOT, cheap_compilation_env


def _kill_soak():
    spec = importlib.util.spec_from_file_location("kill_soak", os.path.join(ROOT, "tools", "kill_soak.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_random_kills_lose_nothing_and_change_nothing(tmp_path, shapes_dir):
    report = _kill_soak().soak(str(tmp_path), kills=2, seed=0, env=cheap_compilation_env(os.environ),
                               ae_steps=4, ldm_steps=8, data_dir=shapes_dir)
    assert report["kills"] == 2, report["events"]
    assert report["during_checkpoint_writes"] >= 1, report["events"]
    assert report["problems"] == [] and report["bitwise_equal"]
