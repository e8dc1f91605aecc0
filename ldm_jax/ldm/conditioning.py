"""What the UNet is conditioned on: text (a CLIP-architecture encoder), a class label (LDM's
ClassEmbedder: one learned context token per class) or nothing.

A conditioning object turns host-side prompts or labels into condition arrays (token ids [B, L] or
labels [B]), those into the UNet's cross-attention context [B, L, D] (jittable), and knows its null
condition (classifier-free guidance's "unconditional" side, and what training drops the condition
to). `make_conditioning(config)` is the one place that reads `conditioning.kind`; a new kind is a
new class here and one entry in `KINDS`.
"""
from __future__ import annotations

import abc
import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import config as config_lib
from ldm_jax.models.text_encoder import CLIPTextEncoder, make_tokenizer, tokenize


class Conditioning(abc.ABC):
    """The interface (see the module docstring). Parameters live in the model's params dict under
    `param_keys`; `batch_key` is the data field holding the condition (None: nothing to read)."""

    kind: ClassVar[str]
    batch_key: ClassVar[str | None]
    guided: ClassVar[bool] = True  # sampling applies classifier-free guidance
    # Which of the three streams of `LatentDiffusion.init_params`' rng this conditioning's fresh
    # parameters draw from (0 is the UNet's): unchanged since the first runs, so they initialise alike.
    rng_stream: ClassVar[int] = 1
    context_length: int = 1

    @property
    def param_keys(self) -> tuple[str, ...]:
        return ()

    def init_params(self, rng, dim: int) -> dict:
        """Fresh trainable parameters of the conditioning ({} if it has none)."""
        del rng, dim
        return {}

    @abc.abstractmethod
    def context(self, params, cond) -> jax.Array:
        """cond (ids [B, L] or labels [B]) -> context [B, L, D] for the UNet's cross-attention."""

    @abc.abstractmethod
    def null(self, cond):
        """The null condition, shaped like `cond`."""

    @abc.abstractmethod
    def drop(self, batch: dict, rng, p: float):
        """The batch's condition with each example replaced by the null one with probability p
        (classifier-free guidance training, Ho & Salimans 2022)."""

    @abc.abstractmethod
    def conditions(self, prompts, negative_prompts=None) -> tuple[np.ndarray, np.ndarray]:
        """Host side: (cond, uncond) arrays for a list of prompts (or labels), validated."""

    def grid(self, prompts) -> list:
        """What the training loop's sample grids show for the config's sample prompts."""
        return list(prompts)

    def of_examples(self, examples: dict, idx) -> list:
        """The prompts (or labels) of dataset examples {"image", "caption", "label"} at `idx`:
        what to generate for them, or to condition their bound on."""
        return [0] * len(idx)


def _as_list(prompts) -> list:
    if isinstance(prompts, (str, int, np.integer)):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("the prompt list is empty: give at least one prompt")
    return prompts


@dataclasses.dataclass(frozen=True, eq=False)
class TextConditioning(Conditioning):
    """Prompts through a CLIP-architecture text encoder: context = its last hidden states. The
    encoder is trained with the UNet (`trainable`, params["text_encoder"] among the trainable
    ones) or frozen (a pretrained one, params["text_encoder"] among the frozen ones)."""

    encoder: CLIPTextEncoder
    tokenizer: Any
    max_length: int
    trainable: bool
    kind: ClassVar[str] = "text"
    batch_key: ClassVar[str] = "ids"
    rng_stream: ClassVar[int] = 1

    @property
    def context_length(self) -> int:
        return self.max_length

    @property
    def param_keys(self) -> tuple[str, ...]:
        return ("text_encoder",)

    def of_examples(self, examples, idx):
        return [examples["caption"][i] for i in idx]

    @functools.cached_property
    def empty_ids(self) -> np.ndarray:
        """The tokenized empty prompt [L]: the null condition."""
        return tokenize(self.tokenizer, [""], self.max_length)[0]

    def init_params(self, rng, dim: int) -> dict:
        del dim
        if not self.trainable:
            return {}
        return {"text_encoder": self.encoder.init(rng, jnp.zeros((1, self.max_length), jnp.int32))["params"]}

    def context(self, params, ids):
        return self.encoder.apply({"params": params["text_encoder"]}, ids)[0]

    def null(self, ids):
        return jnp.broadcast_to(jnp.asarray(self.empty_ids), ids.shape)

    def drop(self, batch, rng, p):
        ids = batch["ids"]
        keep = jax.random.bernoulli(rng, 1.0 - p, (ids.shape[0], 1))
        return jnp.where(keep, ids, jnp.asarray(self.empty_ids)[None])

    def conditions(self, prompts, negative_prompts=None):
        prompts = _as_list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"this model is text-conditional: prompts must be strings, got {prompts[:3]!r}")
        if negative_prompts is None:
            negative_prompts = [""] * len(prompts)
        elif isinstance(negative_prompts, str):
            negative_prompts = [negative_prompts] * len(prompts)
        if len(negative_prompts) != len(prompts):
            raise ValueError(f"{len(negative_prompts)} negative prompts for {len(prompts)} prompts")
        return (tokenize(self.tokenizer, prompts, self.max_length),
                tokenize(self.tokenizer, list(negative_prompts), self.max_length))


@dataclasses.dataclass(frozen=True, eq=False)
class ClassConditioning(Conditioning):
    """Class labels in [0, num_classes): context = one learned token per class
    (params["class_embedder"], [num_classes + 1, D]; the last row is the null class)."""

    num_classes: int
    kind: ClassVar[str] = "class"
    batch_key: ClassVar[str] = "label"
    rng_stream: ClassVar[int] = 2

    @property
    def param_keys(self) -> tuple[str, ...]:
        return ("class_embedder",)

    def init_params(self, rng, dim: int) -> dict:
        return {"class_embedder": 0.02 * jax.random.normal(rng, (self.num_classes + 1, dim), jnp.float32)}

    def context(self, params, labels):
        return params["class_embedder"][labels][:, None, :]

    def null(self, labels):
        return jnp.full_like(labels, self.num_classes)

    def drop(self, batch, rng, p):
        labels = batch["label"]
        keep = jax.random.bernoulli(rng, 1.0 - p, labels.shape)
        return jnp.where(keep, labels, self.num_classes)

    def of_examples(self, examples, idx):
        return [int(examples["label"][i]) for i in idx]

    def grid(self, prompts) -> list:
        """One sample per prompt slot, cycling through the real classes (labels past num_classes
        would be the null class, or out of the embedding table)."""
        return [i % self.num_classes for i in range(len(prompts))]

    def conditions(self, prompts, negative_prompts=None):
        del negative_prompts
        labels = _as_list(prompts)
        if not all(isinstance(p, (int, np.integer)) for p in labels):
            raise ValueError(f"this model is class-conditional: give class labels (ints in [0, "
                             f"{self.num_classes})) instead of prompts, got {labels[:3]!r}")
        bad = [p for p in labels if not 0 <= p < self.num_classes]
        if bad:
            raise ValueError(f"class labels {bad} are outside [0, {self.num_classes})")
        cond = np.asarray(labels, np.int32)
        return cond, np.full_like(cond, self.num_classes)


@dataclasses.dataclass(frozen=True, eq=False)
class Unconditional(Conditioning):
    """No condition: the cross-attention sees one zero token; sampling is unguided. Conditions
    are zeros [B] (only their count matters)."""

    dim: int
    kind: ClassVar[str] = "none"
    batch_key: ClassVar[None] = None
    guided: ClassVar[bool] = False

    def context(self, params, cond):
        return jnp.zeros((cond.shape[0], 1, self.dim), jnp.float32)

    def null(self, cond):
        return cond

    def drop(self, batch, rng, p):
        return jnp.zeros((batch["latents" if "latents" in batch else "image"].shape[0],), jnp.int32)

    def conditions(self, prompts, negative_prompts=None):
        zeros = np.zeros((len(_as_list(prompts)),), np.int32)
        return zeros, zeros


KINDS = ("text", "class", "none")


def make_conditioning(kind: str, *, context_dim: int, text_encoder: CLIPTextEncoder | None = None, tokenizer=None,
                      max_length: int | None = None, train_text_encoder: bool = False,
                      num_classes: int = 0) -> Conditioning:
    """The conditioning named `kind` (the one place that reads the name). Text: `text_encoder`
    with `tokenizer` (default: the CLIP vocabulary's) at `max_length` tokens (default and at most
    the encoder's positions); class: `num_classes` labels; none: a zero token of `context_dim`."""
    if kind == "text":
        length = max_length or text_encoder.max_position_embeddings
        tokenizer = tokenizer or make_tokenizer(length)
        length = int(min(max_length or tokenizer.model_max_length, text_encoder.max_position_embeddings))
        return TextConditioning(text_encoder, tokenizer, length, trainable=bool(train_text_encoder))
    if kind == "class":
        return ClassConditioning(int(num_classes))
    if kind == "none":
        return Unconditional(int(context_dim))
    raise ValueError(f"conditioning={kind!r} is not allowed; allowed: {', '.join(map(repr, KINDS))}")


def conditioning_from_config(config, context_dim: int) -> Conditioning:
    """The conditioning of a training config (`conditioning`, `text_encoder` groups)."""
    return make_conditioning(config.conditioning.kind, context_dim=context_dim,
                             text_encoder=CLIPTextEncoder(**config_lib.text_encoder_kwargs(config)),
                             max_length=int(config.text_encoder.max_length),
                             train_text_encoder=bool(config.text_encoder.train),
                             num_classes=int(config.conditioning.num_classes))
