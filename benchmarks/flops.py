"""FLOPs accounted for: an analytic count of the UNet's work, XLA's count of the same program, and
the measured matmul peak of this machine, so that a step time can be read against the physical limit.

Conventions of the count (`unet_forward_flops`):

* 2 FLOPs per multiply-add, matmuls and convolutions only: the dense layers (time-embedding MLP,
  time projections, attention projections, GEGLU feed-forward, linear `proj_in`/`proj_out`), the
  convolutions (3x3, strided 3x3 downsampling, 1x1 shortcuts and projections) and attention's two
  batched matmuls (Q K^T and A V). These are what a matmul peak bounds and what XLA's cost
  analysis counts as 2 per multiply-add. Elementwise work is left out: GroupNorm, LayerNorm, SiLU,
  GELU, softmax, biases, residual adds, the sinusoidal features, nearest-neighbour upsampling.
  XLA's cost analysis counts one FLOP per element of each such op, so its total is above this
  count: by 13% at the micro size, 8% at tiny, 4% at small, 0.8% at sd15 (forward, measured
  with jax 0.10.2); its dots and convolutions alone (`xla_matmul_flops`) equal it exactly.
* A convolution tap that falls on the zero padding is not counted, as XLA's cost analysis does
  not count it either: a 3x3 'same' convolution over n pixels a side does (3n - 2)^2 tap
  positions, not 9n^2 (56% fewer at 2x2, 4% at 32x32). Over the whole forward this count is 6%
  below the nominal 9n^2 one at sd15 (32x32 latents), 7% at small, 13% at tiny.
* Attention is counted as computed in full, every query against every key (query chunking's
  padded queries, `unet.query_chunk_size`, are not counted).

The training step (`unet_train_flops`, `train_step_flops`) counts the forward three times (the
forward, the gradients of the activations, the same matmuls transposed, and the gradients of the
weights: the usual 3x, Kaplan et al. 2020's 6N FLOPs a token), less the activation gradients
autodiff never forms: those of the layers whose input is data, not parameters (`conv_in`, the first
time-embedding layer, and cross-attention's key and value projections of the text context): 0.8%
of 3x the forward at micro, 3.2% at tiny. It leaves out:
- elementwise work: the UNet's (as in the forward), the loss's, and the update's (gradient
  clipping, AdamW, EMA, the non-finite check: 29-30 FLOPs a parameter in XLA's count, 0.5-0.6% of
  this count at tiny and small, 5% at micro and at sd15's batch of one 32x32 latent). XLA's cost
  analysis of the whole lowered step is above this count by 14% (micro), 5% (tiny), 3% (small),
  5.5% (sd15); its dots and convolutions alone equal it exactly (tests/test_flops.py);
- rematerialisation (`train.remat`), which recomputes the forward: these are the model's FLOPs, the
  numerator of MFU, not the hardware's (`xla_matmul_flops` of a rematerialised step counts both).

The matmul peaks (`matmul_peak_flops`, `torch_matmul_peak_flops`) are measured, not taken from a
data sheet: the best rate of a few large square matmuls, in the library that runs the step. jax and
torch are imported inside the functions, so that a torch process need not import jax.
"""
from __future__ import annotations

import collections
import functools
import math
import os
import re
import time
from collections.abc import Mapping

# One training step does the forward's matmuls this many times over (see the module docstring).
TRAIN_STEP_FACTOR = 3
# Square matmuls of the peak: large enough to reach the library's best kernel on a CPU, small
# enough that warm-up and three repeats of each take a few seconds on 2 cores.
PEAK_SIZES = (2048, 4096)

# ---------------------------------------------------------------------------------------------
# The analytic count


def _unet(config_or_unet_kwargs):
    """The UNet module (unbound, nothing compiled) of a training config, a UNet's keyword
    arguments or a UNet itself."""
    from ml_collections import ConfigDict

    from ldm_jax import config as config_lib
    from ldm_jax.models.unet import UNet

    if isinstance(config_or_unet_kwargs, UNet):
        unet = config_or_unet_kwargs
    elif isinstance(config_or_unet_kwargs, ConfigDict):
        unet = UNet(**config_lib.unet_kwargs(config_or_unet_kwargs))
    elif isinstance(config_or_unet_kwargs, Mapping):
        unet = UNet(**config_or_unet_kwargs)
    else:
        raise TypeError(f"expected a training config, UNet keyword arguments or a UNet; got "
                        f"{type(config_or_unet_kwargs).__name__}")
    unet.validate()
    return unet


def _taps(n: int, kernel: int, stride: int) -> tuple[int, int]:
    """(output length, in-bounds kernel taps summed over the outputs) of a convolution along one
    axis of length n, padded by kernel // 2 on both sides as the UNet's convolutions are."""
    pad = kernel // 2
    out = (n + 2 * pad - kernel) // stride + 1
    return out, sum(1 for o in range(out) for k in range(kernel) if 0 <= o * stride - pad + k < n)


class _Counter:
    """FLOPs by kind ("conv", "dense", "attention") of the layers the UNet runs, in call order, and
    `data_input`: the FLOPs of the layers whose input is data (no gradient flows into it)."""

    def __init__(self, batch: int, context_len: int, context_dim: int, temb_dim: int, linear_projection: bool):
        self.batch, self.context_len, self.context_dim, self.temb_dim = batch, context_len, context_dim, temb_dim
        self.linear_projection = linear_projection
        self.flops = collections.Counter()
        self.data_input = 0

    def add(self, kind: str, flops: int, data_input: bool = False):
        self.flops[kind] += flops
        self.data_input += flops if data_input else 0

    def conv(self, hw, kernel: int, c_in: int, c_out: int, stride: int = 1, data_input: bool = False):
        """A kernel x kernel convolution of [B, h, w, c_in]; returns the output's (h, w)."""
        (h, taps_h), (w, taps_w) = (_taps(n, kernel, stride) for n in hw)
        self.add("conv", 2 * self.batch * taps_h * taps_w * c_in * c_out, data_input)
        return h, w

    def dense(self, rows: int, d_in: int, d_out: int, data_input: bool = False):
        self.add("dense", 2 * rows * d_in * d_out, data_input)

    def resnet(self, hw, c_in: int, c_out: int):
        self.conv(hw, 3, c_in, c_out)                          # conv1
        self.dense(self.batch, self.temb_dim, c_out)           # time_emb_proj
        self.conv(hw, 3, c_out, c_out)                         # conv2
        if c_in != c_out:
            self.conv(hw, 1, c_in, c_out)                      # conv_shortcut

    def attention(self, queries: int, keys: int, width: int, key_width: int, keys_are_data: bool):
        """Q, K, V and output projections, then Q K^T and A V over all heads (inner dim = width)."""
        rows = self.batch * queries
        self.dense(rows, width, width)                         # to_q
        self.dense(self.batch * keys, key_width, 2 * width, data_input=keys_are_data)  # to_k, to_v
        self.add("attention", 2 * 2 * rows * keys * width)     # Q K^T [B, N, T, S] and A V
        self.dense(rows, width, width)                         # to_out_0

    def projection(self, hw, c: int):
        """A transformer's proj_in or proj_out: a 1x1 conv, or a dense layer with
        `use_linear_projection` (the same FLOPs; kept apart to match XLA's ops)."""
        if self.linear_projection:
            self.dense(self.batch * hw[0] * hw[1], c, c)
        else:
            self.conv(hw, 1, c, c)

    def transformer(self, hw, c: int, depth: int):
        """SpatialTransformer: proj_in, `depth` blocks (self-attention, cross-attention on the
        text, GEGLU feed-forward with 4x expansion), proj_out. The number of heads does not matter."""
        tokens = hw[0] * hw[1]
        rows = self.batch * tokens
        self.projection(hw, c)                                 # proj_in
        for _ in range(depth):
            self.attention(tokens, tokens, c, c, keys_are_data=False)                         # attn1
            self.attention(tokens, self.context_len, c, self.context_dim, keys_are_data=True)  # attn2
            self.dense(rows, c, 2 * 4 * c)                     # ff.net_0.proj (GEGLU: hidden and gate)
            self.dense(rows, 4 * c, c)                         # ff.net_2
        self.projection(hw, c)                                 # proj_out


def _count(config_or_unet_kwargs, batch: int, latent_hw, context_len: int) -> _Counter:
    """Walk the UNet's forward pass (ldm_jax/models/unet.py) layer by layer."""
    unet = _unet(config_or_unet_kwargs)
    channels = tuple(unet.block_out_channels)
    n = len(channels)
    depths = unet.transformer_layers_per_block
    depths = (depths,) * n if isinstance(depths, int) else tuple(depths)
    c0 = channels[0]
    count = _Counter(batch, context_len, unet.cross_attention_dim, temb_dim=4 * c0,
                     linear_projection=unet.use_linear_projection)
    hw = tuple(latent_hw)

    count.dense(batch, c0, 4 * c0, data_input=True)            # time_embedding.linear_1 (of the features of t)
    count.dense(batch, 4 * c0, 4 * c0)                         # time_embedding.linear_2
    hw = count.conv(hw, 3, unet.in_channels, c0, data_input=True)  # conv_in
    skips, x = [c0], c0                                        # channels of the skip tensors, of x
    for i, (c, kind) in enumerate(zip(channels, unet.down_block_types)):
        for _ in range(unet.layers_per_block):
            count.resnet(hw, x, c)
            x = c
            if kind == "CrossAttnDownBlock2D":
                count.transformer(hw, c, depths[i])
            skips.append(c)
        if i < n - 1:
            hw = count.conv(hw, 3, c, c, stride=2)             # downsamplers_0
            skips.append(c)
    count.resnet(hw, x, channels[-1])                          # mid_block: resnet, transformer, resnet
    count.transformer(hw, channels[-1], depths[-1])
    count.resnet(hw, channels[-1], channels[-1])
    for i, (c, kind) in enumerate(zip(channels[::-1], unet.up_block_types)):
        for _ in range(unet.layers_per_block + 1):
            count.resnet(hw, x + skips.pop(), c)               # on [x, skip] concatenated
            x = c
            if kind == "CrossAttnUpBlock2D":
                count.transformer(hw, c, depths[n - 1 - i])
        if i < n - 1:
            hw = count.conv((2 * hw[0], 2 * hw[1]), 3, c, c)   # upsamplers_0, after 2x nearest
    count.conv(hw, 3, x, unet.out_channels)                    # conv_out
    return count


def unet_forward_flops_by_kind(config_or_unet_kwargs, batch: int, latent_hw, context_len: int) -> dict[str, int]:
    """`unet_forward_flops` split as XLA's ops split it: "conv" (every convolution, the
    transformers' 1x1 proj_in/proj_out included), "dense" (time MLP and projections, attention
    projections, feed-forward; proj_in/proj_out with `use_linear_projection`) and "attention"
    (Q K^T and A V). The first is XLA's convolutions, the other two its dots."""
    return dict(_count(config_or_unet_kwargs, batch, latent_hw, context_len).flops)


def unet_forward_flops(config_or_unet_kwargs, batch: int, latent_hw, context_len: int) -> int:
    """Matmul and convolution FLOPs of one forward pass of `ldm_jax.models.unet.UNet` (2 per
    multiply-add; elementwise work and taps on the padding not counted: see the module docstring).

    `config_or_unet_kwargs`: a training config (`UNet(**config_lib.unet_kwargs(config))`), the
    UNet's keyword arguments, or a UNet. `batch` latents of `latent_hw` = (h, w) pixels, a text
    context of `context_len` tokens (of the UNet's `cross_attention_dim`).
    """
    return sum(unet_forward_flops_by_kind(config_or_unet_kwargs, batch, latent_hw, context_len).values())


def unet_train_flops(config_or_unet_kwargs, batch: int, latent_hw, context_len: int) -> int:
    """Matmul and convolution FLOPs of the UNet's forward and backward pass (arguments as
    `unet_forward_flops`): TRAIN_STEP_FACTOR x the forward, less the activation gradients of the
    layers that read data (see the module docstring)."""
    count = _count(config_or_unet_kwargs, batch, latent_hw, context_len)
    return TRAIN_STEP_FACTOR * sum(count.flops.values()) - count.data_input


def train_step_flops(config) -> int:
    """The model FLOPs of one training step of a training config (`common.size_config`):
    `unet_train_flops` at the config's batch, latent size and context length."""
    from ldm_jax import config as config_lib

    h, w, _ = config_lib.latent_shape(config)
    return unet_train_flops(config, config.data.batch_size, (h, w), int(config.text_encoder.max_length))


# ---------------------------------------------------------------------------------------------
# XLA's count of the matmuls and convolutions of a lowered program

_TENSOR = re.compile(r"tensor<([0-9x]*?)x?[a-z]+[0-9]*>")
_SYMBOL = r'@("[^"]*"|[\w.$-]+)'  # a function's name: quoted where it has other characters (@"<lambda>")
_FUNC = re.compile(r"func\.func (?:public |private )?" + _SYMBOL)
_CALL = re.compile(r"\b(?:func\.)?call " + _SYMBOL)


def _operand_shapes(line: str) -> list[tuple[int, ...]]:
    """The shapes in an op's type signature `: (lhs, rhs) -> result`."""
    return [tuple(int(d) for d in dims.split("x") if d) for dims in _TENSOR.findall(line.rsplit(" : ", 1)[1])]


def _ints(text: str) -> list[int]:
    return [int(v) for v in re.findall(r"-?\d+", text)]


def _dot_flops(line: str) -> int:
    """2 x the result's elements x the contracted length (XLA's HloCostAnalysis::GetDotFlops)."""
    lhs, _, out = _operand_shapes(line)
    contracting = _ints(re.search(r"contracting_dims = \[([^\]]*)\]", line).group(1))
    return 2 * math.prod(out) * math.prod(lhs[d] for d in contracting)


def _conv_flops(line: str) -> int:
    """2 x multiply-adds of the in-bounds taps, with strides, padding and dilations
    (XLA's HloCostAnalysis::GetConvolutionFlops)."""
    lhs, rhs, out = _operand_shapes(line)
    labels = re.search(r"dim_numbers = \[([^\]]*)\]x\[([^\]]*)\]->\[([^\]]*)\]", line).groups()
    lhs_dims, rhs_dims, out_dims = ([d.strip() for d in group.split(",")] for group in labels)
    window = re.search(r"window = \{([^}]*)\}", line)
    window = window.group(1) if window else ""
    spatial = len(lhs_dims) - 2

    def field(name, default, per_dim=1):  # absent from the text where all are the default
        found = re.search(name + r" = (\[\[.*?\]\]|\[.*?\])", window)
        return _ints(found.group(1)) if found else [default] * (spatial * per_dim)

    stride, lhs_dilate, rhs_dilate = field("stride", 1), field("lhs_dilate", 1), field("rhs_dilate", 1)
    pad_low = field("pad", 0, per_dim=2)[::2]
    taps = 1
    for s in range(spatial):
        n_in, n_kernel, n_out = (shape[dims.index(str(s))] for shape, dims in
                                 ((lhs, lhs_dims), (rhs, rhs_dims), (out, out_dims)))
        dilated = (o * stride[s] - pad_low[s] + k * rhs_dilate[s] for k in range(n_kernel) for o in range(n_out))
        taps *= sum(1 for u in dilated if u % lhs_dilate[s] == 0 and 0 <= u // lhs_dilate[s] < n_in)
    groups = {name: int(re.search(name + r" = (\d+)", line).group(1))
              for name in ("feature_group_count", "batch_group_count")}
    return 2 * taps * (lhs[lhs_dims.index("f")] // groups["feature_group_count"]) * out[out_dims.index("f")] * (
        lhs[lhs_dims.index("b")] // groups["batch_group_count"])


def xla_matmul_flops(lowered) -> dict[str, int]:
    """{"dot", "conv"}: the FLOPs of the dot_general and convolution ops of a lowered, unoptimised
    program (`jax.jit(f).lower(...)`), op by op from its StableHLO text, as XLA's cost analysis
    counts them (2 per multiply-add; a convolution's in-bounds taps only). What the program asks
    of the matmul units, without the elementwise ops that `cost_analysis()["flops"]` adds; a
    function called from n places counts n times, a loop body once (as the cost analysis does).
    tests/test_flops.py checks it against the cost analysis of lone dots and convolutions."""
    own, callees, name = {}, {}, None
    for line in lowered.as_text().splitlines():
        found = _FUNC.search(line)
        if found:
            name = found.group(1)
            own[name], callees[name] = collections.Counter(dot=0, conv=0), []
        elif name is None:
            continue
        elif "stablehlo.dot_general" in line:
            own[name]["dot"] += _dot_flops(line)
        elif "stablehlo.convolution" in line:
            own[name]["conv"] += _conv_flops(line)
        else:
            callees[name] += _CALL.findall(line)

    @functools.cache
    def total(function):
        flops = collections.Counter(own[function])
        for callee in callees[function]:
            flops.update(total(callee))
        return flops

    flops = total("main")
    return {"dot": flops["dot"], "conv": flops["conv"]}


# ---------------------------------------------------------------------------------------------
# Measured matmul peaks


def usable_cpus() -> int:
    """The CPUs this process may run on (os.cpu_count() where affinity is unknown)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _best_rate(run, n: int, repeats: int) -> float:
    """The best FLOP/s of `repeats` timed calls of `run` (an n x n by n x n matmul that returns
    when done), after one untimed call (compilation, first touch of the buffers)."""
    run()
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


def matmul_peak_flops(dtype: str = "float32", sizes=PEAK_SIZES, repeats: int = 3) -> float:
    """This machine's measured matmul peak for JAX, FLOP/s: the best rate of `repeats` n x n
    `jnp.dot`s for each n in `sizes`, jitted with the training loop's compiler options
    (`runtime.xla_options.compiler_options`) on the default backend. The defaults take about 3 s
    on 2 idle cores, twice that on busy ones."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ldm_jax.runtime.xla_options import compiler_options

    matmul = jax.jit(jnp.dot, compiler_options=compiler_options())
    best = 0.0
    for n in sizes:
        rng = np.random.default_rng(n)
        a, b = (jnp.asarray(rng.standard_normal((n, n), np.float32), dtype) for _ in range(2))
        best = max(best, _best_rate(lambda: matmul(a, b).block_until_ready(), n, repeats))
    return best


def torch_matmul_peak_flops(dtype: str = "float32", sizes=PEAK_SIZES, repeats: int = 3,
                            threads: int | None = None) -> float:
    """This machine's measured matmul peak for PyTorch, FLOP/s: the best rate of `repeats` n x n
    `torch.mm`s for each n in `sizes`, on `threads` threads (default: the usable CPUs; the
    process's previous thread count is restored after). The defaults take about 4 s on 2 idle
    cores, twice that on busy ones."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads or usable_cpus())
    try:
        best = 0.0
        for n in sizes:
            generator = torch.Generator().manual_seed(n)
            a, b = (torch.randn(n, n, generator=generator).to(getattr(torch, dtype)) for _ in range(2))
            best = max(best, _best_rate(lambda: torch.mm(a, b), n, repeats))
        return best
    finally:
        torch.set_num_threads(previous)
