"""python -m ldm_jax.evaluate and its library (ldm_jax/evaluation/runner.py) on tiny random
workdirs (written by tests/test_pipeline.py's make_workdir, no training): the files it writes, the
plumbing of each metric (checked against a direct computation), quality-vs-steps, and bad input.

The module's workdirs are read-only: a test that evaluates (which writes eval/<step>/ and
metrics.jsonl) evaluates its own copy (tests/shared_runs.py)."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from ldm_jax.diffusion import likelihood
from ldm_jax.evaluation import runner
from ldm_jax.evaluation import shapes as shapes_checker
from ldm_jax.evaluation.runner import EvalOptions
from tests.shared_runs import own_copy
from tests.test_pipeline import make_workdir, workdir_config
from tests.training.tiny import ROOT


def read_json(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def workdir(shapes_dir, tmp_path_factory):
    """A text-conditional shapes run at step 2 with 100 diffusion timesteps (bpd's T model calls)."""
    config = workdir_config(**{"data.data_dir": shapes_dir, "diffusion.num_timesteps": 100,
                               "eval.splits": ("test", "heldout")})
    return make_workdir(tmp_path_factory.mktemp("run"), config)


OPTIONS = dict(num_samples=6, batch_size=4, bpd_examples=5, bpd_batch_size=4, num_steps=2)


@pytest.fixture(scope="module")
def run(workdir):
    """The run with OPTIONS, shared by the tests that only read it: its pipeline is loaded, and
    its programs compiled, once."""
    return runner.Run(workdir, EvalOptions(**OPTIONS))


def record_generate(monkeypatch) -> list:
    """Run.generate as it is, recording (conditions, images) of each call in the returned list."""
    calls, generate = [], runner.Run.generate

    def recorded(self, conditions, **kw):
        images = generate(self, conditions, **kw)
        calls.append((list(conditions), images))
        return images

    monkeypatch.setattr(runner.Run, "generate", recorded)
    return calls


@pytest.fixture(scope="module")
def evaluated(workdir, tmp_path_factory):
    """bpd and prompt_accuracy evaluated on a copy of the run: (that copy, the results, the
    (captions, images) of each sampling call)."""
    copy = own_copy(workdir, tmp_path_factory.mktemp("evaluated"))
    with pytest.MonkeyPatch.context() as mp:
        generated = record_generate(mp)
        results = runner.evaluate(copy, ["bpd", "prompt_accuracy"], EvalOptions(**OPTIONS))
    return copy, results, generated


def test_writes_a_json_per_metric_a_summary_and_scalars(evaluated):
    workdir, evaluated, _ = evaluated
    folder = os.path.join(workdir, "eval", "2")
    for name in ("bpd", "prompt_accuracy"):
        record = read_json(os.path.join(folder, f"{name}.json"))
        assert record["metric"] == name and record["step"] == 2 and record["ema"] is True
        assert record["wall_s"] > 0 and record == json.loads(json.dumps(evaluated[name]))
    assert read_json(os.path.join(folder, "prompt_accuracy.json"))["sampler"] == dict(
        sampler="dpm_solver++", num_steps=2, guidance=2.0, spacing="trailing")  # the run's, but our step count
    with open(os.path.join(folder, "summary.md")) as f:
        summary = f.read()
    assert "| bpd/total |" in summary and "| prompt_accuracy/heldout/ok |" in summary
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    (row,) = [r for r in logged if "eval/bpd/total" in r]
    assert row["step"] == 2 and row["eval/bpd/total"] == pytest.approx(evaluated["bpd"]["result"]["total"])
    assert "eval/prompt_accuracy/test/colour_ok" in logged[-1] or any(
        "eval/prompt_accuracy/test/colour_ok" in r for r in logged)


def test_bpd_is_the_bound_of_the_held_out_latents(run, evaluated):
    """The runner's number equals likelihood.bits_per_dim called directly on the same examples'
    scaled posterior means, captions and noise, and its parts add up."""
    r = evaluated[1]["bpd"]["result"]
    assert r["unit"] == "bits/latent-dim" and r["decoder_type"] == "continuous" and r["num_examples"] == 5
    assert r["total"] == pytest.approx(r["prior"] + r["decoder"] + r["diffusion"], rel=1e-5)
    assert len(r["terms_mean"]) == 100
    assert sum(r["terms_mean"][1:]) == pytest.approx(r["diffusion"], rel=1e-4)

    data = run.examples("test", 5)
    pipe = run.pipe
    idx = np.arange(4)  # the first batch
    context = pipe._context(pipe.params, runner._conditions_of(run, data, idx))
    direct = likelihood.bits_per_dim(runner.conditional_model(pipe, context), pipe.noise_schedule,
                                     pipe.encode(data["image"][idx]),
                                     jax.random.fold_in(jax.random.PRNGKey(0), 0), decoder="continuous")
    np.testing.assert_allclose(r["per_example_total"][:4], np.asarray(direct["total"]), rtol=2e-5)
    v = np.asarray(r["per_example_total"])
    assert r["total"] == pytest.approx(v.mean(), rel=1e-6)
    assert r["total_ci95"] == pytest.approx(1.959964 * v.std(ddof=1) / np.sqrt(5), rel=1e-5)


def test_prompt_accuracy_judges_a_sample_per_caption_of_each_split(run, evaluated):
    """Each split's numbers are the checker's verdicts, averaged, on one sample for each of the
    split's first 6 captions (in Run.examples' order)."""
    _, results, generated = evaluated
    r = results["prompt_accuracy"]["result"]
    assert set(r) == {"test", "heldout"} and len(generated) == 2  # one sampling call per split
    for split, (captions, images) in zip(("test", "heldout"), generated):
        assert captions == run.examples(split, 6)["caption"] and images.shape == (6, 32, 32, 3)
        verdicts = [shapes_checker.check(image, caption) for image, caption in zip(images, captions)]
        assert r[split] == {**{k: np.mean([v[k] for v in verdicts]) for k in verdicts[0]}, "num_samples": 6}


def test_prompt_accuracy_pairs_each_caption_with_its_own_image(run, monkeypatch):
    """With a "model" that returns the dataset's own image for each caption, the checker's score is
    the dataset's (all right); with one that returns the images of the wrong captions, it falls."""
    truth = {}
    for split in run.splits:
        data = run.examples(split, 6)
        truth.update(zip(data["caption"], data["image"]))
    real = shapes_checker.accuracy(np.stack(list(truth.values())), list(truth))["ok"]
    assert real == 1.0

    monkeypatch.setattr(runner.Run, "generate", lambda self, captions, **kw: np.stack([truth[c] for c in captions]))
    assert all(v["ok"] == 1.0 for v in runner.compute_prompt_accuracy(run).values())
    monkeypatch.setattr(runner.Run, "generate",
                        lambda self, captions, **kw: np.stack([truth[c] for c in captions[1:] + captions[:1]]))
    assert all(v["ok"] < 0.5 for v in runner.compute_prompt_accuracy(run).values())


def test_generated_images_are_the_pipelines(workdir, run):
    """Run.generate pads to the compiled batch and seeds image i with seed + i, as the pipeline."""
    captions = ["a red circle on the left", "a blue square at the top", "a green triangle on the right",
                "a red square at the bottom", "a blue circle in the centre"]
    images = run.generate(captions)  # batches of 4: [4, 1 + 3 padding]
    pipe = run.pipe
    direct = pipe.text_to_image(captions[:4], num_steps=2, seed=0)
    np.testing.assert_array_equal(images[:4], direct)
    assert images.shape == (5, 32, 32, 3)
    # --spacing: the same weights visiting other timesteps (the experiments' evaluate.spacing).
    leading = runner.Run(workdir, EvalOptions(**OPTIONS, spacing="leading"))
    assert leading.sampler_settings()["spacing"] == "leading" and leading.pipe.schedule["spacing"] == "leading"
    np.testing.assert_array_equal(leading.generate(captions[:4]),
                                  pipe.with_spacing("leading").text_to_image(captions[:4], num_steps=2, seed=0))


def test_steps_sweep_writes_a_table_and_a_plot(workdir, tmp_path, monkeypatch):
    workdir = own_copy(workdir, tmp_path)
    seen = []

    def fake_generate(self, captions, **kw):
        seen.append(self.sampler_settings())
        rng = np.random.default_rng(len(seen))
        return rng.integers(0, 256, (len(captions), 32, 32, 3), dtype=np.uint8)

    monkeypatch.setattr(runner.Run, "generate", fake_generate)
    table = runner.steps_sweep(workdir, "prompt_accuracy", ["ddim", "euler"], [1, 3], EvalOptions(**OPTIONS))
    assert [(s["sampler"], s["num_steps"]) for s in seen] == [("ddim", 1), ("ddim", 3), ("euler", 1), ("euler", 3)]
    assert set(table) == {"ddim", "euler"} and all(set(row) == {1, 3} for row in table.values())
    stem = os.path.join(workdir, "eval", "2", "steps_prompt_accuracy")
    record = read_json(stem + ".json")
    assert record["table"]["ddim"]["3"] == table["ddim"][3] and record["split"] == "test"
    with open(stem + ".md") as f:
        md = f.read()
    assert "| sampler | 1 | 3 |" in md and md.count("\n| ddim |") == 1
    with open(stem + ".png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def real_images_of(run, split):
    """A stand-in for Run.generate: the split's own images for its conditions (the examples are
    drawn in a fixed order, so the i-th condition gets the i-th example's image)."""
    return lambda self, conditions, **kw: run.examples(split, len(conditions))["image"]


class MeanColourFeatures:
    """A stand-in for the Inception network (tested against pytorch-fid in
    tests/models/test_inception.py): channel means and their squares, [N, 6]."""

    def __init__(self, path):
        self.path = path

    def features(self, images):
        m = np.asarray(images, np.float64).mean(axis=(1, 2)) / 255
        return np.concatenate([m, m ** 2], axis=1)


def test_fid_and_recon_through_evaluate(workdir, run, tmp_path, monkeypatch):
    """FID of a split's real images against themselves is 0 and against the other split's is
    not; recon reports, for each split, the PSNR of the pipeline's own reconstructions of its
    images and the std of their scaled latents."""
    from ldm_jax.evaluation import fid as fid_lib

    copy = own_copy(workdir, tmp_path)
    weights = tmp_path / "pt_inception.npz"
    weights.write_bytes(b"")
    monkeypatch.setattr(fid_lib, "InceptionFeatures", MeanColourFeatures)
    monkeypatch.setattr(runner.Run, "generate", real_images_of(run, "test"))
    results = runner.evaluate(copy, ["fid", "recon"], EvalOptions(**OPTIONS, inception_weights=str(weights)))
    fid = results["fid"]["result"]
    assert fid["test"]["fid"] == pytest.approx(0.0, abs=1e-3) and fid["test"]["num_samples"] == 6
    assert fid["heldout"]["fid"] > 1e-4  # the test images scored as samples for the held-out captions
    recon = results["recon"]["result"]
    for split in ("test", "heldout"):
        images = run.examples(split, 6)["image"]
        # The pipeline's encode (the posterior's mode, scaled) and decode, in batches of 4 (the
        # batch test_bpd's encode compiled): images 0-3, then 2-5.
        latents = np.concatenate([run.pipe.encode(images[:4]), run.pipe.encode(images[2:])[2:]])
        recons = np.concatenate([run.pipe.decode(latents[:4]), run.pipe.decode(latents[2:])[2:]])
        mse = ((recons.astype(np.float64) - images) ** 2).mean(axis=(1, 2, 3))  # none is exact here
        assert recon[split]["num_images"] == 6
        assert recon[split]["psnr"] == pytest.approx(np.mean(10 * np.log10(255.0 ** 2 / mse)), rel=1e-3)
        assert recon[split]["latent_std"] == pytest.approx(latents.std(), rel=1e-4)
    assert os.path.exists(os.path.join(copy, "eval", "2", "fid.json"))


@pytest.fixture(scope="module")
def digits_workdir(tmp_path_factory):
    """A digits run, with its dataset built here (the first reader would build it otherwise)."""
    from ldm_jax.data import pipeline as data_pipeline
    from ldm_jax.training.loop import data_config

    data_dir = str(tmp_path_factory.mktemp("digits_data"))
    config = workdir_config(**{"data.data_dir": data_dir, "data.name": "digits", "data.options": {},
                               "eval.splits": ("test",)})
    data_pipeline.load_source(data_config(config, split="test"))
    return make_workdir(tmp_path_factory.mktemp("digits_run"), config)


def test_digit_metrics_score_real_digits_as_the_classifier_does(digits_workdir, tmp_path, monkeypatch):
    from ldm_jax.evaluation import digits

    digits_workdir = own_copy(digits_workdir, tmp_path)
    monkeypatch.setenv("LDM_JAX_CACHE", str(tmp_path / "cache"))
    run = runner.Run(digits_workdir, EvalOptions(**OPTIONS))
    monkeypatch.setattr(runner.Run, "generate", real_images_of(run, "test"))
    results = runner.evaluate(digits_workdir, ["digit_accuracy", "digits_fid"], EvalOptions(**OPTIONS))
    acc = results["digit_accuracy"]["result"]["test"]
    data = run.examples("test", 6)
    classifier = digits.load_classifier(32)
    truth = [digits.parse_caption(c) for c in data["caption"]]
    assert acc["accuracy"] == pytest.approx(np.mean(np.asarray(classifier.predict(data["image"])) == truth))
    assert acc["classifier_test_accuracy"] == pytest.approx(classifier.test_accuracy) and acc["num_samples"] == 6
    assert results["digits_fid"]["result"]["test"]["digits_fid"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(runner.MetricUnavailable, match="prompt_accuracy scores text-conditional models of the "
                       "shapes dataset; this run is 'text'-conditional on 'digits'"):
        runner.evaluate(digits_workdir, ["prompt_accuracy"], EvalOptions(**OPTIONS))


# ---------------------------------------------------------------------------------------------
# Bad input


def test_unknown_and_unavailable_metrics_fail_before_computing(workdir):
    with pytest.raises(ValueError, match=r"unknown metric\(s\) \['psnr'\]; allowed: bpd, prompt_accuracy"):
        runner.evaluate(workdir, ["psnr"], EvalOptions(**OPTIONS))
    with pytest.raises(runner.MetricUnavailable, match="digit_accuracy: digit metrics score models of the digits "
                       "dataset; this run's dataset is 'shapes'"):
        runner.evaluate(workdir, ["bpd", "digit_accuracy"], EvalOptions(**OPTIONS))
    with pytest.raises(runner.MetricUnavailable, match="clip_score needs a local CLIP checkpoint folder"):
        runner.evaluate(workdir, ["clip_score"], EvalOptions(**OPTIONS))
    with pytest.raises(runner.MetricUnavailable, match="fid: .*--inception_weights"):
        runner.evaluate(workdir, ["fid"], EvalOptions(**OPTIONS))
    with pytest.raises(runner.MetricUnavailable, match="--clip_model /nowhere: no such folder"):
        runner.evaluate(workdir, ["clip_score"], EvalOptions(**OPTIONS, clip_model="/nowhere"))


def test_workdir_without_a_checkpoint_or_that_step(tmp_path, workdir):
    with pytest.raises(FileNotFoundError, match="has no diffusion \\(ldm\\) checkpoint to evaluate"):
        runner.evaluate(str(tmp_path), ["bpd"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        runner.evaluate(str(tmp_path / "missing"), ["bpd"])
    with pytest.raises(ValueError, match=r"no ldm checkpoint at step 7; it has \[2\]"):
        runner.evaluate(workdir, ["bpd"], EvalOptions(step=7))


def test_cli_reports_bad_input_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "ldm_jax.evaluate", "--workdir", str(tmp_path), "--metrics", "bpd"],
                         capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("error: workdir ")
    assert "has no diffusion (ldm) checkpoint" in out.stderr


# ---------------------------------------------------------------------------------------------
# shapes_fid and diversity (feature networks trained on the real data, cached under LDM_JAX_CACHE:
# tests/conftest.py's session cache, so the shapes feature network is trained once per session)


def images_by_condition(run, splits):
    """A stand-in for Run.generate: for each condition in turn, the next real image of it in its
    split's fixed-seed order (the order `repeated_conditions` takes real images in), so that a
    caption's K "samples" are the very K real images diversity compares them with."""
    pools = {}
    for split in splits:
        data = run.examples(split, len(run.source(split)))
        for condition, image in zip(runner._sampling_conditions(run, data), data["image"]):
            pools.setdefault(condition, []).append(image)

    def generate(self, conditions, **kw):
        used = {}
        out = []
        for c in conditions:
            out.append(pools[c][used.get(c, 0)])
            used[c] = used.get(c, 0) + 1
        return np.stack(out)

    return generate


def test_shapes_fid_and_diversity_through_evaluate(workdir, tmp_path, monkeypatch):
    """With the real images of each caption in place of samples, diversity equals the data's
    (ratio 1) and shapes_fid is the direct computation on the same images; the metrics' files,
    scalars and headline are written as every metric's."""
    from ldm_jax.evaluation import shapes_features

    workdir = own_copy(workdir, tmp_path)
    options = EvalOptions(**dict(OPTIONS, num_samples=8, diversity_samples=3))
    run = runner.Run(workdir, options)
    fake = images_by_condition(run, run.splits)
    monkeypatch.setattr(runner.Run, "generate", fake)
    results = runner.evaluate(workdir, ["shapes_fid", "diversity"], options)
    classifier = shapes_features.load_classifier(32)
    for split in ("test", "heldout"):
        data = run.examples(split, 8)
        samples = fake(run, data["caption"])
        fid = results["shapes_fid"]["result"][split]
        assert fid["shapes_fid"] == pytest.approx(shapes_features.shapes_fid(samples, data["image"], classifier))
        assert fid["num_samples"] == 8 and fid["classifier_test_accuracy"] == classifier.test_accuracy
        div = results["diversity"]["result"][split]
        assert div["num_captions"] == 2 and div["samples_per_caption"] == 3
        assert div["diversity"] == pytest.approx(div["real_diversity"]) and div["real_diversity"] > 0
        assert div["diversity_ratio"] == pytest.approx(1.0)
    assert results["shapes_fid"]["result"]["test"]["shapes_fid"] > 0  # different images of the same captions
    with open(os.path.join(workdir, "eval", "2", "summary.md")) as f:
        summary = f.read()
    assert "| diversity/heldout/diversity_ratio | 1 |" in summary and "| shapes_fid/test/shapes_fid |" in summary
    assert runner.headline("diversity", results["diversity"]["result"]).startswith("test: diversity_ratio 1")


def test_diversity_falls_to_zero_when_a_caption_always_gives_one_image(workdir, monkeypatch):
    options = EvalOptions(**dict(OPTIONS, splits=("heldout",)))
    run = runner.Run(workdir, options)
    fake = images_by_condition(run, run.splits)
    # Every sample of a caption is that caption's first real image.
    monkeypatch.setattr(runner.Run, "generate", lambda self, conditions, **kw: np.stack([fake(self, [c])[0]
                                                                                         for c in conditions]))
    result = runner.compute_diversity(run)["heldout"]
    assert result["diversity"] == 0.0 and result["real_diversity"] > 0 and result["samples_per_caption"] == 4


def test_diversity_on_digits_and_shapes_fid_unavailable_there(digits_workdir, tmp_path, monkeypatch):
    """On digits, diversity measures the digit classifier's features (a stand-in here; the
    classifier itself is tested in tests/evaluation/test_digits.py)."""
    from ldm_jax.evaluation import digits

    loaded = []

    def features(images, classifier):
        assert classifier == "the digit classifier"
        return MeanColourFeatures(None).features(images)

    digits_workdir = own_copy(digits_workdir, tmp_path)
    monkeypatch.setattr(digits, "load_classifier", lambda size: loaded.append(size) or "the digit classifier")
    monkeypatch.setattr(digits, "features", features)
    options = EvalOptions(**dict(OPTIONS, diversity_samples=2))
    run = runner.Run(digits_workdir, options)
    monkeypatch.setattr(runner.Run, "generate", images_by_condition(run, run.splits))
    result = runner.evaluate(digits_workdir, ["diversity"], options)["diversity"]["result"]["test"]
    assert loaded == [32] and result["num_captions"] == 3 and result["real_diversity"] > 0
    assert result["diversity_ratio"] == pytest.approx(1.0)
    with pytest.raises(runner.MetricUnavailable, match="shapes_fid: shapes_fid scores models of the shapes dataset "
                       r"\(its feature network is trained on shapes images\); this run's dataset is 'digits'"):
        runner.evaluate(digits_workdir, ["shapes_fid"], options)


def test_diversity_settings_are_checked_before_computing(workdir):
    with pytest.raises(runner.MetricUnavailable, match=r"diversity_samples must be an integer >= 2.*got 1"):
        runner.evaluate(workdir, ["diversity"], EvalOptions(**dict(OPTIONS, diversity_samples=1)))
    with pytest.raises(runner.MetricUnavailable, match=r"num_samples \(6\) >= diversity_samples \(8\)"):
        runner.evaluate(workdir, ["diversity"], EvalOptions(**dict(OPTIONS, diversity_samples=8)))


def test_shapes_fid_and_diversity_of_the_runs_own_samples(workdir, tmp_path, monkeypatch):
    """The real sampler end to end (a random model): shapes_fid and diversity are what
    `shapes_fid` and `diversity` give for the samples it drew (one per caption of the split's
    first 4 examples; 2 per caption of the first 2 captions with 2 real images); two samples of
    one caption differ, so diversity is positive."""
    from ldm_jax.evaluation import shapes_features

    workdir = own_copy(workdir, tmp_path)
    options = EvalOptions(**dict(OPTIONS, splits=("heldout",), num_samples=4, diversity_samples=2))
    generated = record_generate(monkeypatch)
    results = runner.evaluate(workdir, ["shapes_fid", "diversity"], options)
    fid, div = results["shapes_fid"]["result"]["heldout"], results["diversity"]["result"]["heldout"]
    run, classifier = runner.Run(workdir, options), shapes_features.load_classifier(32)
    (fid_captions, fid_samples), (div_captions, div_samples) = generated
    real = run.examples("heldout", 4)
    assert fid_captions == real["caption"] and fid["num_samples"] == 4
    assert fid["shapes_fid"] == pytest.approx(shapes_features.shapes_fid(fid_samples, real["image"], classifier))
    captions, real_images = runner.repeated_conditions(run, "heldout", 2, 2)
    assert div_captions == [c for c in captions for _ in range(2)]

    def features(images):  # [2 captions, 2 images, ...] -> [2, 2, D]
        return shapes_features.features(images.reshape((4,) + images.shape[-3:]), classifier).reshape(2, 2, -1)

    assert div == pytest.approx(shapes_features.diversity(features(div_samples), features(real_images)))
    assert div["num_captions"] == 2 and div["diversity"] > 0
    assert results["diversity"]["sampler"] == dict(sampler="dpm_solver++", num_steps=2, guidance=2.0,
                                                   spacing="trailing")
