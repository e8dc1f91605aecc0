"""LoRA fine-tuning of the model object: the `lora` config group made into the adapters a run trains,
the frozen base they adapt, and the context its loss and its sampler run in (`models.lora` does the
low-rank arithmetic; `interop.lora_weights` the files).

    setup = from_config(config)                      # None unless lora.enabled
    frozen["unet"] = setup.base_unet_params(model)   # lora.base's UNet, frozen
    trainable = {"lora": setup.init(model, rng)}     # {"unet": ..., "text_encoder": ...}, B = 0
    with applied(setup, params, rng, train=True):    # the UNet / text encoder add scale * dropout(x) A B
        terms = model.loss_terms(params, ...)
    params = setup.merged(params, params["lora"])     # W + scale A B: a LoRA run as a plain model
    setup.export(folder, adapters, model)            # pytorch_lora_weights.safetensors, diffusers' format
"""
from __future__ import annotations

import contextlib
import dataclasses
import os

import jax
import jax.numpy as jnp

from ldm_jax.interop import lora_weights
from ldm_jax.models import lora

# The key of the LoRA dropout's stream: folded into the step's key, so that runs without LoRA keep
# their random streams bit for bit.
DROPOUT_STREAM = 0x10AA


@dataclasses.dataclass(frozen=True)
class LoraSetup:
    """A run's `lora` group (see configs/base.py): `base` is the diffusers folder whose UNet is adapted;
    text_encoder_targets is None when the text encoder is not."""

    base: str
    rank: int
    alpha: float
    dropout: float
    a_init: str  # lora.init: how A starts ("kaiming" | "gaussian")
    unet_targets: tuple[str, ...]
    text_encoder_targets: tuple[str, ...] | None

    @property
    def scale(self) -> float:
        """alpha / rank, the factor on every adapter's A B."""
        return self.alpha / self.rank

    def network_shapes(self, model) -> dict:
        """{"unet", and "text_encoder" when adapted: the parameter shapes} of the model's networks."""
        key = jax.random.PRNGKey(0)
        h, w, c = model.latent_shape
        length = model.conditioning.context_length
        context = jax.ShapeDtypeStruct((1, length, model.unet.cross_attention_dim), jnp.float32)
        shapes = {"unet": jax.eval_shape(model.unet.init, key, jax.ShapeDtypeStruct((1, h, w, c), jnp.float32),
                                         jax.ShapeDtypeStruct((1,), jnp.float32), context)["params"]}
        if self.text_encoder_targets is not None:
            ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
            shapes["text_encoder"] = jax.eval_shape(model.text_encoder.init, key, ids)["params"]
        return shapes

    def targets(self, model, shapes: dict | None = None) -> dict:
        """{network: the parameter paths of its adapted layers} (`shapes`: `network_shapes`'s, if at hand)."""
        shapes = shapes or self.network_shapes(model)
        out = {"unet": lora_weights.target_paths(shapes["unet"], self.unet_targets)}
        if self.text_encoder_targets is not None:
            out["text_encoder"] = lora_weights.target_paths(shapes["text_encoder"], self.text_encoder_targets)
        return out

    def init(self, model, rng) -> dict:
        """Fresh adapters ({"unet", "text_encoder"?}); B = 0, so the model starts as the base. Traceable."""
        shapes = self.network_shapes(model)
        paths = self.targets(model, shapes)
        keys = jax.random.split(rng, len(paths))
        return {net: lora.init_adapters(k, shapes[net], paths[net], self.rank, self.a_init)
                for k, net in zip(keys, sorted(paths))}

    def base_unet_params(self, model) -> dict:
        """The frozen UNet of `base` (numpy), checked against the model's UNet: ValueError naming the
        folder and the first parameter that differs."""
        from ldm_jax.interop import diffusers as hf
        from ldm_jax.runs.workdir import check_param_shapes

        params = hf.load_diffusers_dir(self.base).unet_params
        check_param_shapes(params, self.network_shapes(model)["unet"], f"lora.base {self.base}'s UNet")
        return params

    def merged(self, params: dict, adapters: dict) -> dict:
        """`params` with the adapters merged into their networks (W + scale A B; numpy kernels)."""
        out = dict(params)
        for net, tree in adapters.items():
            out[net] = lora.merge(jax.device_get(params[net]), tree, self.scale)
        return out

    def export(self, folder: str, adapters: dict, model):
        """Write `adapters` (of `model`'s networks) to folder/pytorch_lora_weights.safetensors (with
        alpha), which diffusers' ``pipe.load_lora_weights(folder)`` and `LatentDiffusionPipeline.with_lora` read."""
        return lora_weights.save_lora_weights(folder, jax.device_get(adapters), alpha=self.alpha,
                                              params=self.network_shapes(model))


def from_config(config) -> LoraSetup | None:
    """The run's LoRA setup, or None when lora.enabled is False (validated by `config.validate`)."""
    lo = config.get("lora")
    if lo is None or not lo.enabled:
        return None
    return LoraSetup(base=os.path.expanduser(lo.base.split(":", 1)[1]), rank=int(lo.rank), alpha=float(lo.alpha),
                     dropout=float(lo.dropout), a_init=str(lo.init), unet_targets=tuple(lo.unet_targets),
                     text_encoder_targets=tuple(lo.text_encoder_targets) if lo.text_encoder else None)


def applied(setup: LoraSetup | None, params: dict, rng=None, train: bool = False):
    """The context a loss or a sampler traces in: `params["lora"]`'s adapters added to the networks'
    layers (dropout when `train`, from `rng`); nothing without a setup."""
    if setup is None:
        return contextlib.nullcontext()
    dropout = setup.dropout if train else 0.0
    key = jax.random.fold_in(rng, DROPOUT_STREAM) if dropout else None
    return lora.adapted(params["lora"], setup.scale, dropout=dropout, rng=key)
