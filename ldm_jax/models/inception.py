"""Inception-v3 pool features for FID (Heusel et al. 2017), in Flax: the network of TensorFlow's
FID graph (``inception-2015-12-05``) as ported by pytorch-fid (``fid_inception_v3`` with its
``FIDInceptionA/C/E_1/E_2`` blocks), returning the 2048-d average pool after ``Mixed_7c``.

The FID port differs from torchvision's ImageNet Inception-v3 in its weights and in the blocks'
pooling branches: the average pools in Mixed_5b..5d, 6b..6e and 7b ignore the zero padding
(``count_include_pad=False``, as TensorFlow's pools do) and Mixed_7c max-pools instead. FID
numbers are comparable with other papers only with this network and these weights.

Weights: nothing is downloaded. The standard FID network's weights are pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth`` (a PyTorch state dict); on a machine with internet
fetch

    https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth

and, where torch is installed, convert it once to safetensors (which then loads without torch):

    python -c "from ldm_jax.models import inception; inception.convert_torch_checkpoint('pt_inception-2015-12-05-6726825d.pth', 'pt_inception-2015-12-05.safetensors')"

``load_params`` reads that ``.safetensors``, an ``.npz`` with the same keys, or the ``.pth``
itself (only where torch is importable, with ``torch.load(weights_only=True)``: tensors only,
no arbitrary unpickling).
Keys are torchvision's ``Inception3`` names (``Mixed_5b.branch1x1.conv.weight``,
``...bn.{weight,bias,running_mean,running_var}``); the state dict of pytorch-fid's
``InceptionV3`` wrapper (``blocks.2.0.branch1x1.conv.weight``) is accepted too.

Parameter tree: ``Mixed_5b/branch1x1/conv/kernel`` (HWIO) and ``.../bn/{scale,bias,mean,var}``:
the network is only ever evaluated, so the batch-norm statistics are plain parameters (one tree,
``apply({"params": params}, images)``), used in inference mode with torchvision's eps = 0.001.
"""
from __future__ import annotations

import functools
import os
import pathlib
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.runtime.files import load_npz, load_safetensors
Dtype = Any
PrecisionLike = Any

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
INPUT_SIZE = 299  # pytorch-fid resizes every input to 299 x 299
FEATURES = 2048  # pool3 width
BN_EPS = 1e-3  # torchvision BasicConv2d
NUM_CLASSES = 1008  # the FID graph's classifier (unused here); torchvision's ImageNet one has 1000


def resize_bilinear(images: jax.Array, size: int = INPUT_SIZE,
                    precision: PrecisionLike = jax.lax.Precision.HIGHEST) -> jax.Array:
    """Float images ``[B, H, W, C]`` -> ``[B, size, size, C]``, as PyTorch's
    ``F.interpolate(mode="bilinear", align_corners=False)`` (pytorch-fid's resize).

    Both sample at half-pixel centres and clamp at the borders, so they agree when upsampling;
    when downsampling ``jax.image.resize`` would widen its kernel (antialias, its default) where
    PyTorch (antialias off) interpolates between the two nearest pixels, hence ``antialias=False``."""
    b, h, w, c = images.shape
    if (h, w) == (size, size):
        return images  # both resizes are the identity here
    return jax.image.resize(images, (b, size, size, c), "bilinear", antialias=False,
                            precision=precision)


class FrozenBatchNorm(nn.Module):
    """Batch norm in inference mode, ``(x - mean) / sqrt(var + eps) * scale + bias``, with the
    running statistics stored as parameters (the network is never trained here)."""
    eps: float = BN_EPS
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        mean = self.param("mean", nn.initializers.zeros, (c,), self.param_dtype)
        var = self.param("var", nn.initializers.ones, (c,), self.param_dtype)
        x = x.astype(jnp.float32)
        return (x - mean) * (scale * jax.lax.rsqrt(var + self.eps)) + bias


class BasicConv2d(nn.Module):
    """torchvision ``BasicConv2d``: conv (no bias), batch norm, ReLU. ``padding`` is (pad_h,
    pad_w) on both sides, as PyTorch's ``padding=(ph, pw)``."""
    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        (ph, pw) = self.padding
        x = nn.Conv(self.features, self.kernel_size, strides=self.strides,
                    padding=((ph, ph), (pw, pw)), use_bias=False, dtype=self.dtype,
                    param_dtype=self.param_dtype, precision=self.precision, name="conv")(x)
        x = FrozenBatchNorm(param_dtype=self.param_dtype, name="bn")(x)
        return nn.relu(x).astype(self.dtype)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    # TensorFlow's average pool divides by the number of real (unpadded) pixels; pytorch-fid
    # patches torchvision's blocks with count_include_pad=False to match it.
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")  # PyTorch floor mode


class _Block(nn.Module):
    """Shared fields of the mixed blocks; ``conv`` builds a BasicConv2d with them."""
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = jax.lax.Precision.HIGHEST

    def conv(self, features, kernel_size, name, strides=(1, 1), padding=(0, 0)):
        if isinstance(kernel_size, int):
            kernel_size = (kernel_size, kernel_size)
        return BasicConv2d(features, kernel_size, strides, padding, dtype=self.dtype,
                           param_dtype=self.param_dtype, precision=self.precision, name=name)


class FIDInceptionA(_Block):
    """Mixed_5b..5d (35 x 35): pytorch-fid ``FIDInceptionA``."""
    pool_features: int = 32

    @nn.compact
    def __call__(self, x):
        b1 = self.conv(64, 1, "branch1x1")(x)
        b5 = self.conv(48, 1, "branch5x5_1")(x)
        b5 = self.conv(64, 5, "branch5x5_2", padding=(2, 2))(b5)
        b3 = self.conv(64, 1, "branch3x3dbl_1")(x)
        b3 = self.conv(96, 3, "branch3x3dbl_2", padding=(1, 1))(b3)
        b3 = self.conv(96, 3, "branch3x3dbl_3", padding=(1, 1))(b3)
        bp = self.conv(self.pool_features, 1, "branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
    """Mixed_6a (35 -> 17): torchvision ``InceptionB``."""

    @nn.compact
    def __call__(self, x):
        b3 = self.conv(384, 3, "branch3x3", strides=(2, 2))(x)
        bd = self.conv(64, 1, "branch3x3dbl_1")(x)
        bd = self.conv(96, 3, "branch3x3dbl_2", padding=(1, 1))(bd)
        bd = self.conv(96, 3, "branch3x3dbl_3", strides=(2, 2))(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_stride2(x)], axis=-1)


class FIDInceptionC(_Block):
    """Mixed_6b..6e (17 x 17): pytorch-fid ``FIDInceptionC``; factorised 7x7 convolutions."""
    channels_7x7: int = 128

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = self.conv(192, 1, "branch1x1")(x)
        b7 = self.conv(c7, 1, "branch7x7_1")(x)
        b7 = self.conv(c7, (1, 7), "branch7x7_2", padding=(0, 3))(b7)
        b7 = self.conv(192, (7, 1), "branch7x7_3", padding=(3, 0))(b7)
        bd = self.conv(c7, 1, "branch7x7dbl_1")(x)
        bd = self.conv(c7, (7, 1), "branch7x7dbl_2", padding=(3, 0))(bd)
        bd = self.conv(c7, (1, 7), "branch7x7dbl_3", padding=(0, 3))(bd)
        bd = self.conv(c7, (7, 1), "branch7x7dbl_4", padding=(3, 0))(bd)
        bd = self.conv(192, (1, 7), "branch7x7dbl_5", padding=(0, 3))(bd)
        bp = self.conv(192, 1, "branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
    """Mixed_7a (17 -> 8): torchvision ``InceptionD``."""

    @nn.compact
    def __call__(self, x):
        b3 = self.conv(192, 1, "branch3x3_1")(x)
        b3 = self.conv(320, 3, "branch3x3_2", strides=(2, 2))(b3)
        b7 = self.conv(192, 1, "branch7x7x3_1")(x)
        b7 = self.conv(192, (1, 7), "branch7x7x3_2", padding=(0, 3))(b7)
        b7 = self.conv(192, (7, 1), "branch7x7x3_3", padding=(3, 0))(b7)
        b7 = self.conv(192, 3, "branch7x7x3_4", strides=(2, 2))(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_stride2(x)], axis=-1)


class FIDInceptionE(_Block):
    """Mixed_7b (``FIDInceptionE_1``, average pool) and Mixed_7c (``FIDInceptionE_2``,
    ``max_pool=True``: the FID graph max-pools in its last block, unlike the paper)."""
    max_pool: bool = False

    @nn.compact
    def __call__(self, x):
        b1 = self.conv(320, 1, "branch1x1")(x)
        b3 = self.conv(384, 1, "branch3x3_1")(x)
        b3 = jnp.concatenate([self.conv(384, (1, 3), "branch3x3_2a", padding=(0, 1))(b3),
                              self.conv(384, (3, 1), "branch3x3_2b", padding=(1, 0))(b3)], axis=-1)
        bd = self.conv(448, 1, "branch3x3dbl_1")(x)
        bd = self.conv(384, 3, "branch3x3dbl_2", padding=(1, 1))(bd)
        bd = jnp.concatenate([self.conv(384, (1, 3), "branch3x3dbl_3a", padding=(0, 1))(bd),
                              self.conv(384, (3, 1), "branch3x3dbl_3b", padding=(1, 0))(bd)], axis=-1)
        if self.max_pool:  # padded with -inf, as PyTorch's max_pool2d
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_3x3(x)
        bp = self.conv(192, 1, "branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """``InceptionV3()(images) -> [B, 2048]`` FID pool features (float32).

    ``images``: uint8 ``[B, H, W, 3]`` in 0..255, or float ``[B, H, W, 3]`` in [0, 1] (what
    pytorch-fid's data loader feeds: ``ToTensor()`` of the uint8 image). As pytorch-fid's
    ``InceptionV3(resize_input=True, normalize_input=True)``: bilinear resize to 299 x 299
    (``resize_bilinear``), then ``2 x - 1``. Any H, W works."""
    dtype: Dtype = jnp.float32  # keep float32 for FID numbers comparable with pytorch-fid's
    param_dtype: Dtype = jnp.float32
    # Full float32 convolutions on every backend (no TF32 / bfloat16 passes), so a reported FID
    # does not depend on the accelerator it was computed on.
    precision: PrecisionLike = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"InceptionV3: images must be [B, H, W, 3], got shape {images.shape}")
        x = images.astype(jnp.float32)
        if jnp.issubdtype(images.dtype, jnp.integer):
            x = x / 255.0  # as torchvision's ToTensor in pytorch-fid's loader
        x = resize_bilinear(x, INPUT_SIZE, self.precision)
        x = (2.0 * x - 1.0).astype(self.dtype)  # [B, 299, 299, 3] in [-1, 1]

        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        conv = functools.partial(BasicConv2d, **kw)
        x = conv(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)  # [B, 149, 149, 32]
        x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)  # 147
        x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_stride2(x)  # 73
        x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)  # 71
        x = _max_pool_3x3_stride2(x)  # [B, 35, 35, 192]
        x = FIDInceptionA(pool_features=32, name="Mixed_5b", **kw)(x)
        x = FIDInceptionA(pool_features=64, name="Mixed_5c", **kw)(x)
        x = FIDInceptionA(pool_features=64, name="Mixed_5d", **kw)(x)  # [B, 35, 35, 288]
        x = InceptionB(name="Mixed_6a", **kw)(x)  # [B, 17, 17, 768]
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = FIDInceptionC(channels_7x7=c7, name=name, **kw)(x)
        x = InceptionD(name="Mixed_7a", **kw)(x)  # [B, 8, 8, 1280]
        x = FIDInceptionE(name="Mixed_7b", **kw)(x)
        x = FIDInceptionE(max_pool=True, name="Mixed_7c", **kw)(x)  # [B, 8, 8, 2048]
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # pool3: [B, 2048]


# ---------------------------------------------------------------------------------------------
# Weights

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                  "var": "running_var"}
# pytorch-fid's InceptionV3 wrapper holds the same modules in nn.Sequential blocks.
_WRAPPER_NAMES = {
    "blocks.0.0": "Conv2d_1a_3x3", "blocks.0.1": "Conv2d_2a_3x3", "blocks.0.2": "Conv2d_2b_3x3",
    "blocks.1.0": "Conv2d_3b_1x1", "blocks.1.1": "Conv2d_4a_3x3",
    **{f"blocks.2.{i}": n for i, n in enumerate(
        ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"])},
    "blocks.3.0": "Mixed_7a", "blocks.3.1": "Mixed_7b", "blocks.3.2": "Mixed_7c",
}
# Present in the FID file (and torchvision's) but not needed for pool3 features.
_IGNORED = re.compile(r"^fc\.(weight|bias)$|\.num_batches_tracked$")


@functools.lru_cache(maxsize=1)
def _param_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flax parameter path -> shape, from tracing ``init`` (no computation)."""
    shapes = jax.eval_shape(InceptionV3().init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))
    flat = jax.tree_util.tree_flatten_with_path(shapes["params"])[0]
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def _torch_key(path: tuple[str, ...]) -> str:
    return ".".join(path[:-1] + (_LEAF_TO_TORCH[path[-1]],))


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """PyTorch key -> shape of every tensor the features need (conv weights OIHW)."""
    return {_torch_key(p): (s[3], s[2], s[0], s[1]) if p[-1] == "kernel" else s
            for p, s in _param_shapes().items()}


def _canonical_names(state: Mapping[str, Any]) -> dict[str, Any]:
    """Inception3 names, also for the state dict of pytorch-fid's ``InceptionV3`` wrapper."""
    out = {}
    for key, value in state.items():
        prefix = ".".join(key.split(".")[:3])
        out[_WRAPPER_NAMES[prefix] + key[len(prefix):] if prefix in _WRAPPER_NAMES else key] = value
    return out


def params_from_state_dict(state: Mapping[str, Any]) -> dict:
    """Flax params for ``InceptionV3`` from the FID network's PyTorch state dict (arrays or
    tensors converted to float32 numpy; ``fc.*`` and ``num_batches_tracked`` are ignored).

    Raises ValueError naming the first missing, misshapen or unexpected key, and refuses
    torchvision's ImageNet Inception-v3 weights, whose names match but whose network is not
    the FID one (its FID values would be silently wrong)."""
    state = _canonical_names(state)
    imagenet_fc = np.shape(state.get("fc.weight", ())) == (1000, FEATURES)
    if imagenet_fc or any(k.startswith("AuxLogits.") for k in state):
        raise ValueError(
            "Inception weights: these look like torchvision's ImageNet Inception-v3 "
            f"(AuxLogits.* keys or a 1000-class fc), not the FID network; use {FID_WEIGHTS_FILE} "
            f"({FID_WEIGHTS_URL})")
    expected = expected_shapes()
    for key in state:
        if key not in expected and not _IGNORED.search(key):
            raise ValueError(f"Inception weights: unexpected key {key!r} (expected the FID "
                             f"Inception-v3 state dict of {FID_WEIGHTS_FILE})")
    params: dict = {}
    for path in _param_shapes():
        key = _torch_key(path)
        if key not in state:
            raise ValueError(f"Inception weights: missing {key} (expected shape {expected[key]})")
        w = np.asarray(state[key], np.float32)
        if w.shape != expected[key]:
            raise ValueError(f"Inception weights: {key} has shape {w.shape}, expected {expected[key]}")
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = w.transpose(2, 3, 1, 0) if path[-1] == "kernel" else w  # OIHW -> HWIO
    return params


def _load_pth(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ValueError(
            f"Inception weights: {path} is a PyTorch pickle, read only with torch installed "
            "(torch.load(weights_only=True)); convert it to .safetensors on a machine with torch "
            "(ldm_jax.models.inception.convert_torch_checkpoint) and pass that file") from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, or a pickle that weights_only refuses
        raise ValueError(f"Inception weights: cannot read {path} with torch.load(weights_only=True) "
                         f"({type(e).__name__}: {e})") from None
    if not isinstance(loaded, Mapping):
        raise ValueError(f"Inception weights: {path} holds a {type(loaded).__name__}, not a state dict")
    return {k: v.float().numpy() for k, v in loaded.items() if isinstance(v, torch.Tensor)}


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The PyTorch-named arrays in a ``.safetensors``, ``.npz`` or ``.pth`` file (the last only
    with torch installed)."""
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights: {path} does not exist or is not a file "
                                f"(the FID network's weights, {FID_WEIGHTS_URL})")
    if path.suffix == ".safetensors":
        return load_safetensors(path, "Inception weights: ")
    if path.suffix == ".npz":
        return load_npz(path, "Inception weights: ")
    if path.suffix in (".pth", ".pt"):
        return _load_pth(path)
    raise ValueError(f"Inception weights: {path} has suffix {path.suffix!r}; allowed: .safetensors, "
                     ".npz, .pth")


def load_params(path: str | os.PathLike) -> dict:
    """Validated float32 ``InceptionV3`` params from ``path`` (see ``read_state_dict``)."""
    return params_from_state_dict(read_state_dict(path))


def convert_torch_checkpoint(pth_path: str | os.PathLike, out_path: str | os.PathLike) -> None:
    """Write the FID network's ``.pth`` (pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``)
    as a safetensors file of the tensors the features use. Needs torch; validates before writing."""
    from safetensors.numpy import save_file

    path = pathlib.Path(pth_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights: {path} does not exist or is not a file")
    state = _canonical_names(_load_pth(path))
    params_from_state_dict(state)
    save_file({k: np.ascontiguousarray(state[k], np.float32) for k in expected_shapes()}, str(out_path))
