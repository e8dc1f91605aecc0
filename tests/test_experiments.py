"""Ablation sweeps (ldm_jax.experiments): the shipped sweep files expand and validate, names and
commands are exact, and `run` on a 2-point micro sweep creates, skips, resumes and reports."""
import csv
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap

import pytest

from ldm_jax import experiments as ex
from ldm_jax.experiments import report as report_lib
from ldm_jax.experiments import runner
from tests.shared_runs import own_copy
from tests.sizes import SMALL_SHAPES
from tests.training.tiny import ROOT, cheap_compilation_env

SWEEPS = ("objective", "schedule", "sampler", "prediction", "guidance", "process")


def _env() -> dict:
    """The environment of the experiments command and the train / evaluate commands it runs: the
    checkout importable, and the tests' cheap compilation (tests/training/tiny.py)."""
    return cheap_compilation_env(dict(os.environ, PYTHONPATH=ROOT))


# ---------------------------------------------------------------------------------------------
# Declaring sweeps


def test_product_and_zip():
    assert ex.product({"a": [1, 2], "b": ["x", "y"]}) == [
        {"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]
    assert ex.zip_({"a": [1, 2], "b": ["x", "y"]}) == [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]
    assert ex.cross(ex.zip_({"a": [1, 2]}), ex.product({"seed": [0, 1]})) == [
        {"a": 1, "seed": 0}, {"a": 1, "seed": 1}, {"a": 2, "seed": 0}, {"a": 2, "seed": 1}]
    with pytest.raises(ValueError, match="one length"):
        ex.zip_({"a": [1, 2], "b": ["x"]})
    with pytest.raises(ValueError, match="non-empty list"):
        ex.product({"a": "xy"})
    with pytest.raises(ValueError, match="both sides set"):
        ex.cross([{"a": 1}], [{"a": 2}])
    with pytest.raises(ValueError, match="points repeat"):
        ex.Sweep(points=[{"a": 1}, {"a": 1}], metrics=["bpd"])


def test_names_are_stable_and_safe():
    assert ex.point_name({"diffusion.schedule": "cosine", "evaluate.steps": 20}) == "schedule=cosine,steps=20"
    # the last key part unless two keys share it
    assert ex.name_of({"unet.dropout": 0.1, "autoencoder.dropout": 0.0}, "base") == \
        "unet.dropout=0.1,autoencoder.dropout=0.0"
    assert ex.name_of({"unet.block_out_channels": (32, 64)}, "base") == "block_out_channels=32-64"
    assert ex.name_of({"autoencoder.source": "workdir:/a b/c"}, "base") == "source=workdir__a_b_c"
    assert ex.name_of({}, "base") == "base"
    long = ex.name_of({f"k{i}": "v" * 20 for i in range(10)}, "base")
    assert len(long) <= 150 and long == ex.name_of({f"k{i}": "v" * 20 for i in range(10)}, "base")
    assert ex.format_value(("ldm",)) == '("ldm",)' and ex.format_value((32, 64)) == "(32, 64)"
    assert ex.format_value(1e-4) == "0.0001" and ex.format_value(True) == "True" and ex.format_value("x") == "x"


@pytest.mark.parametrize("name", SWEEPS)
def test_shipped_sweeps_expand_and_validate(name, tmp_path):
    """Each experiments/<name>.py imports without side effects, states its question and cost, and
    every point's config loads and validates (plan() checks them all)."""
    path = os.path.join(ROOT, "experiments", f"{name}.py")
    experiment = ex.load_experiment(path)
    assert "cost" in experiment.question and "Expected" in experiment.question
    jobs = runner.plan(experiment, str(tmp_path / name))
    points = [ev.point for job in jobs for ev in job.evaluations]
    assert len(points) == len(experiment.sweep.points) >= 3
    assert not os.listdir(tmp_path) if os.path.exists(tmp_path) else True  # planning writes nothing
    if experiment.sweep.share_autoencoder:
        assert jobs[0].name == runner.AUTOENCODER_RUN and all(j.after == jobs[0].name for j in jobs[1:])
    lines = runner.dry_run(jobs)
    assert len(lines) == len(jobs) + len(points)


def test_evaluate_flags_match_the_cli():
    """The evaluate flags a sweep may set are flags python -m ldm_jax.evaluate defines."""
    with open(os.path.join(ROOT, "ldm_jax", "evaluate.py")) as f:
        defined = set(re.findall(r'flags\.DEFINE_\w+\(\s*"(\w+)"', f.read()))
    assert set(runner.EVALUATE_FLAGS) <= defined, set(runner.EVALUATE_FLAGS) - defined
    assert set(runner.SAMPLER_FLAGS) <= set(runner.EVALUATE_FLAGS)


def write_experiment(folder, body: str, base: str, doc="Micro sweep. Expected cost: seconds."):
    path = os.path.join(folder, "micro.py")
    with open(path, "w") as f:
        f.write(f'"""{doc}"""\nfrom ldm_jax.experiments import Sweep, product, zip_\n\nBASE = {base!r}\n\n'
                + textwrap.dedent(body))
    return path


def test_sample_free_metrics_are_computed_once_per_run(tmp_path, monkeypatch):
    """Points of one run that differ only in sampler flags share their bpd / ode_bpd (computed at
    the first, copied with a `reused` note); another seed or step computes them again."""
    calls = []

    def fake_execute(command, log_path, say):
        metrics = command[command.index("--metrics") + 1].split(",")
        calls.append(metrics)
        for m in metrics:
            os.makedirs(tmp_path / "run" / "eval" / "10", exist_ok=True)
            with open(tmp_path / "run" / "eval" / "10" / f"{m}.json", "w") as f:
                json.dump({"call": len(calls), "metric": m}, f)

    monkeypatch.setattr(runner, "_execute", fake_execute)
    monkeypatch.setattr(runner, "is_trained", lambda job: True)
    flags = [{"steps": 5}, {"steps": 10, "guidance": 3.0}, {"steps": 20, "seed": 1}, {"steps": 20}]
    evaluations = [runner.Evaluation({"evaluate.steps": i}, f"e{i}", f) for i, f in enumerate(flags)]
    job = runner.Job("run", str(tmp_path / "run"), "configs/base.py", {}, {"ldm": 10},
                     ["prompt_accuracy", "ode_bpd", "bpd"], evaluations)
    written = runner.run_job(job, say=lambda message: None)
    assert calls == [["prompt_accuracy", "ode_bpd", "bpd"], ["prompt_accuracy"],
                     ["prompt_accuracy", "ode_bpd", "bpd"], ["prompt_accuracy"]]
    records = [json.load(open(p)) for p in written]
    assert [r["metrics"]["prompt_accuracy"]["call"] for r in records] == [1, 2, 3, 4]
    assert [r["metrics"]["ode_bpd"]["call"] for r in records] == [1, 1, 3, 1]
    assert [r["metrics"]["bpd"]["call"] for r in records] == [1, 1, 3, 1]
    assert [r.get("reused") for r in records] == [None, {"ode_bpd": "e0.json", "bpd": "e0.json"}, None,
                                                  {"ode_bpd": "e0.json", "bpd": "e0.json"}]
    # a rerun skips every point, and a point added later still reuses the earlier result files
    calls.clear()
    job.evaluations.append(runner.Evaluation({"evaluate.steps": 9}, "e9", {"steps": 50}))
    written = runner.run_job(job, say=lambda message: None)
    assert calls == [["prompt_accuracy"]] and json.load(open(written[0]))["metrics"]["ode_bpd"]["call"] == 1


def test_dry_run_prints_the_exact_commands(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(os.path.join(ROOT, "configs", "base.py"), tmp_path / "base.py")
    path = write_experiment(str(tmp_path), """
        def sweep():
            return Sweep(points=product({"diffusion.schedule": ["linear", "cosine"], "evaluate.steps": [10, 20]}),
                         metrics=["bpd", "prompt_accuracy"], common={"train.steps": 7},
                         evaluate={"splits": ("test", "heldout")}, share_autoencoder=True)
        """, base="base.py")
    out = subprocess.run([sys.executable, "-m", "ldm_jax.experiments", "run", path, "--root", "runs/micro",
                          "--dry_run", "--set", "optim.lr=0.002"], capture_output=True, text=True, cwd=tmp_path,
                         env=_env())
    assert out.returncode == 0, out.stderr
    train = "python -m ldm_jax.train --config base.py --workdir"
    common = "--config.train.steps=7 --config.optim.lr=0.002"
    ldm = "'--config.stages=(\"ldm\",)' --config.autoencoder.source=workdir:runs/micro/_autoencoder"
    evaluate = "python -m ldm_jax.evaluate --workdir {} --metrics bpd,prompt_accuracy --splits=test,heldout --steps={}"
    expected = [
        f"{train} runs/micro/_autoencoder {common} '--config.stages=(\"autoencoder\",)'",
        f"{train} runs/micro/schedule=linear {common} --config.diffusion.schedule=linear {ldm}",
        evaluate.format("runs/micro/schedule=linear", 10),
        evaluate.format("runs/micro/schedule=linear", 20),
        f"{train} runs/micro/schedule=cosine {common} --config.diffusion.schedule=cosine {ldm}",
        evaluate.format("runs/micro/schedule=cosine", 10),
        evaluate.format("runs/micro/schedule=cosine", 20),
    ]
    assert out.stdout.splitlines() == expected
    assert not os.path.exists(tmp_path / "runs")  # a dry run creates nothing
    # and the printed commands parse back into the very arguments the runner executes
    jobs = runner.plan(ex.load_experiment(path), "runs/micro", {"optim.lr": 0.002})
    assert shlex.split(expected[1]) == jobs[1].train_command()


@pytest.mark.parametrize("body, message", [
    ('def sweep():\n    return Sweep(points=[{"diffusion.schedul": "cosine"}], metrics=["bpd"])\n',
     "unknown key diffusion.schedul"),
    ('def sweep():\n    return Sweep(points=[{"diffusion.schedule": "cosin"}], metrics=["bpd"])\n', "cosin"),
    ('def sweep():\n    return Sweep(points=[{"evaluate.stepz": 3}], metrics=["bpd"])\n', "unknown evaluate flags"),
    ('def sweep():\n    return Sweep(points=[{"seed": 1}], metrics=["bdp"])\n', "unknown metrics"),
], ids=["unknown-key", "unknown-schedule", "unknown-evaluate-flag", "unknown-metric"])
def test_bad_sweeps_fail_before_anything_runs(tmp_path, body, message):
    path = write_experiment(str(tmp_path), body, base=os.path.join(ROOT, "configs", "base.py"))
    out = subprocess.run([sys.executable, "-m", "ldm_jax.experiments", "run", path, "--root", str(tmp_path / "r")],
                         capture_output=True, text=True, env=_env())
    assert out.returncode == 1 and out.stderr.startswith("error:") and message in out.stderr, out.stderr
    assert not os.path.exists(tmp_path / "r")


# ---------------------------------------------------------------------------------------------
# Reporting (synthetic results: the grouping, the CSV and the plot)


def fake_root(tmp_path, points, values):
    root = tmp_path / "root"
    root.mkdir()
    exp = write_experiment(str(tmp_path), "def sweep():\n    return Sweep(points=%r, metrics=['prompt_accuracy'])\n"
                           % points, base=os.path.join(ROOT, "configs", "base.py"), doc="Guidance? Expected cost: 0.")
    meta = {"name": "micro", "path": exp, "question": "Guidance? Expected cost: 0.",
            "base": os.path.join(ROOT, "configs", "base.py"), "metrics": ["prompt_accuracy"], "columns": None,
            "x": None, "xscale": "linear", "common": {}, "evaluate": {}, "sets": {}, "points": points}
    (root / "experiment.json").write_text(json.dumps(meta))
    for point, value in zip(points, values):
        folder = root / ex.name_of(ex.train_overrides(point), "base") / "experiment"
        folder.mkdir(parents=True, exist_ok=True)
        record = {"point": ex.point_name(point), "overrides": point, "step": 5,
                  "metrics": {"prompt_accuracy": {"result": {"test": {"ok": value, "n": 8}}}}}
        (folder / f"{ex.name_of(ex.eval_overrides(point), 'default')}.json").write_text(json.dumps(record))
    return root


def test_report_groups_seeds_and_plots_the_numeric_axis(tmp_path):
    points = ex.product({"seed": [0, 1], "evaluate.guidance": [1.0, 3.0]})
    root = fake_root(tmp_path, points, [0.5, 0.7, 0.6, 0.9])
    paths = report_lib.report(str(root), str(tmp_path / "out"))
    assert sorted(paths) == ["csv", "md", "png"] and os.path.getsize(paths["png"]) > 1000
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [r["point"] for r in rows] == ["guidance=1.0", "guidance=3.0"]
    assert [r["evaluate.guidance"] for r in rows] == ["1.0", "3.0"] and {r["seeds"] for r in rows} == {"2"}
    assert float(rows[0]["prompt_accuracy/test/ok"]) == pytest.approx(0.55)
    assert float(rows[1]["prompt_accuracy/test/ok"]) == pytest.approx(0.8)
    assert float(rows[1]["prompt_accuracy/test/ok_std"]) == pytest.approx(0.1414214, rel=1e-5)
    text = open(paths["md"]).read()
    assert "| `3.0` | 2 | 0.8 ± 0.14 |" in text and "4 of 4 points complete" in text and "micro.png" in text


def test_report_of_a_partial_categorical_sweep(tmp_path):
    points = ex.zip_({"diffusion.objective": ["simple", "vlb", "hybrid"]})
    root = fake_root(tmp_path, points[:2], [0.25, 0.5])
    (root / "experiment.json").write_text(json.dumps({**json.loads((root / "experiment.json").read_text()),
                                                      "points": points}))
    paths = report_lib.report(str(root))
    assert sorted(paths) == ["csv", "md"]  # no numeric axis: no plot
    text = open(paths["md"]).read()
    assert "2 of 3 points complete" in text and "| `simple` | 1 | 0.25 |" in text and "(not written yet)" in text



def test_report_marks_keys_a_point_leaves_at_the_base_value(tmp_path):
    points = ex.cross(ex.zip_({"diffusion.schedule": ["linear", "cosine"]}), [{}, {"evaluate.spacing": "leading"}])
    root = fake_root(tmp_path, points, [0.1, 0.2, 0.3, 0.4])
    paths = report_lib.report(str(root))
    text = open(paths["md"]).read()
    assert "| `cosine` | (base) | 1 | 0.3 |" in text and "| `cosine` | `leading` | 1 | 0.4 |" in text
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [r["evaluate.spacing"] for r in rows] == ["(base)", "'leading'", "(base)", "'leading'"]

# ---------------------------------------------------------------------------------------------
# A real micro sweep: two seeds of a tiny pixel-space model, a few steps each, through the CLIs


MICRO_CONFIG = """
import sys
sys.path.insert(0, {root!r})
from ldm_jax import config as config_lib
from tests.training.test_stage_paths import TINY_UNET, small


def get_config():
    config = small(config_lib.load_config({root!r} + "/configs/pixel_ddpm.py"))
    config.data.update(data_dir={data_dir!r}, image_size=16, batch_size=8, options={options!r})
    config.unet = dict(TINY_UNET, dropout=0.1)
    config.optim.warmup_steps = 0
    config.sampler.num_steps = 3
    config.diffusion.num_timesteps = 50
    config.train.update(steps=4, log_every=1, checkpoint_every=2, keep_checkpoints=2)
    config.eval.splits = ()  # the sweep's own evaluation (bpd) is under test, not the end-of-run one
    return config
"""


@pytest.fixture(scope="module")
def micro(shapes_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("experiment")
    with open(folder / "micro_config.py", "w") as f:
        f.write(MICRO_CONFIG.format(root=ROOT, data_dir=shapes_dir, options=dict(SMALL_SHAPES)))
    path = write_experiment(str(folder), """
        def sweep():
            return Sweep(points=product({"seed": [0, 1]}), metrics=["bpd"],
                         evaluate={"bpd_examples": 4, "bpd_batch_size": 4, "splits": ("test",)})
        """, base=str(folder / "micro_config.py"))
    root = str(folder / "runs")

    def run(root):
        """`run` of the sweep into `root` (the module's, which the tests only read, or a copy)."""
        return subprocess.run([sys.executable, "-m", "ldm_jax.experiments", "run", path, "--root", root],
                              capture_output=True, text=True, env=_env(), cwd=folder)

    first = run(root)
    assert first.returncode == 0, first.stdout + first.stderr
    return root, run, first


def result_files(root):
    return sorted(glob.glob(os.path.join(root, "*", "experiment", "default.json")))


@pytest.mark.slow
def test_micro_sweep_creates_a_workdir_per_point(micro):
    root, _, first = micro
    assert sorted(os.listdir(root)) == ["experiment.json", "seed=0", "seed=1"]
    results = [json.load(open(p)) for p in result_files(root)]
    assert [r["point"] for r in results] == ["seed=0", "seed=1"] and {r["step"] for r in results} == {4}
    totals = [r["metrics"]["bpd"]["result"]["total"] for r in results]
    assert all(t > 0 for t in totals) and totals[0] != totals[1]  # two seeds, two models
    for r in results:
        assert r["metrics"]["bpd"]["result"]["num_examples"] == 4
    spec = json.load(open(os.path.join(root, "seed=1", "experiment", "spec.json")))
    assert spec["overrides"] == {"seed": "1"}
    # Pixel-space sampling clips the predicted x_0 to [-1, 1] (without it, abar_T ~ 1e-9 of the
    # cosine schedule turned every sample into saturated noise).
    from ldm_jax.pipeline import LatentDiffusionPipeline

    assert LatentDiffusionPipeline.from_workdir(os.path.join(root, "seed=0")).clip_x0 == 1.0
    assert "2 training runs, 2 points" in first.stdout and "all 2 runs complete" in first.stdout


@pytest.mark.slow
def test_micro_sweep_skips_complete_points_and_resumes_interrupted_ones(micro, tmp_path):
    root, run, _ = micro
    root = own_copy(root, tmp_path)  # reruns into, and deletes from, a copy of the module's sweep
    stamps = {p: os.path.getmtime(p) for p in result_files(root)}
    again = run(root)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("trained, skipping training") == 2 and again.stdout.count("evaluated, skipping") == 2
    assert {p: os.path.getmtime(p) for p in result_files(root)} == stamps

    # Interrupt seed=1 after its step-2 checkpoint: its final checkpoint and result are gone.
    workdir = os.path.join(root, "seed=1")
    shutil.rmtree(os.path.join(workdir, "checkpoints", "ldm", "4"))
    os.remove(os.path.join(workdir, "experiment", "default.json"))
    resumed = run(root)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "seed=0: trained, skipping training" in resumed.stdout and "seed=1: training" in resumed.stdout
    assert os.path.getmtime(os.path.join(root, "seed=0", "experiment", "default.json")) == \
        stamps[os.path.join(root, "seed=0", "experiment", "default.json")]
    log = open(os.path.join(workdir, "experiment", "train.log")).read()
    assert "resum" in log.lower() and "step 2" in log.lower(), log[-2000:]
    assert json.load(open(os.path.join(workdir, "experiment", "default.json")))["step"] == 4


@pytest.mark.slow
def test_micro_sweep_report_and_mismatched_rerun(micro, tmp_path):
    root, _, _ = micro
    out = subprocess.run([sys.executable, "-m", "ldm_jax.experiments", "report", root, "--out", str(tmp_path)],
                         capture_output=True, text=True, env=_env())
    assert out.returncode == 0, out.stderr
    with open(tmp_path / "micro.csv") as f:
        rows = list(csv.DictReader(f))
    totals = [json.load(open(p))["metrics"]["bpd"]["result"]["total"] for p in result_files(root)]
    assert len(rows) == 1 and rows[0]["seeds"] == "2" and rows[0]["point"] == "base"
    assert float(rows[0]["bpd/total"]) == pytest.approx(sum(totals) / 2, rel=1e-5)
    assert float(rows[0]["bpd/total_std"]) == pytest.approx(abs(totals[0] - totals[1]) / 2 ** 0.5, rel=1e-4)
    assert "bpd/total" in (tmp_path / "micro.md").read_text()
    # the same root with other common overrides is refused, and nothing is touched
    experiment = ex.load_experiment(json.load(open(os.path.join(root, "experiment.json")))["path"])
    experiment.sweep.common = {"optim.lr": 0.5}
    with pytest.raises(ValueError, match="was trained with"):
        runner.plan(experiment, root)
