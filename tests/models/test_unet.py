"""UNet: SD 1.5 parameter count (no allocation), bfloat16 activations against float32,
rematerialisation gives the same gradients, timestep broadcasting, config validation.
(Numerical parity with diffusers lives in tests/interop/test_unet_weights.py.)"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models.unet import UNet

TINY = dict(in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), num_attention_heads=2,
            cross_attention_dim=16, norm_num_groups=8)


def random_params(module, *args, seed=0, **kwargs):
    """Random parameters of the right shapes without compiling ``init`` (slow on CPU): kernels
    N(0, 1/fan_in), norm scales 1 + N(0, 0.1^2), biases N(0, 0.1^2)."""
    shapes = jax.eval_shape(lambda *a: module.init(jax.random.PRNGKey(0), *a, **kwargs),
                            *args)["params"]
    r = np.random.RandomState(seed)

    def draw(path, s):
        name = path[-1].key
        if name == "kernel":
            return jnp.asarray(r.randn(*s.shape) / np.sqrt(np.prod(s.shape[:-1])), jnp.float32)
        return jnp.asarray((name == "scale") + 0.1 * r.randn(*s.shape), jnp.float32)
    return jax.tree_util.tree_map_with_path(draw, shapes)


def count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_sd15_parameter_count():
    unet = UNet()  # defaults are the SD 1.x architecture
    shapes = jax.eval_shape(unet.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 4)),
                            jnp.zeros((1,)), jnp.zeros((1, 77, 768)))
    assert count(shapes["params"]) == 859_520_964


@pytest.fixture(scope="module")
def tiny():
    r = np.random.RandomState(0)
    x = jnp.asarray(r.randn(2, 8, 8, 4), jnp.float32)
    ctx = jnp.asarray(r.randn(2, 5, 16), jnp.float32)
    t = jnp.array([10, 900], jnp.int32)
    params = random_params(UNet(**TINY), x, t, ctx)
    out = jax.jit(lambda p: UNet(**TINY).apply({"params": p}, x, t, ctx))(params)
    return dict(x=x, ctx=ctx, t=t, params=params, out=out)


def test_bfloat16_activations_stay_close_to_float32(tiny):
    unet = UNet(**TINY, dtype=jnp.bfloat16)
    out = jax.jit(lambda p: unet.apply({"params": p}, tiny["x"], tiny["t"], tiny["ctx"]))(
        tiny["params"])
    assert out.dtype == jnp.bfloat16
    ref = np.asarray(tiny["out"])
    rel = np.linalg.norm(np.asarray(out, np.float32) - ref) / np.linalg.norm(ref)
    print(f"\nUNet bfloat16 vs float32: relative L2 error {rel:.3g}")
    assert rel < 2e-2


def test_remat_gives_same_gradients(tiny):
    # One level (resnets and transformers, no resampling) keeps the two gradient compiles short.
    cfg = dict(TINY, block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
               up_block_types=("CrossAttnUpBlock2D",), dropout=0.1)
    x, t, ctx = tiny["x"], tiny["t"], tiny["ctx"]
    params = random_params(UNet(**cfg), x, t, ctx)

    def grads(remat):
        unet = UNet(**cfg, remat=remat)
        loss = lambda p: jnp.mean(unet.apply({"params": p}, x, t, ctx, train=True,
                                             rngs={"dropout": jax.random.PRNGKey(0)}) ** 2)
        return jax.jit(jax.grad(loss))(params)
    g0, g1 = grads(False), grads(True)
    assert jax.tree.structure(g0) == jax.tree.structure(g1)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert max(float(jnp.abs(a).max()) for a in jax.tree.leaves(g0)) > 0


def test_scalar_float_timestep_broadcasts(tiny):
    unet = UNet(**TINY)
    # t=10 for every example, given as a Python float, equals the batch of int timesteps [10, 10].
    f = jax.jit(lambda p, t: unet.apply({"params": p}, tiny["x"], t, tiny["ctx"]))
    np.testing.assert_allclose(f(tiny["params"], 10.0),
                               f(tiny["params"], jnp.array([10, 10], jnp.int32)), atol=1e-6)
    assert not np.allclose(f(tiny["params"], 10.0), f(tiny["params"], 11.0), atol=1e-4)


@pytest.mark.parametrize("override,key", [
    (dict(block_out_channels=(32, 60)), "norm_num_groups"),
    (dict(num_attention_heads=(2, 3, 4)), "num_attention_heads"),
    (dict(down_block_types=("CrossAttnDownBlock2D", "AttnDownBlock2D")), "down_block_types"),
])
def test_invalid_config_fails_before_compiling(override, key):
    with pytest.raises(ValueError, match=key):
        UNet(**{**TINY, **override}).validate()


def test_class_labels_required_when_class_conditional():
    unet = UNet(**TINY, num_class_embeds=3)
    with pytest.raises(ValueError, match="class_labels"):
        jax.eval_shape(unet.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 4)),
                       jnp.zeros((1,)), jnp.zeros((1, 5, 16)))


# One level (no resampling: the compiles stay short) with runs of same-shaped layers: down (8 -> 8
# channels, 2 layers), up (3 layers, all eating 8 + 8 channels), transformers two blocks deep.
SCANNED = dict(TINY, block_out_channels=(8,), layers_per_block=2, norm_num_groups=4,
               down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
               transformer_layers_per_block=2)


def test_scan_layers_is_the_unrolled_model(tiny):
    """unet.scan_layers compiles each run of same-shaped layers once (a while loop, fewer
    convolutions in the program) and computes what the unrolled layers compute, with the same
    parameter tree, forward and backward (to float32 rounding: the loop body fuses differently),
    rematerialised as the training configs run it."""
    x, t, ctx = tiny["x"], tiny["t"], tiny["ctx"]
    params = random_params(UNet(**SCANNED), x, t, ctx)
    scanned_shapes = jax.eval_shape(lambda: UNet(**SCANNED, scan_layers=True).init(jax.random.PRNGKey(0), x, t, ctx))
    assert jax.tree.structure(scanned_shapes["params"]) == jax.tree.structure(params)

    def run(scan):
        unet = UNet(**SCANNED, remat=True, scan_layers=scan)
        fn = jax.jit(jax.value_and_grad(lambda p: jnp.mean(unet.apply({"params": p}, x, t, ctx, train=True) ** 2)))
        hlo = fn.lower(params).as_text()
        return fn(params), hlo.count("stablehlo.while"), hlo.count("stablehlo.convolution")
    (l0, g0), loops0, convs0 = run(False)
    (l1, g1), loops1, convs1 = run(True)
    assert loops0 == 0 and loops1 > 0 and convs1 < convs0, (loops0, loops1, convs0, convs1)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    assert jax.tree.structure(g0) == jax.tree.structure(g1)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6 * float(jnp.abs(a).max()))
    assert max(float(jnp.abs(a).max()) for a in jax.tree.leaves(g0)) > 0


def test_lora_refuses_scanned_layers(tiny):
    # The scanned layers run as one loop body, out of the adapters' reach: an error, not silent misses.
    from ldm_jax.models import lora

    x, t, ctx = tiny["x"], tiny["t"], tiny["ctx"]
    params = jax.eval_shape(lambda: UNet(**SCANNED).init(jax.random.PRNGKey(0), x, t, ctx))["params"]
    q = params["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]["kernel"]
    adapters = {"unet": {"down_blocks_0": {"attentions_0": {"transformer_blocks_0": {"attn1": {"to_q": {
        "A": jnp.zeros((q.shape[0], 2)), "B": jnp.zeros((2, q.shape[1]))}}}}}}}
    with pytest.raises(ValueError, match="scan_layers=True"):
        with lora.adapted(adapters):
            jax.eval_shape(lambda p: UNet(**SCANNED, scan_layers=True).apply({"params": p}, x, t, ctx), params)
