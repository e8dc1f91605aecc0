"""A tiny version of configs/base_discrete.py for the training tests (compiles in seconds on CPU),
and the cheap compilation the end-to-end training tests run under."""
import contextlib
import os

import ml_collections

from tests.sizes import SMALL_SHAPES

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# One level (no down/upsampling) compiles in half the time of tiny_config's two: for the tests of
# what surrounds the UNet (stage paths, the command line).
TINY_UNET = dict(block_out_channels=(16,), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",),
                 up_block_types=("CrossAttnUpBlock2D",), num_attention_heads=2, cross_attention_dim=16,
                 norm_num_groups=8, dropout=0.0)


def load_base() -> ml_collections.ConfigDict:
    """configs/base_discrete.py: base.py with the discrete eps + min-SNR diffusion these tests (and
    the stored-config fixtures) were written for; tests/training/test_process_runs.py trains
    base.py's rectified flow through the same loop."""
    from ldm_jax.config import load_config

    return load_config(os.path.join(ROOT, "configs", "base_discrete.py"))


def tiny_config(data_dir: str, ae_steps: int = 4, ldm_steps: int = 4) -> ml_collections.ConfigDict:
    c = load_base()
    c.data.data_dir = data_dir
    c.data.batch_size = 8
    c.data.options = dict(SMALL_SHAPES)
    c.autoencoder.model = dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
                               norm_num_groups=8, mid_block_add_attention=False)
    c.autoencoder.steps = ae_steps
    c.autoencoder.batch_size = 8
    c.autoencoder.optim.warmup_steps = 0
    c.text_encoder.model = dict(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, max_position_embeddings=16, hidden_act="quick_gelu")
    c.unet = dict(block_out_channels=(16, 32), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                  num_attention_heads=2, cross_attention_dim=16, norm_num_groups=8, dropout=0.0)
    c.optim.warmup_steps = 0
    c.optim.schedule = "constant"  # the tests stop runs early by lowering train.steps, which moves a cosine schedule
    c.sampler.num_steps = 3
    c.train.steps = ldm_steps
    c.train.log_every = 2
    c.train.checkpoint_every = 2
    c.train.sample_every = 1000
    c.train.sample_prompts = ("a red circle on the left", "a blue square at the top")
    c.eval.num_samples = 8
    return c


# XLA's CPU backend at its cheapest (no LLVM optimisation, XLA's generic emitters): the same
# arithmetic in slower machine code, which a few steps of a tiny model do not notice; it compiles
# in a fraction of the time.
CHEAP_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
                 "xla_cpu_use_fusion_emitters": False}


@contextlib.contextmanager
def cheap_programs():
    """Within: the training loop's steps and samplers and the pipelines built here compile with
    CHEAP_COMPILE over the library's own options (ldm_jax.runtime.xla_options, which both read when
    they jit). Random streams are untouched: for parity tests, which compare numbers, not code."""
    from ldm_jax.runtime import xla_options

    options = {**(xla_options.compiler_options() or {}), **CHEAP_COMPILE}
    original = xla_options.compiler_options
    xla_options.compiler_options = lambda: dict(options)
    try:
        yield
    finally:
        xla_options.compiler_options = original


@contextlib.contextmanager
def cheap_compilation():
    """Within: `cheap_programs`, and `jax.random.PRNGKey` makes "rbg" keys, whose parameter
    initialisation compiles several times faster than threefry's (one RngBitGenerator op per draw
    instead of threefry's rounds of integer arithmetic). For the end-to-end training tests, which
    check the loop (stages, checkpoints, resumption, devices) and what reads its runs, not the
    machine code or which random stream initialised the weights. On one CPU core,
    train_and_evaluate(tiny_config) takes 68 CPU-seconds instead of 149."""
    import jax

    impl = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", "rbg")
    try:
        with cheap_programs():
            yield
    finally:
        jax.config.update("jax_default_prng_impl", impl)


def cheap_compilation_env(env: dict) -> dict:
    """`env` for a training subprocess (the CLI) with the same cheap compilation as
    `cheap_compilation`, set through XLA_FLAGS (for every program it compiles) and JAX's
    environment variables."""
    flags = " ".join(f"--{k}={str(v).lower()}" for k, v in CHEAP_COMPILE.items())
    return dict(env, XLA_FLAGS=f"{env.get('XLA_FLAGS', '')} {flags}".strip(), JAX_DEFAULT_PRNG_IMPL="rbg")
