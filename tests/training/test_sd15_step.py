"""One real training step of configs/sd15.py's latent-diffusion stage, at tiny resolution.

tests/training/test_config.py checks the full-size networks' parameter counts with
`jax.eval_shape` only (the 859.5M-parameter UNet's float32 parameters, EMA, AdamW moments and
gradients alone are 17 GB). Here the step runs for real on the sd15 config as it is — the noise schedule,
prediction, objective, bfloat16 activations, rematerialised blocks, AdamW settings, sharded
parameters — with these changes, all of them sizes, none of them structure:

- 64x64 images (8x8x4 latents) and a batch of 4;
- UNet widths / 10: (32, 64, 128, 128) for (320, 640, 1280, 1280), with SD's block types (all
  four levels), 8 heads per level, 32 norm groups and the 768-wide cross-attention, but 1 layer
  per block where SD has 2;
- VAE widths / 4 (same four levels, f8, 4 latent channels, mid-block attention) and a one-layer
  CLIP-L-width text encoder (768 hidden, 12 heads, 77 tokens), both random and frozen, standing in
  for the pretrained ones the config reads from a diffusers folder;
- mesh.fsdp=2 so that shard_params (on in the config) actually splits the parameters, as on a
  multi-device host (the config's docstring: --config.mesh.fsdp=8);
- optim.warmup_steps=0: SD's 10,000-step warm-up starts at learning rate 0, so a single step
  would leave the parameters as they were;
- parameters drawn with numpy (`random_like`) rather than by the jitted linen init (a minute of
  compilation).

Narrower layers do not make the compilation cheaper, fewer do: the step's XLA compilation (the
4-level, rematerialised UNet's backward pass, partitioned over the 2x2 mesh) grows faster than
the program (XLA:CPU builds its thunk graph from pairwise buffer conflicts, and its legacy
kernel emitter walks the whole module for every kernel). So the step compiles with XLA's fusion
emitters on (fewer, larger kernels): on this 2-core machine, alone, 54 s instead of 76 s with
CHEAP_COMPILE as it is (1 layer per block; SD's 2 take more than twice as long).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import config as config_lib
from ldm_jax.models.text_encoder import make_tokenizer, tokenize
from ldm_jax.runtime import sharding
from ldm_jax.training import ldm_stage
from tests.test_pipeline import random_like
from tests.training.tiny import CHEAP_COMPILE, ROOT


SD15_COMPILE = {**CHEAP_COMPILE, "xla_cpu_use_fusion_emitters": True}  # see the module docstring


def tiny_sd15():
    c = config_lib.load_config(os.path.join(ROOT, "configs", "sd15.py"))
    c.data.update(image_size=64, batch_size=4)
    c.unet.block_out_channels = tuple(w // 10 for w in c.unet.block_out_channels)
    c.unet.layers_per_block = 1
    c.autoencoder.model.block_out_channels = tuple(w // 4 for w in c.autoencoder.model.block_out_channels)
    c.text_encoder.model.num_hidden_layers = 1
    c.mesh.fsdp = 2
    c.optim.warmup_steps = 0
    config_lib.validate(c)
    return c


@pytest.mark.slow
def test_sd15_ldm_takes_one_training_step(monkeypatch):
    config = tiny_sd15()
    # What must stay SD 1.5's.
    assert config.unet.block_out_channels == (32, 64, 128, 128)
    assert config.unet.down_block_types == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert config.unet.num_attention_heads == 8 and config.unet.cross_attention_dim == 768
    assert (config.diffusion.schedule, config.diffusion.prediction, config.train.dtype) == (
        "scaled_linear", "eps", "bfloat16")
    assert config.mesh.shard_params and config.autoencoder.scale_factor == 0.18215

    models = ldm_stage.build_models(config)
    assert models.unet.dtype == jnp.bfloat16 and models.unet.remat and not models.train_text_encoder
    assert models.latent_shape == (8, 8, 4)
    size, length = config.data.image_size, config.text_encoder.max_length
    key = jax.random.PRNGKey(config.seed)
    vae_shapes = jax.eval_shape(models.autoencoder.init, key, jnp.zeros((1, size, size, 3)))["params"]
    text_shapes = jax.eval_shape(models.text_encoder.init, key, jnp.zeros((1, length), jnp.int32))["params"]
    frozen = {"autoencoder": random_like(vae_shapes, 1), "text_encoder": random_like(text_shapes, 2),
              "scale": np.float32(config.autoencoder.scale_factor)}

    # As the training loop lays it out: state sharded (fsdp), batch split over every device.
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    assert mesh.shape == {"data": 2, "fsdp": 2}
    init_fn = lambda rng: ldm_stage.init_state(config, models, rng)  # noqa: E731
    shardings = sharding.tree_shardings(jax.eval_shape(init_fn, key), mesh, config.mesh.shard_params)
    unet_shapes = jax.eval_shape(lambda rng: ldm_stage.init_params(config, models, rng), key)
    monkeypatch.setattr(ldm_stage, "init_params", lambda *args: random_like(unet_shapes, 0))
    state = jax.device_put(init_fn(key), shardings)  # the optimiser state, EMA, timestep sampler as the stage makes them
    assert set(state.params) == {"unet"}
    kernel = state.params["unet"]["down_blocks_2"]["attentions_0"]["transformer_blocks_0"]["attn2"]["to_k"]["kernel"]
    assert kernel.shape == (768, 128) and "fsdp" in kernel.sharding.spec  # the 768-wide context, sharded
    before = jax.device_get(state.params)

    rng = np.random.default_rng(0)
    prompts = ["a photograph of an astronaut riding a horse", "a red bicycle", "a lighthouse", ""]
    batch = {"image": rng.uniform(-1, 1, (4, size, size, 3)).astype(np.float32),
             "ids": tokenize(make_tokenizer(length), prompts)}
    batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    frozen = jax.device_put(frozen, sharding.replicated(mesh))
    step = jax.jit(ldm_stage.make_train_step(config, models), donate_argnums=0,
                   out_shardings=(shardings, sharding.replicated(mesh)), compiler_options=SD15_COMPILE)
    state, metrics = step(state, batch, frozen)
    metrics = jax.device_get(metrics)

    assert int(state.step) == 1 and bool(metrics["finite"]) and int(state.nonfinite) == 0
    assert np.isfinite(metrics["loss"]) and 0.0 < metrics["loss"] < 10.0
    after = jax.device_get(state.params)
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))]
    assert all(changed), f"{changed.count(False)} of {len(changed)} parameter arrays did not move"
