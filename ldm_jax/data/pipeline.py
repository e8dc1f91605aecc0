"""The input pipeline: a TFDS array_record source read through grain, batched per process and
assembled into global `jax.Array`s sharded over the mesh's batch axes.

    source -> index -> this process's shard -> seeded shuffle (new order every epoch) -> repeat
           -> [optional flip] -> resize/crop, scale to [-1, 1] -> batch -> tokenize -> workers

Each batch is a dict: image [B, S, S, 3] float32 in [-1, 1], ids [B, 77] int32 (when the data has
captions), label [B] int32 (when `label_key` is set), index [B] int64 (the record's index in the
split) and caption (host-only list of str). The iterator's state (`get_state` / `set_state`)
restores the exact position, so a resumed run sees the batches it would have seen.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Any, Iterator

import grain
from absl import flags as absl_flags
import jax
import numpy as np
import PIL.Image
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ldm_jax.data import builder as builders
from ldm_jax.data import tokenizer

HOST_ONLY = ("caption",)
_TOKENIZER_LOCK = threading.Lock()  # grain maps in threads; transformers' lazy imports are not thread-safe


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to read and how (the `data` group of a training config)."""

    name: str = "shapes"
    data_dir: str = "~/.cache/ldm_jax/datasets"
    split: str = "train"
    image_size: int = 32
    batch_size: int = 64  # global, over all processes
    seed: int = 0
    shuffle: bool = True
    flip: bool = False  # off by default: it would swap the shapes' left/right captions
    num_workers: int = 0  # grain worker processes (0: read in the main process)
    image_key: str = "image"
    caption_key: str | None = "caption"
    label_key: str | None = None
    options: tuple = ()  # builder options for ldm_jax's own datasets, as (key, value) pairs
    max_length: int = 77

    @classmethod
    def from_dict(cls, d) -> "DataConfig":
        """Build from a mapping (e.g. a ConfigDict), naming unknown keys in the error."""
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown data config keys {unknown}; allowed: {sorted(known)}")
        if isinstance(d.get("options"), dict) or hasattr(d.get("options"), "items"):
            d["options"] = tuple(sorted(dict(d["options"]).items()))
        return cls(**d)


def load_source(config: DataConfig):
    """The random-access source of one split. ldm_jax's own datasets are built on first use."""
    import os

    data_dir = os.path.expanduser(config.data_dir)
    options = dict(config.options)
    if config.name in builders.BUILDERS:
        if "image_size" in _config_fields(config.name):
            options.setdefault("image_size", config.image_size)
        builder = builders.prepare(config.name, data_dir, **options)
    else:
        builder = builders.load_builder(config.name, data_dir, **options)
        if not builder.is_prepared():
            raise ValueError(f"dataset {config.name!r} is not prepared under {data_dir}; prepare it first "
                             f"(python -m ldm_jax.data.prepare {config.name} --data_dir {data_dir})")
    splits = list(builder.info.splits)
    if config.split not in splits:
        raise ValueError(f"dataset {config.name!r} has no split {config.split!r}; it has {splits}")
    features = builder.info.features
    for key in (config.image_key, config.caption_key, config.label_key):
        if key is not None and key not in features:
            raise ValueError(f"dataset {config.name!r} has no feature {key!r}; it has {sorted(features)}")
    return builder.as_data_source(split=config.split)


def _config_fields(name: str) -> set[str]:
    factory = builders._resolve(builders.BUILDERS[name][1])
    import inspect

    return set(inspect.signature(factory).parameters)


def resize_and_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to `size` (bicubic) and centre-crop to size x size; RGB uint8."""
    if image.shape[:2] == (size, size) and image.shape[-1] == 3:
        return image
    pil = PIL.Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).convert("RGB")
    w, h = pil.size
    scale = size / min(w, h)
    pil = pil.resize((max(size, round(w * scale)), max(size, round(h * scale))), PIL.Image.BICUBIC)
    w, h = pil.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(pil.crop((left, top, left + size, top + size)), np.uint8)


class _Preprocess(grain.transforms.Map):
    """A record -> {"image" in [-1, 1] (or "latents", its row of a precomputed table), "index",
    "caption" / "label"}."""

    def __init__(self, config: DataConfig, latents: np.ndarray | None = None):
        self.config = config
        self.latents = latents

    def map(self, element):
        index, record = element
        c = self.config
        out = {"index": np.int64(index)}
        if self.latents is not None:  # the image is not even decoded
            out["latents"] = self.latents[index]
        else:
            image = resize_and_crop(np.asarray(record[c.image_key]), c.image_size)
            out["image"] = image.astype(np.float32) / 127.5 - 1.0
        if c.caption_key is not None:
            text = record[c.caption_key]
            out["caption"] = text.decode("utf-8") if isinstance(text, bytes) else str(text)
        if c.label_key is not None:
            out["label"] = np.int32(record[c.label_key])
        return out


class _Flip(grain.transforms.RandomMap):
    def random_map(self, element, rng: np.random.Generator):
        if rng.random() < 0.5:
            element = dict(element, image=element["image"][:, ::-1])
        return element


class _Tokenize(grain.transforms.Map):
    """Tokenize a batch's captions with the package's CLIP tokenizer (built lazily per worker)."""

    def __init__(self, max_length: int):
        self.max_length = max_length
        self._tokenizer = None

    def map(self, batch):
        with _TOKENIZER_LOCK:
            if self._tokenizer is None:
                self._tokenizer = tokenizer.make_tokenizer(self.max_length)
        captions = [c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in batch["caption"]]
        return dict(batch, caption=captions, ids=tokenizer.tokenize(self._tokenizer, captions))

    def __getstate__(self):  # ship the config to workers, not the tokenizer
        return {"max_length": self.max_length, "_tokenizer": None}


def make_dataset(config: DataConfig, *, process_index: int = 0, process_count: int = 1, source=None,
                 latents: np.ndarray | None = None) -> grain.IterDataset:
    """The grain dataset of this process's local batches (batch_size / process_count each).

    Process p reads records p, p + P, p + 2P, ... of the split, so the processes' shards are
    disjoint and together cover it; each shuffles its shard with a seed shared by all, reshuffled
    every epoch. `latents` (optional, [N, ...] for the split's N records, e.g. the frozen
    autoencoder's posterior moments): batches carry `latents[index]` instead of decoded images.
    """
    if config.batch_size % process_count:
        raise ValueError(f"data.batch_size={config.batch_size} must be divisible by the process count {process_count}")
    source = load_source(config) if source is None else source
    local_batch = config.batch_size // process_count
    n = len(source)
    # grain passes indices past the end on later epochs (it wraps them); keep the record's own index.
    ds = grain.MapDataset.source(source).map_with_index(lambda i, record: (i % n, record))
    ds = ds.slice(slice(process_index, None, process_count))
    if len(ds) < local_batch:
        raise ValueError(f"split {config.split!r} of {config.name!r} has {len(ds)} records for this process, "
                         f"fewer than one local batch ({local_batch})")
    ds = ds.seed(config.seed)
    if config.shuffle:
        ds = ds.shuffle()
    if latents is not None and len(latents) != n:
        raise ValueError(f"{len(latents)} precomputed latents for the {n} records of split {config.split!r}")
    ds = ds.repeat(None).map(_Preprocess(config, latents))
    if config.flip:
        ds = ds.random_map(_Flip())
    ds = ds.batch(local_batch, drop_remainder=True)
    if config.caption_key is not None:
        ds = ds.map(_Tokenize(config.max_length))
    ds = ds.to_iter_dataset()
    if config.num_workers > 0:
        if not absl_flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app use defaults
            absl_flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers, per_worker_buffer_size=2))
    return ds


def batch_sharding(mesh: Mesh, batch_axes=("data", "fsdp")) -> NamedSharding:
    """Shard the leading (batch) axis over the mesh's batch axes; everything else replicated."""
    axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    return NamedSharding(mesh, PartitionSpec(axes))


class Batches(Iterator[dict]):
    """Iterate global batches; `get_state()` / `set_state()` save and restore the exact position.

    With a mesh, numeric entries become global jax.Arrays with the batch dimension sharded over
    the mesh's batch axes (`jax.make_array_from_process_local_data`); without one they stay
    this process's numpy arrays. Captions stay a host-side list.
    """

    def __init__(self, dataset: grain.IterDataset, mesh: Mesh | None = None):
        self._iterator = iter(dataset)
        self._sharding = batch_sharding(mesh) if mesh is not None else None

    def __next__(self) -> dict[str, Any]:
        local = next(self._iterator)
        if self._sharding is None:
            return local
        return {
            k: v if k in HOST_ONLY else jax.make_array_from_process_local_data(self._sharding, np.asarray(v))
            for k, v in local.items()
        }

    def get_state(self):
        return self._iterator.get_state()

    def set_state(self, state) -> None:
        self._iterator.set_state(state)


def make_batches(config: DataConfig, mesh: Mesh | None = None, *, process_index: int | None = None,
                 process_count: int | None = None, source=None, latents: np.ndarray | None = None) -> Batches:
    """Global batches for this process (defaults: jax.process_index() / jax.process_count())."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    return Batches(make_dataset(config, process_index=process_index, process_count=process_count, source=source,
                                latents=latents), mesh)
