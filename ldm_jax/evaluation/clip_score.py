"""CLIP score: how well images match their prompts, by a pretrained CLIP read from a local folder.

For an image v and its prompt c, the score is ``100 * max(cos(E_img(v), E_txt(c)), 0)`` with the
L2-normalised projected CLIP embeddings (CLIPScore, Hessel et al. 2021, eq. 1, with the weight
100 of torchmetrics' ``CLIPScore`` instead of the paper's 2.5); ``clip_score`` is its mean.

Both towers are Flax (``ldm_jax.models.clip_vision.CLIPDualEncoder``), with weights from a
transformers ``CLIPModel`` checkpoint folder (``config.json`` + ``model.safetensors``, e.g.
``openai/clip-vit-base-patch32`` or ``-large-patch14`` saved with ``save_pretrained``). Nothing is
downloaded. Images are prepared as transformers' ``CLIPImageProcessorPil`` (= OpenAI CLIP's own
``preprocess``) prepares them: shortest side resized to 224 with PIL bicubic, centre crop,
``/255``, normalised with the OpenAI mean and std.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.interop.clip_vision_weights import (clip_kwargs_from_config,
                                                 clip_params_from_state_dict, make_clip)
from ldm_jax.models.clip_vision import CLIPDualEncoder, l2_normalize
from ldm_jax.models.text_encoder import make_tokenizer, tokenize
from ldm_jax.runtime.files import read_json, read_safetensors_weights

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the resample of every CLIP processor config

_EXPECTED = ("a local transformers CLIPModel folder: config.json (model_type 'clip') and "
             "model.safetensors, as CLIPModel.save_pretrained writes; vocab.json + merges.txt or "
             "tokenizer.json and preprocessor_config.json are optional. Nothing is downloaded: "
             "save a hub model (e.g. openai/clip-vit-base-patch32) to a folder first")


# ---------------------------------------------------------------------------------------------
# Images


def _image_list(images) -> list[np.ndarray]:
    """uint8 [N, H, W, C] (or a sequence of [H, W, C] / [H, W]) -> N RGB [H, W, 3] uint8 arrays."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    elif isinstance(images, np.ndarray) or not isinstance(images, Sequence):
        shape = getattr(images, "shape", None)
        raise ValueError(f"images must be uint8 [N, H, W, 3] (or a list of [H, W, 3] arrays); "
                         f"got {type(images).__name__} with shape {shape}")
    out = []
    for i, image in enumerate(images):
        image = np.asarray(image)
        if image.dtype != np.uint8:
            raise ValueError(f"images[{i}] has dtype {image.dtype}; CLIP scoring takes uint8 "
                             "pixels in [0, 255]")
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3 or image.shape[-1] not in (1, 3):
            raise ValueError(f"images[{i}] has shape {image.shape}; expected [H, W, 3] or "
                             "[H, W, 1] (grey)")
        # Grey -> RGB by repetition, as the processor's convert_rgb (PIL "L" -> "RGB") does.
        out.append(np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image)
    return out


@dataclasses.dataclass(frozen=True)
class ImagePreprocessor:
    """transformers' ``CLIPImageProcessor`` steps, in numpy and PIL.

    Resize so the shorter side is ``shortest_edge`` (the longer ``int(shortest_edge * long /
    short)``) with PIL ``resample``, crop the centre ``crop_size`` (top = (H - h) // 2), then
    ``(x * rescale_factor - mean) / std`` in float32. Equal to the PIL backend
    (``CLIPImageProcessorPil``) up to float rounding; the torchvision backend resizes uint8
    tensors slightly differently (a pixel level or so).
    """
    shortest_edge: int = 224
    crop_size: tuple[int, int] = (224, 224)
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = PIL_BICUBIC

    def __post_init__(self):
        if any(c > self.shortest_edge for c in self.crop_size):
            raise ValueError(f"crop_size={self.crop_size} is larger than shortest_edge="
                             f"{self.shortest_edge}; the crop must fit in the resized image")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(f"image_mean={self.image_mean} and image_std={self.image_std} need "
                             "3 values (RGB)")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "ImagePreprocessor":
        """From a ``preprocessor_config.json`` dict (``size``, ``crop_size``, ``image_mean``,
        ``image_std``, ``rescale_factor``, ``resample``; missing keys take CLIP's defaults)."""
        size, crop = config.get("size", 224), config.get("crop_size", 224)
        if isinstance(size, Mapping):
            if "shortest_edge" not in size:
                raise ValueError(f"preprocessor config size={size}: only {{'shortest_edge': n}} "
                                 "(CLIP's resize) is supported")
            size = size["shortest_edge"]
        crop = (crop["height"], crop["width"]) if isinstance(crop, Mapping) else (crop, crop)
        for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
            if config.get(key) is False:
                raise ValueError(f"preprocessor config {key}=false is not supported (CLIP "
                                 "resizes, crops, rescales and normalises)")
        return cls(int(size), (int(crop[0]), int(crop[1])),
                   tuple(float(v) for v in config.get("image_mean", OPENAI_CLIP_MEAN)),
                   tuple(float(v) for v in config.get("image_std", OPENAI_CLIP_STD)),
                   float(config.get("rescale_factor", 1 / 255)),
                   int(config.get("resample", PIL_BICUBIC)))

    def resize_and_crop(self, image: np.ndarray) -> np.ndarray:
        """One uint8 [H, W, 3] image -> uint8 [crop_h, crop_w, 3]."""
        from PIL import Image

        h, w = image.shape[:2]
        short, long = min(h, w), max(h, w)
        new_long = int(self.shortest_edge * long / short)  # truncation, as transformers
        new_h, new_w = (new_long, self.shortest_edge) if w <= h else (self.shortest_edge, new_long)
        if (new_h, new_w) != (h, w):
            image = np.asarray(Image.fromarray(image).resize((new_w, new_h),
                                                             resample=self.resample))
        ch, cw = self.crop_size
        top, left = (new_h - ch) // 2, (new_w - cw) // 2
        return image[top:top + ch, left:left + cw]

    def __call__(self, images) -> np.ndarray:
        """uint8 [N, H, W, 3] (or a list of [H, W, 3]; sizes may differ) -> float32 [N, h, w, 3]."""
        crops = np.stack([self.resize_and_crop(im) for im in _image_list(images)])
        # transformers rescales in float64 then casts, and normalises in float32.
        x = (crops.astype(np.float64) * self.rescale_factor).astype(np.float32)
        return (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std,
                                                                         np.float32)


# ---------------------------------------------------------------------------------------------
# Reading a checkpoint folder


def _load_torch_bin(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise FileNotFoundError(
            f"{path.parent} holds only {path.name}, a PyTorch pickle, and torch is not installed; "
            "re-save the model with safe_serialization=True (model.safetensors)") from None
    try:
        # weights_only: tensors only, never arbitrary unpickling.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read {path} with torch.load(weights_only=True) "
                         f"({type(e).__name__}: {e})") from None
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in state.items() if isinstance(v, torch.Tensor)}


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """A local transformers CLIPModel folder -> ``(config.json dict, state dict of numpy arrays)``.

    Weights come from ``model.safetensors``, its shards (``model.safetensors.index.json``), or,
    only where torch is importable, ``pytorch_model.bin`` (``torch.load(weights_only=True)``).
    Raises FileNotFoundError naming the missing folder or file.
    """
    folder = pathlib.Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"CLIP checkpoint {os.fspath(path)!r}: no such folder; expected "
                                f"{_EXPECTED}")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"CLIP checkpoint: missing {folder / 'config.json'}; expected "
                                f"{_EXPECTED}")
    config = read_json(folder / "config.json")
    found = read_safetensors_weights(folder, "model.safetensors")
    if found is not None:
        return config, found[0]
    if (folder / "pytorch_model.bin").is_file():
        return config, _load_torch_bin(folder / "pytorch_model.bin")
    raise FileNotFoundError(f"CLIP checkpoint: missing {folder / 'model.safetensors'} (nor shards, nor "
                            f"pytorch_model.bin); expected {_EXPECTED}")


def _folder_tokenizer(folder: pathlib.Path, max_length: int):
    """The folder's own tokenizer files if it has them, else the CLIP vocabulary we ship."""
    has_files = (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())
    if not has_files:
        return make_tokenizer(max_length)
    from transformers import CLIPTokenizer  # deferred: importing transformers takes seconds

    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


# ---------------------------------------------------------------------------------------------
# The scorer


def _pad_to(x: np.ndarray, n: int) -> np.ndarray:
    # Repeat the last row so every batch has one shape (one compilation) and valid content.
    return x if len(x) == n else np.concatenate([x, np.repeat(x[-1:], n - len(x), axis=0)])


class CLIPScorer:
    """CLIP's text tower, vision tower, projections, tokenizer and image preprocessing.

    ``image_embeds(images)`` and ``text_embeds(prompts)`` give L2-normalised projected embeddings
    (transformers' ``CLIPOutput.image_embeds`` / ``text_embeds``); ``score(images, prompts)`` the
    per-pair CLIP score and ``clip_score`` its mean. Inputs run in fixed batches of
    ``batch_size`` (the last one padded), so each tower compiles once.
    """

    def __init__(self, model: CLIPDualEncoder, params: Mapping, tokenizer=None,
                 preprocessor: ImagePreprocessor | None = None, batch_size: int = 32):
        vision, text = model.vision_model, model.text_model
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.model, self.batch_size = model, int(batch_size)
        self.params = jax.device_put(params)
        self.max_length = text.max_position_embeddings
        self.tokenizer = tokenizer if tokenizer is not None else make_tokenizer(self.max_length)
        self.preprocessor = preprocessor or ImagePreprocessor(
            vision.image_size, (vision.image_size, vision.image_size))
        if self.preprocessor.crop_size != (vision.image_size, vision.image_size):
            raise ValueError(f"preprocessor crop_size={self.preprocessor.crop_size} does not match "
                             f"the vision tower's image_size={vision.image_size}")

        def embed(method):
            return jax.jit(lambda p, x: l2_normalize(model.apply({"params": p}, x, method=method)))
        self._image_fn = embed(CLIPDualEncoder.image_features)
        self._text_fn = embed(CLIPDualEncoder.text_features)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, batch_size: int = 32,
                        dtype=jnp.float32) -> "CLIPScorer":
        """Load a local transformers ``CLIPModel`` folder (see ``read_checkpoint``).

        The tokenizer comes from the folder's ``vocab.json`` + ``merges.txt`` or
        ``tokenizer.json`` when present, else it is the CLIP vocabulary shipped with ldm_jax
        (the same for OpenAI's checkpoints); ``preprocessor_config.json``, when present, sets the
        image preprocessing. ``dtype`` is the towers' activation dtype.
        """
        config, state_dict = read_checkpoint(path)
        folder = pathlib.Path(path).expanduser()
        try:
            kwargs = clip_kwargs_from_config(config)
        except ValueError as e:
            raise ValueError(f"{folder / 'config.json'}: {e}") from None
        try:
            params = clip_params_from_state_dict(state_dict, kwargs)
        except ValueError as e:
            raise ValueError(f"CLIP checkpoint {folder}: {e}") from None
        preprocessor = None
        if (folder / "preprocessor_config.json").is_file():
            preprocessor = ImagePreprocessor.from_config(
                read_json(folder / "preprocessor_config.json"))
        tokenizer = _folder_tokenizer(folder, kwargs["text"]["max_position_embeddings"])
        return cls(make_clip(kwargs, dtype), params, tokenizer, preprocessor, batch_size)

    def _batched(self, fn: Callable, items: Sequence, prepare: Callable) -> np.ndarray:
        out = []
        for start in range(0, len(items), self.batch_size):
            chunk = prepare(items[start:start + self.batch_size])
            out.append(np.asarray(fn(self.params, _pad_to(chunk, self.batch_size)))[:len(chunk)])
        if not out:
            return np.zeros((0, self.model.projection_dim), np.float32)
        return np.concatenate(out)

    def image_embeds(self, images) -> np.ndarray:
        """uint8 [N, H, W, 3] (any size; or a list of such images) -> float32 [N, projection_dim],
        unit norm."""
        return self._batched(self._image_fn, _image_list(images), self.preprocessor)

    def text_embeds(self, prompts: Sequence[str]) -> np.ndarray:
        """N prompts -> float32 [N, projection_dim], unit norm. Prompts longer than the context
        are truncated, with a warning."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a list of strings; got {type(prompts).__name__} "
                             f"{str(prompts)[:80]}")
        return self._batched(self._text_fn, [str(p) for p in prompts],  # np.str_ -> str
                             lambda chunk: tokenize(self.tokenizer, chunk, self.max_length))

    def score(self, images, prompts: Sequence[str]) -> np.ndarray:
        """CLIP score of each image with its prompt: float32 [N], ``100 * max(cos, 0)``."""
        images = _image_list(images)
        if isinstance(prompts, str) or len(prompts) != len(images):
            n = "a str" if isinstance(prompts, str) else f"{len(prompts)} prompts"
            raise ValueError(f"score needs one prompt per image: got {len(images)} images and {n}")
        cos = np.sum(self.image_embeds(images) * self.text_embeds(prompts), axis=-1)
        return 100.0 * np.maximum(cos, 0.0)

    def clip_score(self, images, prompts: Sequence[str]) -> float:
        """Mean CLIP score over the pairs (torchmetrics' ``CLIPScore``)."""
        return float(np.mean(self.score(images, prompts)))
