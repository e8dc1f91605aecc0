"""The training command line as a user runs it: preemption by SIGTERM, and jax.distributed over
two local processes."""
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from ldm_jax.runs.checkpoint import StageCheckpoints
from tests.training.test_loop import read_metrics
from tests.training.tiny import ROOT, cheap_compilation_env


def _config_file(tmp_path, data_dir, **body) -> str:
    """A configs/*.py-style file for the CLI that builds the tiny config, with the one-level UNet
    (the command line, not the UNet, is under test) and some overrides."""
    lines = [f"config.{k} = {v!r}" for k, v in body.items()]
    path = tmp_path / "tiny_cli_config.py"
    path.write_text("\n".join([
        "import sys",
        f"sys.path.insert(0, {ROOT!r})",
        "from tests.training.tiny import ROOT, TINY_UNET, tiny_config",
        "def get_config():",
        f"    config = tiny_config({data_dir!r})",
        "    config.unet = dict(TINY_UNET)",
        *["    " + line for line in lines],
        "    return config",
    ]))
    return str(path)


def _cli(config_path, workdir, *extra, env=None):
    """The training CLI in a subprocess, compiling cheaply (tests/training/tiny.py)."""
    cmd = [sys.executable, "-m", "ldm_jax.train", "--config", config_path, "--workdir", workdir, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=cheap_compilation_env(env or os.environ), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigterm_saves_then_exits_cleanly_and_resumes(shapes_dir, tmp_path):
    workdir = str(tmp_path / "run")
    config = _config_file(tmp_path, shapes_dir, **{"train.steps": 100_000, "train.log_every": 1,
                                                     "train.checkpoint_every": 100_000, "eval.splits": (),
                                                     "autoencoder.steps": 2})
    proc = _cli(config, workdir)
    deadline = time.time() + 400
    metrics = os.path.join(workdir, "metrics.jsonl")
    while time.time() < deadline:  # wait until the diffusion stage is stepping
        if os.path.exists(metrics) and any("ldm/loss" in line for line in open(metrics)):
            break
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    step = StageCheckpoints(workdir, "ldm").latest_step()
    assert step is not None and 1 <= step < 100_000
    # No prompt-accuracy sweep after the last step: resuming is under test.
    resumed = _cli(_config_file(tmp_path, shapes_dir, **{"train.steps": step + 2, "eval.splits": (),
                                                         "autoencoder.steps": 2}), workdir)
    out = resumed.communicate(timeout=400)[0]
    assert resumed.returncode == 0, out[-3000:]
    assert f"ldm: resumed from step {step}" in out
    assert StageCheckpoints(workdir, "ldm").latest_step() == step + 2


@pytest.mark.slow
def test_two_processes_with_two_devices_each(shapes_dir, tmp_path):
    """jax.distributed on localhost: 2 processes x 2 CPU devices train both stages as one 4-device mesh."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    config = _config_file(tmp_path, shapes_dir, **{"eval.splits": ()})  # training and checkpoints only
    workdir = str(tmp_path / "run")
    procs = [_cli(config, workdir, "--coordinator", f"localhost:{port}", "--num_processes", "2",
                  "--process_id", str(i), env=env) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for i, (p, out) in enumerate(zip(procs, outs)):
        (tmp_path / f"process_{i}.log").write_text(out)
        assert p.returncode == 0, out[-3000:]
        assert f"4 devices over 2 processes (this is process {i})" in out, out[:3000]
    assert StageCheckpoints(workdir, "autoencoder").latest_step() == 4
    assert StageCheckpoints(workdir, "ldm").latest_step() == 4
    losses = [r["ldm/loss"] for r in read_metrics(workdir) if "ldm/loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
