"""Bad inputs, measured: every command line (train, sample, evaluate, convert, experiments, the
dataset preparer) fed a table of mistakes. Each must exit non-zero with exactly one line holding
`error:` on stderr that names the offending key, file or value (the `expect` strings: the
culprit, and what is allowed where there is a list), print no traceback, and leave every file
of the inputs byte-identical (a trained run, image folders, diffusers folders, broken copies of
the run) and write nothing where it was told to write. The exceptions succeed: over-long prompts
(a warning with the number of tokens dropped), non-ASCII ones (CLIP's byte-level BPE takes any
text), and images that are merely unusual (16-bit, CMYK, palette, transparent: converted, and the
conversion checked here). The image folders of the table hold no readable image at all; a folder
with some is built from those, the others listed in skipped.txt (tests/data/test_image_folder.py).

The cases run as the real commands (`python -m <module> <args>`, exit status, stdout, stderr),
but without paying JAX's import for each: one driver process imports the libraries once and
forks a child per case, which runs the module as __main__ (`python tests/test_bad_inputs.py
CASES RESULTS`). The driver never initialises a JAX backend, so each child starts as a fresh
process would. It also hashes the inputs before and after each case.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import PIL.Image
import pytest

from tests.training.tiny import ROOT, cheap_compilation_env

LONG_PROMPT = " ".join(["a red circle on the left of a blue square"] * 8)  # ~80 tokens; the tiny run keeps 16
UNICODE_PROMPT = "cercle rouge à gauche — 赤い円 🎈"  # 16 tokens with the start and end: it fits


# ---------------------------------------------------------------------------------------------
# The table. Placeholders: {run} the trained run, {w} the inputs' folder, {out} this case's own
# empty folder for anything it is told to write.


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    module: str
    args: tuple
    expect: tuple = ()  # substrings of the error line (or, for ok cases, of stderr)
    ok: bool = False


def _case(id, module, args, *expect, ok=False):
    return Case(id, module, tuple(args), tuple(expect), ok)


TRAIN = ("--config", "{w}/train_config.py", "--workdir", "{run}")
SAMPLE = ("--workdir", "{run}", "--out", "{out}/images", "--noprogress")
PROMPT = ("--prompt", "a red circle on the left")
EXPERIMENT = ("run", "{w}/experiments/micro.py", "--root", "{out}/root", "--dry_run")
PREPARE = ("image_folder", "--data_dir", "{out}/data", "--option", "image_size=16")


def _folder(name):
    return PREPARE + ("--option", f"folder={{w}}/folders/{name}")


CASES = [
    # python -m ldm_jax.train: flags and config keys, then the workdir (a resume with the run's config + one change)
    _case("train-unknown-key", "ldm_jax.train", TRAIN + ("--config.diffusion.schedul=cosine",),
          "diffusion.schedul", "schedule"),
    _case("train-ill-typed-value", "ldm_jax.train", TRAIN + ("--config.train.steps=abc",), "train.steps", "abc"),
    _case("train-zero-steps", "ldm_jax.train", TRAIN + ("--config.train.steps=0",), "train.steps=0", "positive"),
    _case("train-negative-steps", "ldm_jax.train", TRAIN + ("--config.autoencoder.steps=-3",),
          "autoencoder.steps=-3"),
    _case("train-unknown-sampler", "ldm_jax.train", TRAIN + ("--config.sampler.name=dpm",), "'dpm'", "dpm_solver++"),
    _case("train-unknown-flag", "ldm_jax.train", TRAIN + ("--learning_rate=0.1",), "learning_rate"),
    _case("train-missing-config-file", "ldm_jax.train", ("--config", "{w}/nowhere.py", "--workdir", "{out}/run"),
          "nowhere.py", "does not exist"),
    _case("train-batch-not-divisible-by-devices", "ldm_jax.train",
          ("--config", "{w}/train_config.py", "--workdir", "{out}/run", "--config.data.batch_size=6"),
          "data.batch_size=6", "4 devices"),
    _case("train-resume-with-another-config", "ldm_jax.train", TRAIN + ("--config.diffusion.schedule=cosine",),
          "diffusion.schedule", "cosine"),
    _case("train-corrupt-config-json", "ldm_jax.train",
          ("--config", "{w}/train_config.py", "--workdir", "{w}/runs/corrupt_config"), "config.json", "JSON"),
    _case("train-truncated-checkpoint", "ldm_jax.train",
          ("--config", "{w}/train_config.py", "--workdir", "{w}/runs/truncated_checkpoint"),
          "{w}/runs/truncated_checkpoint/checkpoints/autoencoder/2"),
    _case("train-unreadable-image-folder", "ldm_jax.train",
          ("--config", "{w}/train_folder_config.py", "--workdir", "{out}/run"), "truncated.png", "truncated"),

    # python -m ldm_jax.sample
    _case("sample-unknown-flag", "ldm_jax.sample", SAMPLE + PROMPT + ("--stepz", "3"), "stepz", "steps"),
    _case("sample-ill-typed-flag", "ldm_jax.sample", SAMPLE + PROMPT + ("--steps", "abc"), "--steps=abc", "int"),
    _case("sample-zero-steps", "ldm_jax.sample", SAMPLE + PROMPT + ("--steps", "0"), "--steps must be >= 1", "0"),
    _case("sample-negative-num-images", "ldm_jax.sample", SAMPLE + PROMPT + ("--num_images", "-2"),
          "--num_images must be >= 1", "-2"),
    _case("sample-unknown-sampler", "ldm_jax.sample", SAMPLE + PROMPT + ("--sampler", "dpm"), "'dpm'", "dpm_solver++"),
    _case("sample-strength-out-of-range", "ldm_jax.sample",
          SAMPLE + PROMPT + ("--init_image", "{w}/images/ok.png", "--strength", "1.5"), "--strength", "[0, 1]", "1.5"),
    _case("sample-size-not-a-multiple", "ldm_jax.sample", SAMPLE + PROMPT + ("--height", "30"), "30",
          "multiple of 4"),
    _case("sample-unexpected-argument", "ldm_jax.sample", SAMPLE + PROMPT + ("extra",), "unexpected", "extra"),
    _case("sample-missing-workdir", "ldm_jax.sample",
          ("--workdir", "{w}/nowhere", "--out", "{out}/images") + PROMPT, "{w}/nowhere", "does not exist"),
    _case("sample-workdir-without-checkpoint", "ldm_jax.sample",
          ("--workdir", "{w}/runs/config_only", "--out", "{out}/images") + PROMPT, "config_only", "no ldm checkpoint"),
    _case("sample-missing-checkpoint-step", "ldm_jax.sample", SAMPLE + PROMPT + ("--checkpoint_step", "7"),
          "step 7", "[2]"),
    _case("sample-corrupt-config-json", "ldm_jax.sample",
          ("--workdir", "{w}/runs/corrupt_config", "--out", "{out}/images") + PROMPT,
          "{w}/runs/corrupt_config/config.json", "JSON"),
    _case("sample-config-json-unknown-key", "ldm_jax.sample",
          ("--workdir", "{w}/runs/unknown_key", "--out", "{out}/images") + PROMPT,
          "unet.block_out_channelz", "block_out_channels"),
    _case("sample-checkpoint-of-another-config", "ldm_jax.sample",
          ("--workdir", "{w}/runs/other_shapes", "--out", "{out}/images") + PROMPT, "the diffusion checkpoint",
          "shape"),
    _case("sample-truncated-checkpoint", "ldm_jax.sample",
          ("--workdir", "{w}/runs/truncated_checkpoint", "--out", "{out}/images") + PROMPT,
          "{w}/runs/truncated_checkpoint/checkpoints/ldm/2"),
    _case("sample-init-image-missing", "ldm_jax.sample", SAMPLE + PROMPT + ("--init_image", "{w}/images/nowhere.png"),
          "--init_image", "nowhere.png"),
    _case("sample-init-image-not-an-image", "ldm_jax.sample",
          SAMPLE + PROMPT + ("--init_image", "{w}/images/not_an_image.png"), "not_an_image.png", "cannot identify"),
    _case("sample-init-image-truncated-png", "ldm_jax.sample",
          SAMPLE + PROMPT + ("--init_image", "{w}/images/truncated.png"), "truncated.png", "truncated"),
    _case("sample-init-image-truncated-jpeg", "ldm_jax.sample",
          SAMPLE + PROMPT + ("--init_image", "{w}/images/truncated.jpg"), "truncated.jpg", "truncated"),
    _case("sample-init-image-decompression-bomb", "ldm_jax.sample",
          SAMPLE + PROMPT + ("--init_image", "{w}/images/bomb.png"), "bomb.png", "exceeds limit"),
    _case("sample-init-image-too-large-for-the-model", "ldm_jax.sample",
          SAMPLE + PROMPT + ("--init_image", "{w}/images/large.png"), "large.png", "256x256", "--height"),
    _case("sample-mask-of-another-size", "ldm_jax.sample",
          SAMPLE + PROMPT + ("--init_image", "{w}/images/ok.png", "--mask", "{w}/images/mask16.png"),
          "--mask is 16x16", "32x32"),
    _case("sample-mask-not-an-image", "ldm_jax.sample",
          SAMPLE + PROMPT + ("--init_image", "{w}/images/ok.png", "--mask", "{w}/images/empty.png"),
          "--mask", "empty.png"),
    _case("sample-mask-without-init-image", "ldm_jax.sample", SAMPLE + PROMPT + ("--mask", "{w}/images/mask16.png"),
          "--mask needs --init_image"),
    _case("sample-prompts-file-not-utf8", "ldm_jax.sample", SAMPLE + ("--prompts_file", "{w}/images/latin1.txt"),
          "latin1.txt", "utf-8"),
    _case("sample-no-prompt", "ldm_jax.sample", SAMPLE, "prompt list is empty", "--prompt"),
    _case("sample-pretrained-without-model-index", "ldm_jax.sample",
          ("--pretrained", "{w}/diffusers/no_model_index", "--out", "{out}/images") + PROMPT, "model_index.json"),
    _case("sample-pretrained-unet-of-wrong-shape", "ldm_jax.sample",
          ("--pretrained", "{w}/diffusers/wrong_shape", "--out", "{out}/images") + PROMPT, "conv_in.weight",
          "(16, 4, 5, 5)"),
    _case("sample-long-and-unicode-prompts", "ldm_jax.sample",
          SAMPLE + ("--prompt", LONG_PROMPT, "--prompt", UNICODE_PROMPT, "--steps", "1"),
          "tokens were dropped", ok=True),

    # python -m ldm_jax.evaluate
    _case("evaluate-unknown-metric", "ldm_jax.evaluate", ("--workdir", "{run}", "--metrics", "bdp"), "'bdp'", "bpd"),
    _case("evaluate-metric-not-for-this-run", "ldm_jax.evaluate", ("--workdir", "{run}", "--metrics", "digit_accuracy"),
          "digit_accuracy", "digits"),
    _case("evaluate-missing-step", "ldm_jax.evaluate", ("--workdir", "{run}", "--step", "7"), "step 7", "[2]"),
    _case("evaluate-zero-samples", "ldm_jax.evaluate",
          ("--workdir", "{run}", "--metrics", "prompt_accuracy", "--num_samples", "0"), "--num_samples", "positive"),
    _case("evaluate-zero-batch", "ldm_jax.evaluate", ("--workdir", "{run}", "--batch_size", "0"), "--batch_size",
          "positive"),
    _case("evaluate-zero-ode-steps", "ldm_jax.evaluate",
          ("--workdir", "{run}", "--metrics", "ode_bpd", "--ode_steps", "0"), "--ode_steps", "positive"),
    _case("evaluate-zero-steps", "ldm_jax.evaluate", ("--workdir", "{run}", "--metrics", "prompt_accuracy",
                                                      "--steps", "0"), "--steps", "positive"),
    _case("evaluate-negative-guidance", "ldm_jax.evaluate", ("--workdir", "{run}", "--metrics", "prompt_accuracy",
                                                             "--guidance", "-2"), "--guidance", "-2"),
    _case("evaluate-unknown-sampler", "ldm_jax.evaluate", ("--workdir", "{run}", "--metrics", "prompt_accuracy",
                                                           "--sampler", "dpm"), "'dpm'", "dpm_solver++"),
    _case("evaluate-unknown-spacing", "ldm_jax.evaluate", ("--workdir", "{run}", "--spacing", "middle"),
          "--spacing=middle", "trailing"),
    _case("evaluate-sweep-steps-not-integers", "ldm_jax.evaluate",
          ("--workdir", "{run}", "--metrics", "prompt_accuracy", "--sweep_samplers", "ddim", "--sweep_steps", "5,abc"),
          "--sweep_steps", "5,abc"),
    _case("evaluate-missing-inception-weights", "ldm_jax.evaluate",
          ("--workdir", "{run}", "--metrics", "fid", "--inception_weights", "{w}/nowhere.npz"), "--inception_weights",
          "nowhere.npz"),
    _case("evaluate-unknown-split", "ldm_jax.evaluate",
          ("--workdir", "{run}", "--metrics", "prompt_accuracy", "--splits", "validation"), "'validation'", "heldout"),
    _case("evaluate-corrupt-config-json", "ldm_jax.evaluate", ("--workdir", "{w}/runs/corrupt_config"),
          "{w}/runs/corrupt_config/config.json", "JSON"),
    _case("evaluate-truncated-checkpoint", "ldm_jax.evaluate", ("--workdir", "{w}/runs/truncated_checkpoint"),
          "{w}/runs/truncated_checkpoint/checkpoints/ldm/2"),
    _case("evaluate-unexpected-argument", "ldm_jax.evaluate", ("--workdir", "{run}", "bpd"), "unexpected", "bpd"),

    # python -m ldm_jax.convert
    _case("convert-no-direction", "ldm_jax.convert", ("--workdir", "{run}"), "--to_diffusers"),
    _case("convert-missing-source", "ldm_jax.convert",
          ("--from_diffusers", "{w}/nowhere", "--to_workdir", "{out}/run"), "{w}/nowhere"),
    _case("convert-no-model-index", "ldm_jax.convert",
          ("--from_diffusers", "{w}/diffusers/no_model_index", "--to_workdir", "{out}/run"), "model_index.json"),
    _case("convert-corrupt-model-index", "ldm_jax.convert",
          ("--from_diffusers", "{w}/diffusers/corrupt_model_index", "--to_workdir", "{out}/run"), "model_index.json",
          "not valid JSON"),
    _case("convert-missing-unet-weights", "ldm_jax.convert",
          ("--from_diffusers", "{w}/diffusers/no_unet_weights", "--to_workdir", "{out}/run"),
          "unet/diffusion_pytorch_model.safetensors"),
    _case("convert-truncated-unet-weights", "ldm_jax.convert",
          ("--from_diffusers", "{w}/diffusers/truncated_unet_weights", "--to_workdir", "{out}/run"),
          "unet/diffusion_pytorch_model.safetensors", "cannot read"),
    _case("convert-unet-of-wrong-shape", "ldm_jax.convert",
          ("--from_diffusers", "{w}/diffusers/wrong_shape", "--to_workdir", "{out}/run"), "conv_in.weight",
          "(16, 4, 3, 3)"),
    _case("convert-import-into-a-run", "ldm_jax.convert",
          ("--from_diffusers", "{w}/diffusers/wrong_shape", "--to_workdir", "{run}"), "{run}", "new workdir"),
    _case("convert-export-into-a-run", "ldm_jax.convert", ("--workdir", "{run}", "--to_diffusers", "{run}"),
          "{run}", "not an empty folder"),
    _case("convert-export-missing-step", "ldm_jax.convert",
          ("--workdir", "{run}", "--to_diffusers", "{out}/sd", "--checkpoint_step", "9"), "step 9", "[2]"),
    _case("convert-export-truncated-checkpoint", "ldm_jax.convert",
          ("--workdir", "{w}/runs/truncated_checkpoint", "--to_diffusers", "{out}/sd"),
          "{w}/runs/truncated_checkpoint/checkpoints/ldm/2"),

    # python -m ldm_jax.experiments (sweeps with bad overrides; --dry_run validates everything run would)
    _case("experiments-unknown-key", "ldm_jax.experiments", EXPERIMENT + ("--set", "diffusion.schedul=cosine"),
          "diffusion.schedul", "schedule"),
    _case("experiments-ill-typed-value", "ldm_jax.experiments", EXPERIMENT + ("--set", "train.steps=abc"),
          "train.steps", "abc"),
    _case("experiments-zero-steps", "ldm_jax.experiments", EXPERIMENT + ("--set", "train.steps=0"), "train.steps=0",
          "positive"),
    _case("experiments-set-without-value", "ldm_jax.experiments", EXPERIMENT + ("--set", "train.steps"),
          "--set", "key=value"),
    _case("experiments-zero-jobs", "ldm_jax.experiments", EXPERIMENT + ("--jobs", "0"), "--jobs", "positive"),
    _case("experiments-missing-file", "ldm_jax.experiments",
          ("run", "{w}/experiments/nowhere.py", "--root", "{out}/root"), "nowhere.py", "does not exist"),
    _case("experiments-file-with-syntax-error", "ldm_jax.experiments",
          ("run", "{w}/experiments/syntax_error.py", "--root", "{out}/root"), "syntax_error.py", "SyntaxError"),
    _case("experiments-unknown-metric", "ldm_jax.experiments",
          ("run", "{w}/experiments/unknown_metric.py", "--root", "{out}/root"), "'bdp'", "bpd"),
    _case("experiments-root-is-a-training-run", "ldm_jax.experiments",
          ("run", "{w}/experiments/micro.py", "--root", "{run}", "--dry_run"), "{run}", "config.json"),
    _case("experiments-report-of-no-experiment", "ldm_jax.experiments", ("report", "{w}/nowhere"), "{w}/nowhere",
          "experiment.json"),

    # python -m ldm_jax.data.prepare image_folder: folders whose every image is bad in one way
    _case("prepare-missing-folder", "ldm_jax.data.prepare", _folder("nowhere"), "{w}/folders/nowhere",
          "does not exist"),
    _case("prepare-no-captions", "ldm_jax.data.prepare", _folder("uncaptioned"), "no captioned images",
          "captions.jsonl"),
    _case("prepare-truncated-png", "ldm_jax.data.prepare", _folder("truncated_png"), "truncated.png", "truncated"),
    _case("prepare-truncated-jpeg", "ldm_jax.data.prepare", _folder("truncated_jpeg"), "truncated.jpg", "truncated"),
    _case("prepare-empty-file", "ldm_jax.data.prepare", _folder("empty_file"), "empty.png", "cannot identify"),
    _case("prepare-not-an-image", "ldm_jax.data.prepare", _folder("not_an_image"), "not_an_image.png",
          "cannot identify"),
    _case("prepare-decompression-bomb", "ldm_jax.data.prepare", _folder("bomb"), "bomb.png", "exceeds limit"),
    _case("prepare-listed-file-missing", "ldm_jax.data.prepare", _folder("listed_but_missing"), "gone.png",
          "No such file"),
    _case("prepare-corrupt-captions-jsonl", "ldm_jax.data.prepare", _folder("corrupt_jsonl"), "captions.jsonl:2",
          '"file"'),
    _case("prepare-captions-csv-without-header", "ldm_jax.data.prepare", _folder("csv_without_header"),
          "captions.csv", "file and text"),
    _case("prepare-caption-not-utf8", "ldm_jax.data.prepare", _folder("latin1_caption"), "ok.txt", "UTF-8"),
    _case("prepare-unknown-option", "ldm_jax.data.prepare", _folder("good") + ("--option", "colour=red"), "colour",
          "test_fraction"),
    _case("prepare-ill-typed-option", "ldm_jax.data.prepare", _folder("good") + ("--option", "image_size=big"),
          "image_size", "'big'"),
    _case("prepare-zero-image-size", "ldm_jax.data.prepare", _folder("good") + ("--option", "image_size=0"),
          "image_size", "positive"),
    _case("prepare-test-fraction-out-of-range", "ldm_jax.data.prepare",
          _folder("good") + ("--option", "test_fraction=1.5"), "test_fraction", "[0, 1)"),
    _case("prepare-unknown-dataset", "ldm_jax.data.prepare", ("imagenette", "--data_dir", "{out}/data"),
          "'imagenette'", "image_folder"),
    _case("prepare-16-bit-cmyk-and-palette-images", "ldm_jax.data.prepare", _folder("unusual_modes"), ok=True),
]


# ---------------------------------------------------------------------------------------------
# The inputs


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height RGB pixels and holds almost none: PIL refuses it on
    opening (a decompression bomb) without decoding anything."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _encoded(pixels, fmt) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _images(folder):
    folder.mkdir(parents=True)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
    PIL.Image.fromarray(noise[:32, :32]).save(folder / "ok.png")
    PIL.Image.fromarray(np.zeros((16, 16), np.uint8)).save(folder / "mask16.png")
    PIL.Image.fromarray(np.full((256, 256, 3), 128, np.uint8)).save(folder / "large.png")
    png, jpeg = _encoded(noise, "PNG"), _encoded(noise, "JPEG")
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "not_an_image.png").write_text("not an image\n")
    (folder / "bomb.png").write_bytes(_png_header_only(40_000, 40_000))
    (folder / "latin1.txt").write_bytes("un cercle à gauche\n".encode("latin-1"))


def _image_folders(folder, images):
    """One folder per way a dataset can be bad, each with nothing readable and captioned."""
    def make(name, files=(), txt_captions=True):
        path = folder / name
        path.mkdir(parents=True)
        for file in files:
            shutil.copy(images / file, path / file)
            if txt_captions:
                (path / (os.path.splitext(file)[0] + ".txt")).write_text(f"a picture named {file}\n")
        return path

    make("truncated_png", ["truncated.png"])
    make("truncated_jpeg", ["truncated.jpg"])
    make("empty_file", ["empty.png"])
    make("not_an_image", ["not_an_image.png"])
    make("bomb", ["bomb.png"])
    make("uncaptioned", ["ok.png"], txt_captions=False)
    (make("listed_but_missing") / "captions.jsonl").write_text('{"file": "gone.png", "text": "a cat"}\n')
    (make("corrupt_jsonl", ["ok.png"], txt_captions=False) / "captions.jsonl").write_text(
        '{"file": "ok.png", "text": "a cat"}\n{"file": "ok.png"\n')
    (make("csv_without_header", ["ok.png"], txt_captions=False) / "captions.csv").write_text("ok.png,a cat\n")
    latin1 = "un chat à gauche".encode("latin-1")
    (make("latin1_caption", ["ok.png"], txt_captions=False) / "ok.txt").write_bytes(latin1)
    make("good", ["ok.png", "large.png"])
    unusual = make("unusual_modes")
    for name, image in _unusual_images().items():
        image.save(unusual / name)
        (unusual / (os.path.splitext(name)[0] + ".txt")).write_text(f"a picture named {name}\n")


def _unusual_images() -> dict:
    """Files whose mode is not 8-bit RGB, each with the RGB pixels it should read as."""
    ramp = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    palette = PIL.Image.fromarray(np.tile(np.arange(32, dtype=np.uint8)[None], (32, 1)), "P")
    palette.putpalette([v for i in range(256) for v in (i, 2 * i % 256, 255 - i)])
    return {"grey16.png": PIL.Image.fromarray(ramp), "cmyk.jpg": PIL.Image.new("CMYK", (32, 32), (0, 255, 255, 0)),
            "palette.png": palette, "transparent.png": PIL.Image.new("RGBA", (32, 32), (0, 0, 0, 0))}


def _train_configs(world, data_dir, scratch):
    """train_config.py: the run's own config (so that a resume differs only by the case's
    override); train_folder_config.py: the same, on an image folder with nothing readable."""
    head = ["import sys", f"sys.path.insert(0, {ROOT!r})", "from tests.training.tiny import tiny_config", "",
            "", "def get_config():", f"    config = tiny_config({str(data_dir)!r})", "    config.sampler.num_steps = 4"]
    (world / "train_config.py").write_text("\n".join(head + ["    return config", ""]))
    folder = dict(folder=str(world / "folders" / "truncated_png"), image_size=32)
    (world / "train_folder_config.py").write_text("\n".join(head + [
        "    config.data.name = 'image_folder'", f"    config.data.options = {folder!r}",
        f"    config.data.data_dir = {str(scratch / 'train-unreadable-image-folder' / 'data')!r}",
        "    return config", ""]))


def _broken_workdirs(run, folder):
    """Copies of the run (hard links: cheap, and any write through one shows in the run's hashes
    too) with one thing broken each; a broken file is a new file, never written through a link."""
    def copy(name):
        path = folder / name
        shutil.copytree(run, path, copy_function=os.link)
        return path

    def replace(path, data: bytes):
        path.unlink()
        path.write_bytes(data)

    config = (run / "config.json").read_bytes()
    replace(copy("corrupt_config") / "config.json", config[: len(config) // 2])
    stored = json.loads(config)
    stored["unet"]["block_out_channelz"] = stored["unet"].pop("block_out_channels")
    replace(copy("unknown_key") / "config.json", json.dumps(stored, indent=1).encode())
    stored = json.loads(config)
    stored["unet"]["block_out_channels"] = [16, 24]  # a valid config, but not the checkpoint's
    replace(copy("other_shapes") / "config.json", json.dumps(stored, indent=1).encode())
    broken = copy("truncated_checkpoint")
    for stage in ("autoencoder", "ldm"):  # the largest file of each stage's step-2 checkpoint, halved
        largest = max((p for p in (broken / "checkpoints" / stage / "2").rglob("*") if p.is_file()),
                      key=lambda p: p.stat().st_size)
        replace(largest, largest.read_bytes()[: largest.stat().st_size // 2])
    only = folder / "config_only"
    only.mkdir()
    shutil.copy(run / "config.json", only / "config.json")


def _diffusers_folders(config, folder):
    """A diffusers folder's model_index.json and UNet (what the loaders read first, so all the
    UNet's mistakes show without the rest), random weights in the run's UNet shapes; then copies
    with one thing broken each."""
    import jax
    from safetensors.numpy import load_file, save_file

    from ldm_jax.interop import unet_weights
    from ldm_jax.interop.diffusers import module_kwargs
    from ldm_jax.training import ldm_stage
    from tests.test_pipeline import random_like

    models = ldm_stage.build_models(config)
    params = random_like(jax.eval_shape(lambda r: ldm_stage.init_params(config, models, r), jax.random.PRNGKey(0)),
                         0)["unet"]
    kwargs = module_kwargs(models.unet)
    good = folder / "good"
    (good / "unet").mkdir(parents=True)
    (good / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"]}))
    (good / "unet" / "config.json").write_text(json.dumps(unet_weights.unet_config_from_kwargs(kwargs)))
    weights = good / "unet" / "diffusion_pytorch_model.safetensors"
    save_file(unet_weights.unet_state_dict_from_params(jax.tree.map(np.asarray, params), kwargs), str(weights),
              metadata={"format": "pt"})

    def copy(name):
        shutil.copytree(good, folder / name)
        return folder / name

    (copy("no_model_index") / "model_index.json").unlink()
    (copy("corrupt_model_index") / "model_index.json").write_text('{"unet": ["diffusers", ')
    (copy("no_unet_weights") / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    data = weights.read_bytes()
    truncated = copy("truncated_unet_weights") / "unet" / "diffusion_pytorch_model.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    state = load_file(str(weights))
    assert state["conv_in.weight"].shape == (16, 4, 3, 3)
    state["conv_in.weight"] = np.zeros((16, 4, 5, 5), np.float32)
    save_file(state, str(copy("wrong_shape") / "unet" / "diffusion_pytorch_model.safetensors"),
              metadata={"format": "pt"})
    shutil.rmtree(good)


def _experiments(folder):
    folder.mkdir()
    head = '"""A micro sweep. Expected cost: seconds."""\nfrom ldm_jax.experiments import Sweep, product\n\n' \
           f"BASE = {os.path.join(ROOT, 'configs', 'base.py')!r}\n\n\n"
    (folder / "micro.py").write_text(head + "def sweep():\n    return Sweep(points=product("
                                     '{"diffusion.schedule": ["linear", "cosine"]}), metrics=["bpd"])\n')
    (folder / "unknown_metric.py").write_text(head + "def sweep():\n    return Sweep(points=product("
                                              '{"diffusion.schedule": ["linear"]}), metrics=["bdp"])\n')
    (folder / "syntax_error.py").write_text(head + "def sweep(:\n    pass\n")


# ---------------------------------------------------------------------------------------------
# Hashing and the driver


def _digest(path) -> str:
    h = hashlib.blake2b()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class FileHashes:
    """The hash of every file under a folder. A file whose (size, mtime, inode) has not changed
    since it was last hashed is not read again (a write changes the mtime: a case lasts far
    longer than the file system's clock tick); `full=True` reads everything."""

    def __init__(self, root: str):
        self.root, self._seen = root, {}

    def take(self, full: bool = False) -> dict:
        out = {}
        for folder, _, files in os.walk(self.root):
            for name in files:
                path = os.path.join(folder, name)
                st = os.stat(path)
                key = (st.st_size, st.st_mtime_ns, st.st_ino)
                seen = self._seen.get(path)
                if full or seen is None or seen[0] != key:
                    seen = self._seen[path] = (key, _digest(path))
                out[os.path.relpath(path, self.root)] = seen[1]
        return out


def files_under(root) -> list:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def changes(before: dict, after: dict) -> list:
    return sorted([f"changed {k}" for k in before if k in after and before[k] != after[k]]
                  + [f"removed {k}" for k in before if k not in after]
                  + [f"added {k}" for k in after if k not in before])


# What every command imports, loaded once by the driver (none of it starts a JAX backend).
WARM = ("jax", "flax.linen", "optax", "orbax.checkpoint", "tensorflow_datasets", "ml_collections", "absl.app",
        "ldm_jax.pipeline", "ldm_jax.training.loop", "ldm_jax.evaluation.runner", "ldm_jax.interop.diffusers",
        "ldm_jax.experiments.runner", "ldm_jax.data.image_folder")


def _run_forked(module: str, argv: list, timeout: float) -> tuple:
    """`python -m module *argv` in a forked child of this (warm) process: (exit status, stdout, stderr)."""
    import runpy
    import signal
    import tempfile
    import traceback

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: what the interpreter does for `python -m module`
            code = 1
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                sys.argv = [module, *argv]
                try:
                    runpy.run_module(module, run_name="__main__", alter_sys=True)
                    code = 0
                except SystemExit as e:
                    if e.code is None or isinstance(e.code, int):
                        code = e.code or 0
                    else:
                        print(e.code, file=sys.stderr)
                except BaseException:  # noqa: BLE001 - printed as the interpreter would
                    traceback.print_exc()
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                rc = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                rc = "timeout"
                break
            time.sleep(0.01)
        out.seek(0)
        err.seek(0)
        return rc, out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace")


def serve(cases_path: str, results_path: str) -> None:
    """The driver: run each case of `cases_path` (JSON: id, module, argv, watch, timeout) and
    write {id: {rc, stdout, stderr, wall_s, changed}} to `results_path`."""
    import importlib

    for name in WARM:
        importlib.import_module(name)
    with open(cases_path) as f:
        spec = json.load(f)
    watched = FileHashes(spec["watch"])
    results = {}
    for case in spec["cases"]:
        before = watched.take()
        t0 = time.perf_counter()
        rc, out, err = _run_forked(case["module"], case["argv"], spec["timeout"])
        results[case["id"]] = dict(rc=rc, stdout=out, stderr=err, wall_s=round(time.perf_counter() - t0, 2),
                                   changed=changes(before, watched.take()))
    with open(results_path, "w") as f:
        json.dump(results, f)


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory, shapes_dir):
    """{"w": the inputs' folder, "run": the run in it, "scratch": one empty folder per case}."""
    from tests.test_pipeline import make_workdir, workdir_config

    root = tmp_path_factory.mktemp("bad_inputs")
    w, scratch = root / "w", root / "scratch"
    config = workdir_config(**{"data.data_dir": shapes_dir})
    run = w / "run"
    make_workdir(run, config)
    _images(w / "images")
    _image_folders(w / "folders", w / "images")
    _train_configs(w, shapes_dir, scratch)
    _broken_workdirs(run, w / "runs")
    _diffusers_folders(config, w / "diffusers")
    _experiments(w / "experiments")
    for case in CASES:
        (scratch / case.id).mkdir(parents=True)
    return {"w": str(w), "run": str(run), "scratch": str(scratch)}


def _argv(case: Case, world) -> list:
    out = os.path.join(world["scratch"], case.id)
    return [a.format(w=world["w"], run=world["run"], out=out) for a in case.args]


@pytest.fixture(scope="module")
def results(world, tmp_path_factory):
    """Every case run once by the driver; the inputs' hashes before all of them."""
    tmp = tmp_path_factory.mktemp("bad_inputs_driver")
    initial = FileHashes(world["w"]).take(full=True)
    spec = {"watch": world["w"], "timeout": 60,
            "cases": [dict(id=c.id, module=c.module, argv=_argv(c, world)) for c in CASES]}
    (tmp / "cases.json").write_text(json.dumps(spec))
    env = cheap_compilation_env(dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(tmp / "cases.json"),
                           str(tmp / "results.json")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60 * len(CASES))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp / "results.json").read_text())
    slowest = sorted(out.items(), key=lambda kv: -kv[1]["wall_s"])[:5]
    print(f"\n{len(CASES)} cases in {time.perf_counter() - t0:.1f} s; slowest: "
          + ", ".join(f"{k} {v['wall_s']:.1f} s" for k, v in slowest))
    return {"cases": out, "initial": initial}


# ---------------------------------------------------------------------------------------------
# Tests


def test_the_table_covers_every_command():
    counts = {}
    for case in CASES:
        counts[case.module] = counts.get(case.module, 0) + 1
    assert set(counts) == {"ldm_jax.train", "ldm_jax.sample", "ldm_jax.evaluate", "ldm_jax.convert",
                           "ldm_jax.experiments", "ldm_jax.data.prepare"}
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, world, results):
    r = results["cases"][case.id]
    expected = [e.format(w=world["w"], run=world["run"]) for e in case.expect]
    where = f"{case.module} {' '.join(_argv(case, world))}\nstderr:\n{r['stderr'][-3000:]}"
    assert "Traceback" not in r["stderr"], where
    assert r["changed"] == [], where  # the inputs, byte for byte
    if case.ok:
        assert r["rc"] == 0, where
        assert "error:" not in r["stderr"], where
        assert all(e in r["stderr"] for e in expected), where
        return
    assert r["rc"] not in (0, "timeout"), where
    lines = [line for line in r["stderr"].splitlines() if "error:" in line]
    assert len(lines) == 1, where
    missing = [e for e in expected if e not in lines[0]]
    assert not missing, f"{missing} not in the error line\n{where}"
    assert files_under(os.path.join(world["scratch"], case.id)) == [], where  # wrote nothing


def test_long_and_unicode_prompts_are_sampled(world, results):
    """The over-long prompt is truncated with the count of tokens dropped; the non-ASCII one is
    sampled as written (its sidecar holds it verbatim)."""
    r = results["cases"]["sample-long-and-unicode-prompts"]
    assert r["rc"] == 0, r["stderr"][-2000:]
    warnings = re.findall(r"prompt (\d+) is (\d+) tokens long; the last (\d+) tokens were dropped", r["stderr"])
    assert len(warnings) == 1, r["stderr"]  # the unicode prompt fits
    index, total, dropped = map(int, warnings[0])
    assert index == 0 and dropped == total - 16 > 0  # the tiny run's text encoder keeps 16 tokens
    out = os.path.join(world["scratch"], "sample-long-and-unicode-prompts", "images")
    with open(os.path.join(out, "0001.json"), encoding="utf-8") as f:
        assert json.load(f)["prompt"] == UNICODE_PROMPT
    assert sorted(os.listdir(out)) == ["0000.json", "0000.png", "0001.json", "0001.png", "grid.png"]


def test_unusual_image_modes_read_as_their_colours(world):
    """16-bit greys are scaled (PIL's own conversion clips them at 255), CMYK and palette images
    converted, transparency composited onto white: by the dataset builder and --init_image alike."""
    from ldm_jax.data import image_files

    folder = os.path.join(world["w"], "folders", "unusual_modes")
    grey16 = image_files.read_rgb(os.path.join(folder, "grey16.png"))
    ramp = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.float64)
    np.testing.assert_array_equal(grey16[..., 0], np.round(ramp * 255 / 65535).astype(np.uint8))
    assert (grey16 == grey16[..., :1]).all() and grey16.max() == 255 and (grey16 < 128).mean() > 0.45
    assert np.abs(image_files.read_rgb(os.path.join(folder, "cmyk.jpg")).astype(int) - (255, 0, 0)).max() <= 8
    palette = image_files.read_rgb(os.path.join(folder, "palette.png"))
    np.testing.assert_array_equal(palette[5], np.stack([np.arange(32), 2 * np.arange(32), 255 - np.arange(32)], -1))
    assert (image_files.read_rgb(os.path.join(folder, "transparent.png")) == 255).all()
    mask = image_files.read_grey(os.path.join(folder, "grey16.png"))
    np.testing.assert_array_equal(mask, grey16[..., 0])


def test_the_16_bit_image_folder_builds_with_scaled_pixels(world, results):
    from ldm_jax.data.builder import load_builder

    assert results["cases"]["prepare-16-bit-cmyk-and-palette-images"]["rc"] == 0
    data_dir = os.path.join(world["scratch"], "prepare-16-bit-cmyk-and-palette-images", "data")
    builder = load_builder("image_folder", data_dir, folder=os.path.join(world["w"], "folders", "unusual_modes"),
                           image_size=16)
    records = {r["file"].decode(): r["image"] for s in builder.as_data_source().values() for r in s}
    assert sorted(records) == ["cmyk.jpg", "grey16.png", "palette.png", "transparent.png"]
    grey = records["grey16.png"].astype(int)
    assert grey.min() < 20 and grey.max() > 230  # not clipped to white
    assert (records["transparent.png"] == 255).all()


def test_the_inputs_are_byte_identical_after_every_case(world, results):
    """All of them re-read (no stat shortcut), against the hashes taken before the first case."""
    assert changes(results["initial"], FileHashes(world["w"]).take(full=True)) == []


if __name__ == "__main__":
    sys.path[0] = ROOT  # as `python -m` from the checkout has it (not tests/)
    serve(sys.argv[1], sys.argv[2])
