"""Configs: every configs/*.py loads and validates; overrides; each class of mistake fails in
`validate` with the dotted key (and, for names, the allowed values); the derived UNet arguments;
the SD 1.5 config's networks have SD 1.5's parameter counts."""
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import config as config_lib
from ldm_jax.models.text_encoder import CLIPTextEncoder
from ldm_jax.models.unet import UNet
from ldm_jax.training import autoencoder_stage

CONFIGS = sorted((pathlib.Path(__file__).parents[2] / "configs").glob("*.py"))
BASE = CONFIGS[[p.name for p in CONFIGS].index("base.py")]


def load(name="base_discrete.py", overrides=()):
    """The discrete recipe by default: every diffusion key's full set of choices applies to it."""
    return config_lib.load_config(BASE.with_name(name), overrides)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_validates(path):
    config = config_lib.load_config(path)
    config_lib.validate(config)
    assert "python -m ldm_jax.train --config configs/" + path.name in path.read_text()  # the command


def test_overrides_are_python_literals_or_strings():
    config = load(overrides=["optim.lr=1e-4", "diffusion.schedule='cosine'", "sampler.name=ddim",
                             "unet.block_out_channels=(32, 64, 96)", "data.label_key=label",
                             "diffusion.zero_terminal_snr=False", "data.options.train_size=100",
                             "text_encoder.source=diffusers:/models/sd15"])
    assert config.optim.lr == 1e-4 and config.diffusion.schedule == "cosine"
    assert config.sampler.name == "ddim" and config.unet.block_out_channels == (32, 64, 96)
    assert config.data.label_key == "label" and config.data.options.train_size == 100
    assert config.text_encoder.source == "diffusers:/models/sd15"
    config.text_encoder.train = True
    config_lib.validate(config)


@pytest.mark.parametrize("override, message", [
    ("optim.learning_rate=1e-4", "optim.learning_rate"),
    ("optimizer.lr=1e-4", "optimizer"),
    ("unet.block_out_channels.x=1", "unet.block_out_channels.x"),
    ("optim.lr=fast", "optim.lr"),
    ("train.steps=1.5", "train.steps"),
    ("optim.lr", "key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        load(overrides=[override])


def _set(path, value):
    def mutate(c):
        *parents, last = path.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[last] = value
    return mutate


def _replace_in(group, **values):
    """Rebuild a group (a per-level tuple where base has an int is a type change ConfigDict's
    attribute assignment refuses)."""
    def mutate(c):
        c[group] = {**c[group].to_dict(), **values}
    return mutate


def _delete(path):
    def mutate(c):
        group, key = path.split(".")
        del c[group][key]
    return mutate


def _apply(*mutations):
    def mutate(c):
        for m in mutations:
            m(c)
    return mutate


NAMES = [  # (key, bad value, one allowed value that the message must list)
    ("diffusion.schedule", "quadratic", "'cosine'"),
    ("diffusion.objective", "l2", "'hybrid'"),
    ("diffusion.prediction", "score", "'v'"),
    ("diffusion.variance", "learned", "'learned_range'"),
    ("diffusion.weighting", "p2", "'min_snr'"),
    ("diffusion.timestep_sampler", "lognormal", "'importance'"),
    ("sampler.name", "lms", "'dpm_solver++'"),
    ("sampler.spacing", "even", "'trailing'"),
    ("autoencoder.kind", "vqgan", "'identity'"),
    ("autoencoder.source", "hub:stabilityai/sd-vae", "'workdir:<path>'"),
    ("autoencoder.source", "diffusers:", "'diffusers:<path>'"),
    ("text_encoder.source", "openai", "'diffusers:<path>'"),
    ("conditioning.kind", "image", "'none'"),
    ("optim.schedule", "linear", "'cosine'"),
    ("autoencoder.optim.schedule", "step", "'constant'"),
    ("train.dtype", "float16", "'bfloat16'"),
    ("text_encoder.model.hidden_act", "relu", "'quick_gelu'"),
    ("unet.down_block_types", ("CrossAttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"), "'DownBlock2D'"),
]


@pytest.mark.parametrize("key, value, allowed", NAMES, ids=[f"{k}={v}" for k, v, _ in NAMES])
def test_unknown_names_list_the_allowed_values(key, value, allowed):
    config = load()
    _set(key, value)(config)
    with pytest.raises(ValueError) as e:
        config_lib.validate(config)
    assert key in str(e.value) and allowed in str(e.value), str(e.value)


BAD = {  # id: (mutation of base, substrings the message must contain)
    # unknown or misplaced keys
    "unet_unknown_field": (_set("unet.foo", 1), ["unet.foo", "block_out_channels", "cross_attention_dim"]),
    "optim_unknown_key": (_set("optim.learning_rate", 1e-4), ["optim.learning_rate", "lr, mu_dtype, schedule"]),
    "optim_mu_dtype": (_set("optim.mu_dtype", "float16"), ["optim.mu_dtype", "float16", "'float32', 'bfloat16'"]),
    "text_model_unknown_field": (_set("text_encoder.model.hidden", 8), ["text_encoder.model.hidden", "hidden_size"]),
    "autoencoder_model_unknown_field": (_set("autoencoder.model.foo", 1), ["autoencoder.model", "foo"]),
    "disc_unknown_field": (_set("autoencoder.disc.layers", 3), ["autoencoder.disc.layers", "n_layers"]),
    "data_unknown_field": (_set("data.resolution", 64), ["data.resolution", "image_size"]),
    "unet_dtype_owned_by_train": (_set("unet.dtype", "bfloat16"), ["unet.dtype", "train.dtype"]),
    "data_max_length_owned_by_text": (_set("data.max_length", 77), ["data.max_length", "text_encoder.max_length"]),
    "missing_key": (_delete("train.remat"), ["train.remat", "missing"]),
    "unknown_group": (_set("model", {}), ["unknown key model", "unet"]),
    "data_name_empty": (_set("data.name", ""), ["data.name", "shapes"]),
    "stages_unknown": (_set("stages", ("autoencoder", "sampling")), ["stages", "'ldm'"]),
    # impossible shapes
    "unet_norm_groups": (_set("unet.norm_num_groups", 24), ["unet.norm_num_groups", "entry 32"]),
    "unet_heads": (_set("unet.num_attention_heads", 3), ["unet.num_attention_heads", "entry 32"]),
    "unet_heads_per_level": (_replace_in("unet", num_attention_heads=(4, 4)),
                             ["unet.num_attention_heads", "(3)"]),
    "unet_block_types_length": (_set("unet.up_block_types", ("UpBlock2D",)), ["unet.up_block_types", "3"]),
    "text_heads": (_set("text_encoder.model.num_attention_heads", 5), ["text_encoder.model.num_attention_heads", "128"]),
    "autoencoder_norm_groups": (_set("autoencoder.model.norm_num_groups", 24), ["autoencoder.model", "norm_num_groups"]),
    "image_size_vs_autoencoder": (_set("data.image_size", 30), ["data.image_size", "4"]),
    "latent_size_vs_unet": (_set("data.image_size", 36), ["unet.block_out_channels", "9x9"]),
    "unet_in_channels": (_set("unet.in_channels", 3), ["unet.in_channels", "4"]),
    "unet_out_channels_learned_range": (
        _apply(_set("diffusion.variance", "learned_range"), _set("unet.out_channels", 4)),
        ["unet.out_channels", "8", "learned_range"]),
    "context_width": (_set("unet.cross_attention_dim", 64), ["unet.cross_attention_dim", "text_encoder.model.hidden_size"]),
    "text_length": (_set("text_encoder.max_length", 32), ["text_encoder.max_length", "max_position_embeddings=16"]),
    # contradictory choices
    "class_without_classes": (_set("conditioning.kind", "class"), ["conditioning.num_classes"]),
    "class_without_label_key": (_apply(_set("conditioning.kind", "class"), _set("conditioning.num_classes", 10)),
                                ["data.label_key"]),
    "hybrid_needs_learned_range": (_set("diffusion.objective", "hybrid"), ["diffusion.variance", "learned_range"]),
    "zero_terminal_snr_with_eps": (_set("diffusion.zero_terminal_snr", True), ["diffusion.prediction", "'v'"]),
    "importance_needs_bound": (_set("diffusion.timestep_sampler", "importance"), ["diffusion.timestep_sampler", "vlb"]),
    "identity_autoencoder_stage": (_set("autoencoder.kind", "identity"), ["stages", "identity"]),
    "guidance_without_condition": (_set("conditioning.kind", "none"), ["sampler.guidance_scale", "1.0"]),
    "sampler_steps": (_set("sampler.num_steps", 2000), ["sampler.num_steps", "1000"]),
    "schedule_kwargs": (_set("diffusion.schedule_kwargs", {"s": 0.01}), ["diffusion.schedule_kwargs", "scaled_linear"]),
    "frozen_scratch_text_encoder": (_set("text_encoder.train", False), ["text_encoder.train", "scratch"]),
    "mesh_fsdp": (_set("mesh.fsdp", 0), ["mesh.fsdp"]),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_config_names_the_key(name):
    mutate, substrings = BAD[name]
    config = load()
    mutate(config)
    with pytest.raises(ValueError) as e:
        config_lib.validate(config)
    for s in substrings:
        assert s in str(e.value), f"{s!r} not in {str(e.value)!r}"


def test_fixes_make_the_same_configs_valid():
    """The contradictions above are fixed by the keys their messages name."""
    config = load(overrides=["diffusion.objective=hybrid", "diffusion.variance=learned_range",
                             "diffusion.timestep_sampler=importance", "diffusion.zero_terminal_snr=True",
                             "diffusion.prediction=v", "unet.out_channels=8", "unet.in_channels=4",
                             "conditioning.kind=class", "conditioning.num_classes=10", "data.label_key=label",
                             "unet.cross_attention_dim=64"])  # class conditioning: any context width
    config_lib.validate(config)
    assert config_lib.unet_kwargs(config)["out_channels"] == 8


def test_unet_checks_only_when_the_ldm_stage_runs():
    config = load(overrides=["stages=('autoencoder',)", "unet.norm_num_groups=24"])
    config_lib.validate(config)


def test_derived_unet_arguments():
    base = config_lib.unet_kwargs(load())
    assert (base["in_channels"], base["out_channels"], base["sample_size"]) == (4, 4, 8)
    assert base["dtype"] == jnp.float32 and base["remat"] is False
    pixel = load("pixel_ddpm.py")
    kwargs = config_lib.unet_kwargs(pixel)
    assert (kwargs["in_channels"], kwargs["out_channels"], kwargs["sample_size"]) == (3, 6, 32)
    assert config_lib.latent_shape(pixel) == (32, 32, 3)
    assert config_lib.likelihood_decoder(pixel) == "discretized"
    assert config_lib.likelihood_decoder(load()) == "continuous"


def count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_sd15_config_is_sd15():
    """The config's UNet, VAE and text encoder arguments give SD 1.5's parameter counts
    (shapes only, nothing allocated)."""
    config = load("sd15.py")
    assert config_lib.latent_shape(config) == (64, 64, 4)
    unet = UNet(**config_lib.unet_kwargs(config))
    assert unet.dtype == jnp.bfloat16 and unet.remat
    shapes = jax.eval_shape(unet.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 4)), jnp.zeros((1,)),
                            jnp.zeros((1, 77, 768)))
    assert count(shapes["params"]) == 859_520_964

    vae = autoencoder_stage.make_autoencoder(config.autoencoder, config.data.image_size)
    shapes = jax.eval_shape(vae.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    assert count(shapes["params"]) == 83_653_863

    text = CLIPTextEncoder(**config_lib.text_encoder_kwargs(config))
    shapes = jax.eval_shape(text.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 77), jnp.int32))
    assert count(shapes["params"]) == 123_060_480


def test_loading_a_config_file_writes_nothing_beside_it(tmp_path, monkeypatch):
    """A config file in a run's folder (convert writes one) is executed without a __pycache__
    beside it, whatever PYTHONDONTWRITEBYTECODE says."""
    import sys

    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    path = tmp_path / "my_config.py"
    path.write_text("from ldm_jax import config as config_lib\n\n\n"
                    "def get_config():\n    return config_lib.load_config(config_lib.BASE_CONFIG)\n")
    assert config_lib.load_config(str(path)).seed == 0
    assert sorted(os.listdir(tmp_path)) == ["my_config.py"] and sys.dont_write_bytecode is False
