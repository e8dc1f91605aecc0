"""Stage 1 (autoencoder training): the hinge and adaptive-weight formulas against hand values and an
independent jax.grad, the discriminator switching on at `disc_start` (untouched before), the step
reducing the reconstruction loss on rendered shapes, non-finite steps skipped whole, the LPIPS
perceptual term (frozen, from a weights file) against an independent computation, the VQ and
identity variants, and the reconstruction-accuracy / scale-factor helpers."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import save_file

from configs.base import get_config
from ldm_jax.config.modules import autoencoder_latent_shape
from ldm_jax.data import shapes as shapes_data
from ldm_jax.models import lpips
from ldm_jax.models.autoencoder import DiagonalGaussian
from ldm_jax.training import autoencoder_stage as stage
from tests.models.test_lpips import TINY as LPIPS_TINY
from tests.models.test_lpips import random_state_dict

SIZE = 32
TINY_KL = dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
               norm_num_groups=8, mid_block_add_attention=False)
TINY_VQ = dict(block_out_channels=(8,), layers_per_block=1, latent_channels=4,
               norm_num_groups=8)  # the VQ model's mid block always has attention


def key(seed):
    """Typed "rbg" keys for the states: the stage is key-agnostic, and parameter init compiles
    ~3x faster on CPU than with threefry (seconds per model)."""
    return jax.random.key(seed, impl="rbg")


def tiny_config(**autoencoder):
    config = get_config()
    config.data.image_size = SIZE
    ae = config.autoencoder
    ae.model = TINY_KL
    ae.disc = dict(n_layers=1, base_channels=8)
    ae.optim.warmup_steps = 0
    ae.optim.lr = 3e-3
    for key, value in autoencoder.items():
        ae[key] = value
    return config


def rendered_shapes(n, seed=0):
    """n shapes images (uint8 [n, S, S, 3]) with their captions, cycling over the seen combinations."""
    rng = np.random.default_rng(seed)
    combos = [shapes_data.SEEN[(7 * i) % len(shapes_data.SEEN)] for i in range(n)]
    images = np.stack([shapes_data.render(SIZE, *c, rng) for c in combos])
    return images, [shapes_data.caption(*c) for c in combos]


def tree_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def batch():
    images, _ = rendered_shapes(8)
    return {"image": jnp.asarray(images.astype(np.float32) / 127.5 - 1.0),
            "ids": jnp.zeros((8, 16), jnp.int32), "index": jnp.arange(8)}


# ---------------------------------------------------------------------------------------------
# Formulas and config validation (no compilation of models)


def test_hinge_loss_hand_values():
    real, fake = jnp.array([2.0, 0.5, -1.0]), jnp.array([-2.0, 0.0, 3.0])
    # relu(1 - real) = [0, 0.5, 2] (mean 5/6); relu(1 + fake) = [0, 1, 4] (mean 5/3)
    np.testing.assert_allclose(stage.hinge_d_loss(real, fake), 0.5 * (2.5 / 3 + 5 / 3), rtol=1e-6)


def test_adaptive_weight_hand_values():
    rec, gan = jnp.array([[3.0, 4.0]]), jnp.array([[0.0, 2.0]])  # norms 5 and 2
    np.testing.assert_allclose(stage.adaptive_weight(rec, gan, 0.5), 0.5 * 5 / (2 + 1e-4), rtol=1e-6)
    # A vanishing GAN gradient hits the clip (LDM clamps the ratio at 1e4, then scales).
    np.testing.assert_allclose(stage.adaptive_weight(rec, 0 * gan, 0.5), 0.5 * 1e4, rtol=1e-6)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"autoencoder\.kind.*kl, vq, identity"):
        stage.make_autoencoder(dict(kind="vqgan"), SIZE)
    with pytest.raises(ValueError, match=r"autoencoder\.lpips_weights.*not an existing path"):
        stage.make_train_step(tiny_config(lpips_weights="/nonexistent/lpips.safetensors"))
    with pytest.raises(ValueError, match=r"autoencoder\.perceptual_weight"):
        stage.make_train_step(tiny_config(lpips_weights="/", perceptual_weight=-1.0))
    with pytest.raises(ValueError, match="norm_num_groups"):
        stage.make_autoencoder(
            dict(kind="kl", model=dict(block_out_channels=(8, 12), norm_num_groups=8)), SIZE)
    with pytest.raises(ValueError, match="image_size"):
        stage.make_autoencoder(tiny_config().autoencoder, 31)
    with pytest.raises(ValueError, match="layers_per_blok"):
        stage.make_autoencoder(dict(kind="kl", model=dict(layers_per_blok=1)), SIZE)
    with pytest.raises(ValueError, match="identity"):
        stage.make_train_step(tiny_config(kind="identity"))
    with pytest.raises(ValueError, match="mid_block_add_attention"):
        stage.make_autoencoder(tiny_config(kind="vq").autoencoder, SIZE)


def test_latent_shapes():
    assert autoencoder_latent_shape(tiny_config().autoencoder, SIZE) == (16, 16, 4)
    assert autoencoder_latent_shape(get_config().autoencoder, 32) == (8, 8, 4)
    vq = tiny_config(kind="vq", model=TINY_VQ).autoencoder
    assert autoencoder_latent_shape(vq, SIZE) == (SIZE, SIZE, 4)  # one level: no downsampling
    assert autoencoder_latent_shape(tiny_config(kind="identity").autoencoder, SIZE) == (SIZE, SIZE, 3)


# ---------------------------------------------------------------------------------------------
# KL autoencoder with the discriminator switching on at step 1


@pytest.fixture(scope="module")
def gan_run(batch):
    """Three steps (disc off, on, on) of one compiled step; states before each."""
    config = tiny_config(disc_start=1)
    step = jax.jit(stage.make_train_step(config))
    states, metrics = [stage.init_state(config, key(0))], []
    for _ in range(3):
        state, m = step(states[-1], batch)
        states.append(state)
        metrics.append(jax.device_get(m))
    return config, step, states, metrics


def test_discriminator_untouched_before_disc_start(gan_run):
    config, _, states, metrics = gan_run
    ae = config.autoencoder
    assert isinstance(states[0].discriminator, stage.DiscriminatorState) and states[0].extra == {}
    # Step 0 < disc_start: the discriminator's parameters, statistics and optimiser state are
    # bitwise unchanged, and the loss is only reconstruction + KL term.
    assert tree_equal(states[1].discriminator, states[0].discriminator)
    m = metrics[0]
    assert m["g_loss"] == m["d_loss"] == m["adaptive_weight"] == 0.0
    kl_term = ae.kl_weight * m["kl"] / (SIZE * SIZE * 3)
    np.testing.assert_allclose(m["loss"], m["rec_loss"] + kl_term, rtol=1e-6)
    assert not tree_equal(states[1].params, states[0].params)
    # From step 1 on it trains: its parameters and optimiser state move, the GAN term is in the loss.
    for before, after in [(states[1], states[2]), (states[2], states[3])]:
        for key in ("params", "batch_stats", "opt_state"):
            assert not tree_equal(getattr(after.discriminator, key), getattr(before.discriminator, key)), key
    m = metrics[1]
    assert m["adaptive_weight"] > 0 and m["g_loss"] != 0 and m["d_loss"] > 0
    np.testing.assert_allclose(
        m["loss"], m["rec_loss"] + ae.kl_weight * m["kl"] / (SIZE * SIZE * 3)
        + m["adaptive_weight"] * m["g_loss"], rtol=1e-6)


def test_gan_losses_match_an_independent_computation(gan_run, batch):
    """At step 1: rec / g / d losses and the adaptive weight recomputed from the model, the
    last-layer gradients by jax.grad of closures over the full parameter tree."""
    config, _, states, metrics = gan_run
    ae, state, m = config.autoencoder, states[1], metrics[1]
    module = stage.make_autoencoder(ae, SIZE)
    disc = stage.make_discriminator(ae)
    x, sample_rng = batch["image"], stage.step_rngs(state)["sample"]
    disc_vars = {"params": state.discriminator.params, "batch_stats": state.discriminator.batch_stats}

    @jax.jit
    def reference(params):
        def recon_of(p):
            return module.apply({"params": p}, x, rngs={"sample": sample_rng})[0]

        def logits(images):  # training mode: batch statistics
            return disc.apply(disc_vars, images, train=True, mutable=["batch_stats"])[0]

        def kl_term(p):
            posterior = module.apply({"params": p}, x, method="encode")
            return ae.kl_weight * jnp.mean(posterior.kl()) / (SIZE * SIZE * 3)

        rec = lambda p: jnp.mean(jnp.abs(x - recon_of(p)))
        gen = lambda p: -jnp.mean(logits(recon_of(p)))
        g_rec, g_gen, g_kl = (jax.grad(f)(params) for f in (rec, gen, kl_term))
        kernel = lambda g: g["decoder"]["conv_out"]["kernel"]
        ratio = (jnp.sqrt(jnp.sum(kernel(g_rec) ** 2))
                 / (jnp.sqrt(jnp.sum(kernel(g_gen) ** 2)) + 1e-4))
        weight = ae.disc_weight * jnp.clip(ratio, 0, 1e4)
        recon = recon_of(params)
        real, fake = logits(x), logits(recon)
        d_loss = 0.5 * (jnp.mean(jnp.maximum(0, 1 - real)) + jnp.mean(jnp.maximum(0, 1 + fake)))
        # The generator's loss gradient, the weight held constant: rec + KL term + weight * gen.
        norm = lambda w: optax.tree.norm(jax.tree.map(lambda a, b, c: a + b + w * c, g_rec, g_kl, g_gen))
        return rec(params), gen(params), weight, d_loss, norm(weight), norm(0.0)

    rec, g_loss, weight, d_loss, grad_norm, grad_norm_no_gan = jax.device_get(
        reference(state.params["autoencoder"]))
    np.testing.assert_allclose(m["rec_loss"], rec, rtol=1e-5)
    np.testing.assert_allclose(m["g_loss"], g_loss, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m["adaptive_weight"], weight, rtol=1e-4)
    np.testing.assert_allclose(m["d_loss"], d_loss, rtol=1e-5)
    # The generator's gradient includes the weighted GAN term (and would differ without it).
    np.testing.assert_allclose(m["grad_norm"], grad_norm, rtol=1e-4)
    assert abs(grad_norm - grad_norm_no_gan) > 1e-3 * grad_norm


def test_nonfinite_batch_skips_the_whole_step(gan_run, batch):
    _, step, states, _ = gan_run
    state = states[2]  # discriminator active
    image = np.array(batch["image"])
    image[3, 5, 7, 1] = np.nan
    new, m = step(state, dict(batch, image=jnp.asarray(image)))
    assert not bool(m["finite"])
    for field in ("params", "opt_state", "ema_params", "extra"):
        assert tree_equal(getattr(new, field), getattr(state, field)), field
    assert int(new.nonfinite) == int(state.nonfinite) + 1 and int(new.nonfinite_streak) == 1
    assert int(new.step) == int(state.step) + 1


# ---------------------------------------------------------------------------------------------
# LPIPS perceptual term


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory):
    """A tiny random-weight VGG16-shaped LPIPS, saved as safetensors with PyTorch's key names."""
    path = tmp_path_factory.mktemp("lpips") / "lpips.safetensors"
    save_file(random_state_dict(LPIPS_TINY, seed=0), str(path))
    return path


def test_lpips_step_matches_an_independent_computation(batch, lpips_file):
    """One step with LPIPS: p_loss is the module's value on (x, x̂), rec_loss = L1 + 0.5 p_loss,
    and the update's gradient includes the perceptual term; LPIPS itself is not trained."""
    config = tiny_config(disc_start=None, lpips_weights=str(lpips_file), perceptual_weight=0.5)
    ae = config.autoencoder
    frozen = stage.load_frozen(config)
    state = stage.init_state(config, key(3))
    assert set(state.params) == {"autoencoder"}
    step = jax.jit(stage.make_train_step(config))
    with pytest.raises(ValueError, match=r"load_frozen"):
        step(state, batch)  # LPIPS configured but not passed: fails while tracing
    _, m = step(state, batch, frozen)
    m = jax.device_get(m)

    module, perceptual = stage.make_autoencoder(ae, SIZE), lpips.LPIPS(channels=LPIPS_TINY)
    x, sample_rng = batch["image"], stage.step_rngs(state)["sample"]

    def terms(p, lpips_params):  # (L1, KL term, p_loss) on the step's posterior sample
        recon, posterior = module.apply({"params": p}, x, rngs={"sample": sample_rng})
        return (jnp.mean(jnp.abs(x - recon)), ae.kl_weight * jnp.mean(posterior.kl()) / (SIZE * SIZE * 3),
                jnp.mean(perceptual.apply({"params": lpips_params}, x, recon)))

    @jax.jit
    def reference(params, lpips_params, perceptual_weight):
        def loss(p):
            l1, kl_term, p_loss = terms(p, lpips_params)
            return l1 + kl_term + perceptual_weight * p_loss

        return terms(params, lpips_params), optax.tree.norm(jax.grad(loss)(params))

    args = state.params["autoencoder"], frozen["lpips"]
    (l1, kl_term, p_loss), grad_norm = jax.device_get(reference(*args, 0.5))
    _, grad_norm_without = jax.device_get(reference(*args, 0.0))  # same compiled function
    np.testing.assert_allclose(m["p_loss"], p_loss, rtol=1e-5)
    assert m["p_loss"] > 0
    np.testing.assert_allclose(m["rec_loss"], l1 + 0.5 * p_loss, rtol=1e-5)
    np.testing.assert_allclose(m["loss"], l1 + 0.5 * p_loss + kl_term, rtol=1e-5)
    np.testing.assert_allclose(m["grad_norm"], grad_norm, rtol=1e-4)
    assert abs(grad_norm - grad_norm_without) > 1e-3 * grad_norm  # the perceptual gradient is in


def test_lpips_file_errors_name_the_config_key(tmp_path):
    state = random_state_dict(LPIPS_TINY, seed=0)
    state["features.7.weight"] = state["features.7.weight"][:, :4]
    save_file(state, str(tmp_path / "bad.safetensors"))
    config = tiny_config(lpips_weights=str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"autoencoder\.lpips_weights=.*features\.7\.weight.*expected \(8, 8, 3, 3\)"):
        stage.load_frozen(config)
    assert stage.load_frozen(tiny_config()) is None


# ---------------------------------------------------------------------------------------------
# Training reduces the reconstruction loss; VQ and identity variants


def test_training_reduces_reconstruction_loss(batch):
    config = tiny_config(disc_start=None)
    state = stage.init_state(config, key(1))
    assert state.extra == {}
    step = jax.jit(stage.make_train_step(config))
    losses = []
    for _ in range(40):
        state, m = step(state, batch)
        losses.append(float(m["rec_loss"]))
    assert all(np.isfinite(losses)) and int(state.nonfinite) == 0
    assert np.mean(losses[-5:]) < 0.5 * losses[0], losses  # ~0.98 -> ~0.11 in practice


def test_vq_variant_trains_and_reports_usage(batch):
    config = tiny_config(kind="vq", model=TINY_VQ, vq=dict(num_codes=16, beta=0.25))
    state = stage.init_state(config, key(2))
    step = jax.jit(stage.make_train_step(config))
    for _ in range(3):
        state, m = step(state, batch)
    assert bool(m["finite"]) and int(state.nonfinite) == 0
    assert m["perplexity"] > 1.0 and 1 / 16 < m["codebook_usage"] <= 1.0
    assert m["vq_loss"] > 0
    np.testing.assert_allclose(m["loss"], m["rec_loss"] + m["vq_loss"], rtol=1e-6)
    assert "kl" not in m


def test_identity_autoencoder_is_exactly_identity():
    module = stage.make_autoencoder(tiny_config(kind="identity").autoencoder, SIZE)
    x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (2, SIZE, SIZE, 3)), jnp.float32)
    posterior = module.apply({}, x, method="encode")
    for z in (posterior.mean, posterior.mode(), posterior.sample(jax.random.PRNGKey(0))):
        np.testing.assert_array_equal(z, x)
    assert np.all(posterior.kl() == 0) and np.all(np.isneginf(posterior.logvar))
    np.testing.assert_array_equal(module.apply({}, x, method="decode"), x)
    np.testing.assert_array_equal(stage.reconstruct(module, {}, x), x)
    assert stage.estimate_scale_factor(module, {}, x, jax.random.PRNGKey(0)) == 1.0


def test_reconstruction_accuracy_of_identity_is_perfect():
    images, captions = rendered_shapes(12)
    module = stage.make_autoencoder(tiny_config(kind="identity").autoencoder, SIZE)
    acc = stage.reconstruction_accuracy(module, {}, images, captions, batch_size=5)
    assert acc == {"colour_ok": 1.0, "shape_ok": 1.0, "position_ok": 1.0, "ok": 1.0}
    # A blanked image fails the checker: the accuracy can drop.
    images[0] = 0
    assert stage.reconstruction_accuracy(module, {}, images, captions, batch_size=5)["ok"] == 11 / 12


class _KnownLatents(nn.Module):
    """encode(x) -> N(3 x, 2^2) posterior (or the plain array 3 x when `array`)."""
    array: bool = False

    def encode(self, x):
        if self.array:
            return 3.0 * x
        return DiagonalGaussian(3.0 * x, jnp.full_like(x, 2 * np.log(2.0)))


def test_estimate_scale_factor_is_one_over_latent_std():
    x = jnp.asarray(np.random.RandomState(0).randn(8, 16, 16, 4), jnp.float32)
    scale = stage.estimate_scale_factor(_KnownLatents(array=True), {}, x, jax.random.PRNGKey(0))
    np.testing.assert_allclose(scale, 1.0 / (3.0 * np.std(np.asarray(x), ddof=1)), rtol=1e-5)
    # A posterior is sampled (LDM's get_first_stage_encoding): std = sqrt(9 var(x) + 4) ~ sqrt(13).
    scale = stage.estimate_scale_factor(_KnownLatents(), {}, x, jax.random.PRNGKey(0))
    np.testing.assert_allclose(scale, 1.0 / np.sqrt(9 * np.var(np.asarray(x)) + 4.0), rtol=0.03)


def test_a_checkpoint_of_the_earlier_layout_restores_into_todays_state(gan_run, tmp_path):
    """Until config_version 3 the discriminator rode in state.extra (disc_params,
    disc_batch_stats, disc_opt_state): such a checkpoint restores into today's state, each array
    where today's state keeps it."""
    from ldm_jax.runs.checkpoint import StageCheckpoints

    config, _, states, _ = gan_run
    state = states[2]
    earlier = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
               if f.name not in ("discriminator", "frozen_paths", "flat")}
    earlier["extra"] = {"disc_params": state.discriminator.params, "disc_batch_stats": state.discriminator.batch_stats,
                        "disc_opt_state": state.discriminator.opt_state}
    ckpt = StageCheckpoints(str(tmp_path), "autoencoder")
    ckpt.save(2, earlier, {}, {"note": "earlier layout"})
    abstract = jax.eval_shape(lambda rng: stage.init_state(config, rng), key(0))
    restored, _, meta = ckpt.restore(abstract)
    ckpt.close()
    assert meta == {"note": "earlier layout"} and isinstance(restored.discriminator, stage.DiscriminatorState)
    assert tree_equal(restored.replace(rng=None), state.replace(rng=None))
    np.testing.assert_array_equal(jax.random.key_data(restored.rng), jax.random.key_data(state.rng))
