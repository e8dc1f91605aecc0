import dataclasses

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import Mesh

from ldm_jax.data import builder as builder_mod
from ldm_jax.data import pipeline
from tests.sizes import SMALL_SHAPES


def config(shapes_dir, **kw):
    base = dict(data_dir=shapes_dir, batch_size=8, options=tuple(SMALL_SHAPES.items()))
    return pipeline.DataConfig(**{**base, **kw})


def test_batches_have_images_in_range_and_tokenized_captions(shapes_dir):
    batch = next(pipeline.make_batches(config(shapes_dir), process_index=0, process_count=1))
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0 and batch["image"].min() == -1.0
    assert batch["ids"].shape == (8, 77) and batch["ids"].dtype == np.int32
    assert batch["ids"][0, 0] == 49406 and 49407 in batch["ids"][0]
    assert len(batch["caption"]) == 8 and all(c.startswith("a ") for c in batch["caption"])


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume(shapes_dir, workers):
    cfg = config(shapes_dir, num_workers=workers)
    it = pipeline.make_batches(cfg, process_index=0, process_count=1)
    for _ in range(5):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(4)]
    resumed = pipeline.make_batches(cfg, process_index=0, process_count=1)
    resumed.set_state(state)
    got = [next(resumed) for _ in range(4)]
    for w, g in zip(want, got):
        np.testing.assert_array_equal(w["index"], g["index"])
        np.testing.assert_array_equal(w["image"], g["image"])
        np.testing.assert_array_equal(w["ids"], g["ids"])


def test_epochs_cover_the_split_and_reshuffle(shapes_dir):
    cfg = config(shapes_dir, split="test", batch_size=40)  # 200 records = 5 batches per epoch
    it = pipeline.make_batches(cfg, process_index=0, process_count=1)
    epochs = [np.concatenate([next(it)["index"] for _ in range(5)]) for _ in range(2)]
    for e in epochs:
        assert sorted(e) == list(range(200))
    assert not np.array_equal(epochs[0], epochs[1])


def test_two_processes_read_disjoint_shards(shapes_dir):
    cfg = config(shapes_dir, split="test", batch_size=40)
    shards = []
    for p in range(2):
        it = pipeline.make_batches(cfg, process_index=p, process_count=2)
        first = next(it)
        assert first["image"].shape[0] == 20  # half of the global batch each
        shards.append(np.concatenate([first["index"]] + [next(it)["index"] for _ in range(4)]))
    assert not set(shards[0]) & set(shards[1])
    assert sorted(np.concatenate(shards)) == list(range(200))  # together: the whole split per epoch


def test_global_batch_is_sharded_over_the_mesh(shapes_dir):
    devices = np.array(jax.devices()[:4]).reshape(2, 2)
    mesh = Mesh(devices, ("data", "fsdp"))
    it = pipeline.make_batches(config(shapes_dir), mesh)
    batch = next(it)
    assert isinstance(batch["image"], jax.Array) and batch["image"].shape == (8, 32, 32, 3)
    assert batch["image"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
    assert len({s.device for s in batch["image"].addressable_shards}) == 4
    assert all(s.data.shape[0] == 2 for s in batch["ids"].addressable_shards)
    assert isinstance(batch["caption"], list)


def test_flip_is_off_by_default_and_mirrors_when_on(shapes_dir):
    """Without `flip` every image is its record's; with it, each image is either its record's or
    that image's exact left-right mirror, a fair coin per image: of 64, some are mirrored and
    some are not (both about half)."""
    plain = next(pipeline.make_batches(config(shapes_dir, shuffle=False, batch_size=64), process_index=0,
                                       process_count=1))
    records = pipeline.load_source(config(shapes_dir))
    for image, index in zip(plain["image"], plain["index"]):
        np.testing.assert_array_equal(image, records[int(index)]["image"] / np.float32(127.5) - 1.0)
    flipped = next(pipeline.make_batches(config(shapes_dir, shuffle=False, flip=True, batch_size=64), process_index=0,
                                         process_count=1))
    np.testing.assert_array_equal(plain["index"], flipped["index"])
    mirrored = np.array([np.array_equal(f, p[:, ::-1]) for f, p in zip(flipped["image"], plain["image"])])
    same = np.array([np.array_equal(f, p) for f, p in zip(flipped["image"], plain["image"])])
    assert np.all(mirrored | same)  # nothing else is done to an image
    # Mirror-symmetric shapes (a centred circle) are both; each of the others was flipped or not.
    # 28 and 32 of the 60 others with this seed: either count below 15 is 4 sigma from a fair coin.
    assert np.sum(mirrored & ~same) >= 15 and np.sum(same & ~mirrored) >= 15


def test_resize_and_crop():
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, 20:60] = 255  # the centre square of a 2:1 image
    out = pipeline.resize_and_crop(img, 16)
    assert out.shape == (16, 16, 3) and out[:, 2:-2].min() >= 250 and out.mean() > 235


def test_bad_config_is_a_clear_error(shapes_dir):
    with pytest.raises(ValueError, match="no split 'validation'"):
        pipeline.load_source(config(shapes_dir, split="validation"))
    with pytest.raises(ValueError, match="no feature 'text'"):
        pipeline.load_source(config(shapes_dir, caption_key="text"))
    with pytest.raises(ValueError, match="unknown data config keys \\['batch'\\]"):
        pipeline.DataConfig.from_dict({"batch": 3})
    with pytest.raises(ValueError, match="unknown dataset 'no_such_set'"):
        pipeline.load_source(config(shapes_dir, name="no_such_set", options=()))


class ToyLabelled(builder_mod.ArrayRecordBuilder):
    """A user's own TFDS dataset (not one of ldm_jax's): 20x30 images with a class label, no captions."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "picture": tfds.features.Image(shape=(20, 30, 3), encoding_format="png"),
            "label": tfds.features.ClassLabel(num_classes=3),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(12):
            yield i, {"picture": builder_mod.png_bytes(np.full((20, 30, 3), 20 * i, np.uint8)), "label": i % 3}


def test_any_prepared_tfds_dataset_by_name(tmp_path):
    ToyLabelled(data_dir=str(tmp_path)).download_and_prepare()
    cfg = pipeline.DataConfig(name="toy_labelled", data_dir=str(tmp_path), image_size=16, batch_size=4,
                              image_key="picture", caption_key=None, label_key="label", shuffle=False)
    batch = next(pipeline.make_batches(cfg, process_index=0, process_count=1))
    assert set(batch) == {"image", "label", "index"}
    assert batch["image"].shape == (4, 16, 16, 3) and batch["label"].dtype == np.int32
    records = ToyLabelled(data_dir=str(tmp_path)).as_data_source(split="train")
    for j, i in enumerate(batch["index"]):
        assert batch["label"][j] == records[int(i)]["label"]
        want = np.full((16, 16, 3), records[int(i)]["picture"][0, 0, 0] / 127.5 - 1.0)
        np.testing.assert_allclose(batch["image"][j], want, atol=1e-6)
    with pytest.raises(ValueError, match="not prepared"):
        pipeline.load_source(dataclasses.replace(cfg, data_dir=str(tmp_path / "empty")))
