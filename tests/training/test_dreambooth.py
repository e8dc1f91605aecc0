"""DreamBooth (training/dreambooth.py, ldm_stage.example_weights): the training folder (instance
images repeated to balance the class images, class images drawn once and kept, captions the
image_folder builder reads) and the prior-preservation weights the step gives by caption."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from ldm_jax import config as config_lib
from ldm_jax.data.image_folder import read_captions
from ldm_jax.training import dreambooth, ldm_stage
from tests.training.tiny import ROOT


def _instance_dir(path, n=2):
    path.mkdir()
    for i in range(n):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(path / f"dog{i}.png")
    return path


def test_dreambooth_folder_balances_instances_and_keeps_class_images(tmp_path):
    calls = []

    def generate(prompts, seeds):  # stands in for the frozen model: one grey level per seed
        calls.append(list(seeds))
        return np.stack([np.full((8, 8, 3), s, np.uint8) for s in seeds])

    instances = _instance_dir(tmp_path / "dog")
    out = dreambooth.make_dreambooth_folder(instances, tmp_path / "db", instance_prompt="a photo of sks dog",
                                            class_prompt="a photo of a dog", num_class_images=5, generate=generate,
                                            batch_size=2, seed=10)
    captions = read_captions(out)  # as the image_folder builder reads the folder
    texts = [captions[f] for f in sorted(captions)]
    assert texts.count("a photo of a dog") == 5 and texts.count("a photo of sks dog") == 2 * 3  # ceil(5 / 2) copies
    assert calls == [[10, 11], [12, 13], [14]]
    assert np.asarray(Image.open(os.path.join(out, "class", "00003.png")))[0, 0, 0] == 13
    assert np.array_equal(np.asarray(Image.open(os.path.join(out, "instance", "dog1_002.png"))),
                          np.asarray(Image.open(instances / "dog1.png")))

    os.remove(os.path.join(out, "class", "00001.png"))  # an interrupted preparation: only the missing one
    dreambooth.make_dreambooth_folder(instances, out, instance_prompt="a photo of sks dog",
                                      class_prompt="a photo of a dog", num_class_images=5, generate=generate,
                                      seed=10)
    assert calls[3:] == [[11]]

    plain = dreambooth.make_dreambooth_folder(instances, tmp_path / "plain", instance_prompt="a photo of sks dog")
    with open(os.path.join(plain, "captions.jsonl")) as f:
        assert [json.loads(line)["file"] for line in f] == ["instance/dog0.png", "instance/dog1.png"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(instance_prompt=""), "instance_prompt='' must be a non-empty prompt"),
    (dict(class_prompt="a photo of sks dog"), "class_prompt must differ from instance_prompt"),
    (dict(class_prompt="a dog"), "give pretrained"),
    (dict(class_prompt="a dog", num_class_images=0, pretrained="/x"), "num_class_images=0 must be a positive"),
])
def test_dreambooth_folder_refuses_what_cannot_work(tmp_path, kwargs, message):
    instances = _instance_dir(tmp_path / "dog")
    with pytest.raises(ValueError, match=message):
        dreambooth.make_dreambooth_folder(instances, tmp_path / "db", **{"instance_prompt": "a photo of sks dog",
                                                                         **kwargs})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        dreambooth.make_dreambooth_folder(tmp_path / "empty", tmp_path / "x", instance_prompt="a photo of sks dog")


def test_prior_preservation_weighs_the_class_images():
    config = config_lib.load_config(f"{ROOT}/configs/sd15_dreambooth.py",
                                    ["dreambooth.class_prompt='a photo of a dog'", "dreambooth.prior_loss_weight=0.25"])
    config_lib.validate(config)
    models = ldm_stage.build_models(config)
    ids = models.conditioning.conditions(["a photo of sks dog", "a photo of a dog", "a photo of a dog on grass", ""])[0]
    weights = ldm_stage.example_weights(config, models)
    np.testing.assert_array_equal(np.asarray(weights(ids)), [1.0, 0.25, 1.0, 1.0])
    config.dreambooth.class_prompt = None
    assert ldm_stage.example_weights(config, models) is None
    config.dreambooth.prior_loss_weight = -1.0
    with pytest.raises(ValueError, match="dreambooth.prior_loss_weight=-1.0 must be a number >= 0"):
        config_lib.validate(config)


def test_an_imported_model_chooses_its_data_before_it_trains(tmp_path):
    """Full DreamBooth: a folder imported as a workdir (convert --from_diffusers, a checkpoint at step
    0) may be started with other data and dreambooth keys (what configs/sd15_dreambooth.py's docstring
    does); once a step has trained they are fixed, and the model's keys always are."""
    pytest.importorskip("diffusers")
    from ldm_jax.runs import run_record
    from ldm_jax.training import loop
    from ldm_jax.training.diffusers_runs import diffusers_to_workdir
    from tests.interop.test_lora import tiny_sd_pipeline

    tiny_sd_pipeline().save_pretrained(str(tmp_path / "sd"), safe_serialization=True)
    workdir = diffusers_to_workdir(str(tmp_path / "sd"), str(tmp_path / "run"))
    overrides = ["data.options.folder=/data/my_dog_dreambooth", "dreambooth.class_prompt='a photo of a dog'"]
    config = config_lib.load_config(os.path.join(workdir, "config.py"), overrides)
    diffs = run_record.check_resume(workdir, config, run_record.load(workdir), loop.resume_also(workdir))
    assert {key for key, _, _ in diffs} == {"data.options.folder", "dreambooth.class_prompt"}
    config.unet.layers_per_block = 2
    with pytest.raises(run_record.RunConfigError, match="unet.layers_per_block"):
        run_record.check_resume(workdir, config, run_record.load(workdir), loop.resume_also(workdir))
    os.makedirs(os.path.join(workdir, "checkpoints", "ldm", "100"))  # a trained step
    assert loop.resume_also(workdir) == ()
