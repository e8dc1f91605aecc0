"""python -m ldm_jax.sample: the files it writes, reproduction from a sidecar, and one-line errors."""
import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from ldm_jax import sample, sample_job
from ldm_jax.sample import SampleArgs, SampleError
from tests.test_pipeline import blob_images, make_workdir, workdir_config
from tests.training.tiny import ROOT

PROMPTS = ["a red circle on the left", "a blue square at the top"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("run"), workdir_config(**{"sampler.num_steps": 3}))


def _png(path):
    return np.asarray(PIL.Image.open(path))


def test_writes_images_grid_and_sidecars_that_reproduce_the_pixels(run, tmp_path):
    args = SampleArgs(out=str(tmp_path / "a"), workdir=run, prompt=PROMPTS, num_images=2, seed=5, guidance=2.5,
                      progress=False)
    paths = sample.generate(args)
    assert [os.path.basename(p) for p in paths] == ["0000.png", "0001.png", "0002.png", "0003.png"]
    assert sorted(os.listdir(args.out)) == sorted([f"{i:04d}.{e}" for i in range(4) for e in ("png", "json")]
                                                  + ["grid.png"])
    images = np.stack([_png(p) for p in paths])
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
    grid = _png(os.path.join(args.out, "grid.png"))
    assert grid.shape == (2 * 33 + 1, 2 * 33 + 1, 3)  # 2 prompts x 2 images, 1-pixel borders
    np.testing.assert_array_equal(grid[1:33, 34:66], images[1])

    with open(os.path.join(args.out, "0003.json")) as f:
        sidecar = json.load(f)
    assert sidecar["prompt"] == PROMPTS[1] and sidecar["seed"] == 8 and sidecar["task"] == "text"
    assert {k: sidecar[k] for k in ("sampler", "steps", "guidance", "eta", "height", "width")} == dict(
        sampler="dpm_solver++", steps=3, guidance=2.5, eta=0.0, height=32, width=32)
    assert sidecar["model"] == {"workdir": run, "checkpoint_step": 2, "ema": True}
    assert sidecar["command"][:3] == ["python", "-m", "ldm_jax.sample"] and "--seed" in sidecar["command"]

    # The same arguments give the same pixels; the sidecar regenerates its image on its own.
    again = sample.generate(SampleArgs(**{**args.__dict__, "out": str(tmp_path / "b")}))
    np.testing.assert_array_equal(np.stack([_png(p) for p in again]), images)
    alone = sample.generate(sample.args_from_sidecar(sidecar, str(tmp_path / "c")))
    np.testing.assert_array_equal(_png(alone[0]), images[3])
    assert np.abs(images[0].astype(int) - images[1]).mean() > 1  # seeds differ, so do the images


def test_inpainting_from_files(run, tmp_path):
    image_path, mask_path = str(tmp_path / "in.png"), str(tmp_path / "mask.png")
    PIL.Image.fromarray(blob_images(1, 64)[0]).save(image_path)  # resized to 32x32 by --height/--width
    mask = np.zeros((64, 64), np.uint8)
    mask[16:40, 16:40] = 255
    PIL.Image.fromarray(mask).save(mask_path)
    args = SampleArgs(out=str(tmp_path / "out"), workdir=run, prompt=PROMPTS[:1], init_image=image_path,
                      mask=mask_path, height=32, width=32, seed=1, progress=False)
    (path,) = sample.generate(args)
    with open(path[:-4] + ".json") as f:
        sidecar = json.load(f)
    assert sidecar["task"] == "inpaint" and sidecar["strength"] == 1.0 and sidecar["mask"] == mask_path
    assert _png(path).shape == (32, 32, 3)


def _error(**kwargs):
    kwargs.setdefault("prompt", PROMPTS[:1])
    with pytest.raises(SampleError) as e:
        sample.generate(SampleArgs(**kwargs))
    message = str(e.value)
    assert "\n" not in message
    return message


def test_one_line_errors(run, tmp_path):
    out = str(tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    (untrained / "config.json").write_text(open(os.path.join(run, "config.json")).read())
    not_an_image = tmp_path / "image.png"
    not_an_image.write_text("not a png")
    image, small_mask = tmp_path / "ok.png", tmp_path / "small_mask.png"
    PIL.Image.fromarray(blob_images(1, 32)[0]).save(image)
    PIL.Image.fromarray(np.zeros((16, 16), np.uint8)).save(small_mask)
    blank = tmp_path / "prompts.txt"
    blank.write_text("\n  \n")

    assert "does not exist" in _error(out=out, workdir=str(tmp_path / "missing"))
    assert "has no config.json" in _error(out=out, workdir=str(empty))
    assert "has no ldm checkpoint" in _error(out=out, workdir=str(untrained))
    assert "unknown sampler 'dpm'" in _error(out=out, workdir=run, sampler="dpm")
    assert "--steps must be >= 1" in _error(out=out, workdir=run, steps=0)
    assert "--guidance must be >= 0" in _error(out=out, workdir=run, guidance=-1.0)
    assert "multiple of 4" in _error(out=out, workdir=run, height=30)
    assert "cannot read --init_image" in _error(out=out, workdir=run, init_image=str(not_an_image))
    assert "--mask is 16x16 but --init_image is 32x32" in _error(out=out, workdir=run, init_image=str(image),
                                                                 mask=str(small_mask))
    assert "prompt list is empty" in _error(out=out, workdir=run, prompt=[])
    assert "prompt list is empty" in _error(out=out, workdir=run, prompt=[], prompts_file=str(blank))
    assert "exactly one of --workdir" in _error(out=out)
    assert "--variant names the weights files of a --pretrained folder" in _error(out=out, workdir=run, variant="fp16")
    assert "--sampler scheduler runs a --pretrained folder's own" in _error(out=out, workdir=run, sampler="scheduler")
    assert not os.path.exists(out)


def test_the_command_prints_one_line_and_exits_1(tmp_path):
    cmd = [sys.executable, "-m", "ldm_jax.sample", "--workdir", str(tmp_path / "missing"), "--prompt", "x",
           "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.startswith("ldm_jax.sample:")]
    assert lines == [f"ldm_jax.sample: error: workdir {tmp_path / 'missing'} does not exist"], proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# --pretrained: tiny random Stable Diffusion folders with the real layouts (tests/sd_folders.py)


def _cheap_compilation(monkeypatch) -> dict:
    """Pipelines built from here on compile with XLA:CPU's cheapest settings (tests/training/tiny.py's
    CHEAP_COMPILE: the same arithmetic, compiled in a third of the time); returns the environment
    that gives a subprocess the same settings."""
    from ldm_jax.runtime import xla_options
    from tests.training.tiny import CHEAP_COMPILE

    options = {**(xla_options.compiler_options() or {}), **CHEAP_COMPILE}
    monkeypatch.setattr(xla_options, "compiler_options", lambda: dict(options))
    flags = " ".join(f"--{k}={str(v).lower()}" for k, v in CHEAP_COMPILE.items())
    return dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip())


@pytest.fixture(scope="module")
def sd_dirs(tmp_path_factory):
    pytest.importorskip("diffusers")
    from tests import sd_folders

    root = tmp_path_factory.mktemp("sd")
    return {"sd15_fp16": sd_folders.make_sd_folder(root / "sd15", "sd15", variant="fp16"),
            "inpaint": sd_folders.make_sd_folder(root / "inpaint", "sd_inpaint", shard=True, extras="present")}


def test_pretrained_fp16_folder_and_the_sidecar_command(sd_dirs, tmp_path, monkeypatch):
    env = _cheap_compilation(monkeypatch)
    folder = str(sd_dirs["sd15_fp16"])
    args = SampleArgs(out=str(tmp_path / "a"), pretrained=folder, prompt=PROMPTS[:1], steps=2, seed=3, progress=False)
    (path,) = sample.generate(args)
    assert sorted(os.listdir(args.out)) == ["0000.json", "0000.png", "grid.png"]
    image = _png(path)
    assert image.shape == (16, 16, 3) and image.std() > 0
    with open(path[:-4] + ".json") as f:
        sidecar = json.load(f)
    # The folder holds only *.fp16.safetensors: read without --variant, and the sidecar says so.
    assert sidecar["model"] == {"pretrained": folder, "variant": "fp16",
                                "ignored": {"safety_checker": "StableDiffusionSafetyChecker",
                                            "feature_extractor": "CLIPImageProcessor"}}
    assert sidecar["task"] == "text" and sidecar["steps"] == 2 and (sidecar["height"], sidecar["width"]) == (16, 16)
    command = sidecar["command"]
    assert command[3:7] == ["--pretrained", folder, "--variant", "fp16"] and command[-2:] == ["--out", "<folder>"]

    # The sidecar's command, run as is: the same pixels.
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, *command[1:-1], str(out), "--noprogress"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300,
                          env=dict(env, JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == f"wrote 1 images, their .json sidecars and grid.png to {out}"
    np.testing.assert_array_equal(_png(out / "0000.png"), image)


def test_pretrained_inpainting_folder(sd_dirs, tmp_path, monkeypatch):
    _cheap_compilation(monkeypatch)
    rng = np.random.default_rng(0)
    image_path, mask_path = str(tmp_path / "in.png"), str(tmp_path / "mask.png")
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 8:16] = 255
    PIL.Image.fromarray(image).save(image_path)
    PIL.Image.fromarray(mask).save(mask_path)
    args = SampleArgs(out=str(tmp_path / "out"), pretrained=str(sd_dirs["inpaint"]), prompt=PROMPTS[1:],
                      init_image=image_path, mask=mask_path, steps=2, seed=4, progress=False)
    (path,) = sample.generate(args)
    with open(path[:-4] + ".json") as f:
        sidecar = json.load(f)
    assert sidecar["task"] == "inpaint" and sidecar["strength"] == 1.0 and sidecar["mask"] == mask_path
    assert sidecar["model"]["variant"] is None and "safety_checker" in sidecar["model"]["ignored"]
    # The command ran the 9-channel inpainting UNet on the files' image and mask, as the library does.
    pipe = sample_job.load_pipeline(args)
    assert pipe.is_inpainting_model
    ref = pipe.inpaint(image[None], mask[None], PROMPTS[1:], strength=1.0, num_steps=2, sampler=sidecar["sampler"],
                       guidance_scale=sidecar["guidance"], eta=sidecar["eta"], seed=[4])
    np.testing.assert_array_equal(_png(path), ref[0])
