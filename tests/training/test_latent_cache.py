"""train.cache_latents: the frozen autoencoder's posterior moments for the whole training split,
computed once after stage 1, replace the per-step encoding of each batch (same distribution)."""
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.data import pipeline
from ldm_jax.training import ldm_stage, loop
from tests.models.test_unet import random_params
from tests.training.tiny import tiny_config


def test_cached_moments_give_the_latents_the_step_would_encode(shapes_dir):
    config = tiny_config(shapes_dir)
    models = ldm_stage.build_models(config)
    ae = random_params(models.autoencoder, jnp.zeros((1, 32, 32, 3)), method="encode")
    data = loop.data_config(config)
    source = pipeline.load_source(data)
    table = ldm_stage.encode_split(models, ae, source, data, batch_size=256)
    h, w, c = models.latent_shape
    assert table.shape == (len(source), h, w, 2 * c) and table.dtype == np.float32  # [mean, logvar]

    # The batches carry the table's rows for their records, and no decoded images.
    batch = next(pipeline.make_batches(data, None, process_index=0, process_count=1, latents=table))
    assert "image" not in batch
    np.testing.assert_array_equal(batch["latents"], table[batch["index"]])

    # A sample drawn from a cached row is the sample the step draws from the encoded image.
    images = next(pipeline.make_batches(data, None, process_index=0, process_count=1))
    frozen = {"autoencoder": ae, "scale": np.float32(0.7)}
    rng = jax.random.PRNGKey(3)
    direct = ldm_stage.encode_latents(models, frozen, jnp.asarray(images["image"]), rng)
    cached = ldm_stage.cached_latents(models, frozen, jnp.asarray(table[images["index"]]), rng)
    np.testing.assert_allclose(cached, direct, rtol=1e-4, atol=1e-5)


def test_no_table_beyond_the_memory_limit(shapes_dir, monkeypatch):
    config = tiny_config(shapes_dir)
    models = ldm_stage.build_models(config)
    data = loop.data_config(config)
    monkeypatch.setattr(ldm_stage, "CACHE_LIMIT_BYTES", 1000)
    assert ldm_stage.encode_split(models, {}, pipeline.load_source(data), data) is None
