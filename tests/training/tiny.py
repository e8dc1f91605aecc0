"""A tiny version of configs/base.py for the training tests (compiles in seconds on CPU)."""
import importlib.util
import os

import ml_collections

from tests.sizes import SMALL_SHAPES

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_base() -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("base_config", os.path.join(ROOT, "configs", "base.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


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
