"""benchmarks/flops.py: the analytic UNet count against XLA's count of the lowered (unoptimised)
program, op by op (exactly) and in total (XLA adds the elementwise ops); the training step's count;
the matmul peaks (a smoke test). Nothing here compiles a UNet: lowering is enough for the counts.
"""
import math

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from benchmarks import common, flops
from ldm_jax import config as config_lib
from ldm_jax.models.unet import UNet

S = jax.ShapeDtypeStruct
# XLA's cost analysis counts a FLOP per element of every elementwise op (norms, activations,
# softmax, the update), which this count leaves out. Measured with jax 0.10.2: the forward's total
# is 12.8% (micro) and 7.9% (tiny) above the count, the training step's 13.6% and 4.9%.
ELEMENTWISE_MARGIN = 1.15


def lower_forward(unet, batch: int, latent_shape, context_shape):
    params = common.unet_param_shapes(unet, latent_shape, context_shape)
    return jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c)).lower(
        params, S((batch, *latent_shape), jnp.float32), S((batch,), jnp.int32), S((batch, *context_shape), jnp.float32))


@pytest.fixture(scope="module", params=("micro", "tiny"))
def lowered(request):
    """(config, lowered forward, lowered training step) of a benchmark size."""
    config = common.size_config(request.param)
    unet = UNet(**config_lib.unet_kwargs(config))
    latent, context, b = config_lib.latent_shape(config), common.context_shape(config), config.data.batch_size
    forward = lower_forward(unet, b, latent, context)
    params = common.unet_param_shapes(unet, latent, context)
    state = jax.eval_shape(lambda p: common.init_unet_train_state(config, unet, p), params)
    step = jax.jit(common.make_unet_train_step(config, unet), donate_argnums=0).lower(
        state, {"latents": S((b, *latent), jnp.float32), "context": S((b, *context), jnp.float32)})
    return config, forward, step


def forward_by_kind(config):
    h, w, _ = config_lib.latent_shape(config)
    return flops.unet_forward_flops_by_kind(config, config.data.batch_size, (h, w), config.text_encoder.max_length)


def test_xla_matmul_flops_counts_as_the_cost_analysis():
    # Programs of dots and convolutions only, where XLA's total is theirs: strided, padded,
    # dilated (the gradients of a strided convolution) and batched, and a function called twice.
    conv = lambda x, k: lax.conv_general_dilated(x, k, (2, 2), ((1, 1), (1, 1)),  # noqa: E731
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    conv_grads = jax.grad(lambda x, k: conv(x, k).sum(), argnums=(0, 1))
    inner = jax.jit(lambda a, b: a @ b)
    programs = [(conv, (S((2, 5, 6, 3), jnp.float32), S((3, 3, 3, 7), jnp.float32))),
                (conv_grads, (S((2, 5, 6, 3), jnp.float32), S((3, 3, 3, 7), jnp.float32))),
                (lambda q, k: jnp.einsum("btnh,bsnh->bnts", q, k), (S((2, 9, 3, 4), jnp.float32),) * 2),
                (lambda a, b: inner(a, b) @ inner(b, a), (S((6, 6), jnp.float32),) * 2)]
    for f, args in programs:
        lowered = jax.jit(f).lower(*args)
        assert sum(flops.xla_matmul_flops(lowered).values()) == lowered.cost_analysis()["flops"] > 0
    # Only the in-bounds taps count: 3 x 3 outputs of a 5 x 6 input, whose kernels overhang the
    # padding by 2 taps along the rows (top, bottom) and 1 along the columns (left): 7 x 8 of 9 x 9.
    assert flops.xla_matmul_flops(jax.jit(conv).lower(*programs[0][1]))["conv"] == 2 * 2 * (7 * 8) * 3 * 7


def test_forward_equals_xla_dots_and_convolutions(lowered):
    config, forward, _ = lowered
    kinds, xla = forward_by_kind(config), flops.xla_matmul_flops(forward)
    assert kinds["conv"] == xla["conv"]
    assert kinds["dense"] + kinds["attention"] == xla["dot"]


def test_forward_within_xla_cost_analysis(lowered):
    config, forward, _ = lowered
    count = sum(forward_by_kind(config).values())
    assert count < common.cost_flops(forward) <= ELEMENTWISE_MARGIN * count


def test_train_step_against_xla(lowered):
    config, forward, step = lowered
    model = flops.train_step_flops(config)
    # Exactly the step's dots and convolutions: 3 x the forward's, less the input gradients of the
    # layers that read data (conv_in, the time MLP's first layer, cross-attention's keys and values).
    assert sum(flops.xla_matmul_flops(step).values()) == model
    three_forwards = flops.TRAIN_STEP_FACTOR * sum(forward_by_kind(config).values())
    assert 0.95 * three_forwards < model < three_forwards  # measured: 0.992 (micro), 0.968 (tiny)
    assert model < common.cost_flops(step) <= ELEMENTWISE_MARGIN * model


def test_forward_count_follows_the_architecture():
    # Two levels, cross-attention in one, two transformer blocks at the first, linear projections,
    # learned-variance output, a context of another width and a non-square latent, from keyword arguments.
    kwargs = dict(in_channels=4, out_channels=8, block_out_channels=(16, 32), layers_per_block=2,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), num_attention_heads=(2, 4),
                  cross_attention_dim=24, transformer_layers_per_block=(2, 1), use_linear_projection=True,
                  norm_num_groups=8)
    kinds = flops.unet_forward_flops_by_kind(kwargs, 3, (8, 12), 5)
    xla = flops.xla_matmul_flops(lower_forward(UNet(**kwargs), 3, (8, 12, 4), (5, 24)))
    assert (kinds["conv"], kinds["dense"] + kinds["attention"]) == (xla["conv"], xla["dot"])
    assert flops.unet_forward_flops(UNet(**kwargs), 3, (8, 12), 5) == sum(kinds.values())
    # Twice the batch, twice the FLOPs; a longer context adds cross-attention work only.
    assert flops.unet_forward_flops(kwargs, 6, (8, 12), 5) == 2 * sum(kinds.values())
    longer = flops.unet_forward_flops_by_kind(kwargs, 3, (8, 12), 7)
    assert longer["conv"] == kinds["conv"] and longer["attention"] > kinds["attention"]
    with pytest.raises(TypeError, match="UNet keyword arguments"):
        flops.unet_forward_flops([16, 32], 3, (8, 12), 5)


def test_matmul_peaks_smoke():
    # Small matmuls: the rates mean little, they only have to be rates (at least 0.1 GFLOP/s).
    peak = flops.matmul_peak_flops(sizes=(128, 256), repeats=2)
    assert math.isfinite(peak) and peak > 1e8
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    peak = flops.torch_matmul_peak_flops(sizes=(128, 256), repeats=2, threads=1)
    assert math.isfinite(peak) and peak > 1e8
    assert torch.get_num_threads() == threads  # restored
