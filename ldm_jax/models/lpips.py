"""LPIPS, the learned perceptual distance (Zhang et al. 2018, "The Unreasonable Effectiveness of
Deep Features as a Perceptual Metric"), VGG variant: the perceptual term of LDM's autoencoder loss
(taming-transformers ``LPIPS``, lpips v0.1 "vgg").

  d(x, y) = sum_l mean_hw  w_l . (f̂_l(x) - f̂_l(y))^2

  f_l   VGG16 features at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of the inputs shifted and
        scaled by the ScalingLayer constants: (x - SHIFT) / SCALE, x in [-1, 1]
  f̂_l   f_l divided by its channel norm at each pixel (+ 1e-10)
  w_l   the non-negative 1x1 "lin" weights, no bias (dropout before them is off at evaluation)

Weights: nothing is downloaded. On a machine with internet, fetch

  torchvision's VGG16 ImageNet weights (IMAGENET1K_V1):
      https://download.pytorch.org/models/vgg16-397923af.pth
  the lpips v0.1 linear heads, ``lpips/weights/v0.1/vgg.pth`` in the lpips repository:
      https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth
      (taming-transformers' ``vgg.pth`` download is the same file)

and combine them into one safetensors file (needs torch; no other step does):

  python -c "from ldm_jax.models import lpips; lpips.convert_torch_checkpoints(
      'vgg16-397923af.pth', 'vgg.pth', 'lpips_vgg.safetensors')"

then set ``autoencoder.lpips_weights=lpips_vgg.safetensors``. ``load_params`` reads that file, an
``.npz`` with the same keys, or (only where torch is importable, with ``weights_only=True``) a
directory holding the two ``.pth`` files. Keys are PyTorch's: ``features.{0,2,5,...,28}.{weight,
bias}`` (torchvision ``vgg16().features``) and ``lin{0..4}.model.1.weight`` ([1, C, 1, 1]).

The block widths are read from the lin heads, so a narrower VGG16-shaped network loads too (the
tests use one); the pretrained LPIPS has ``VGG16_CHANNELS``.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.runtime.files import load_npz, load_safetensors
Dtype = Any

# torchvision vgg16().features: the conv layers' indices, by block (a 2x2 max-pool before each
# block after the first). LPIPS taps the ReLU after each block's last conv.
VGG16_CONVS = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
VGG16_CHANNELS = (64, 128, 256, 512, 512)
SHIFT = (-0.030, -0.088, -0.188)  # lpips ScalingLayer
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10  # lpips normalize_tensor
VGG_FILE, LIN_FILE = "vgg16-397923af.pth", "vgg.pth"


def unit_normalize(f: jax.Array) -> jax.Array:
    """``f / (||f||_channels + 1e-10)`` per pixel (lpips ``normalize_tensor``), in float32.

    Same value as lpips', but the square root is taken only where the squared norm is positive:
    at an all-zero pixel sqrt's infinite derivative makes 0 * inf = NaN in the backward pass.
    The ReLU before it masks that NaN when run op by op, but compiled training steps were seen to
    let it through (XLA CPU, not deterministically); here the gradient there is finite: c / eps
    for an upstream cotangent c."""
    f = f.astype(jnp.float32)
    sq = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
    positive = sq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
    return f / (norm + NORM_EPS)


class LPIPS(nn.Module):
    """``LPIPS()(x, y) -> [B]`` distances between images ``x, y`` [B, H, W, 3] in [-1, 1] (H, W
    >= 16: four 2x2 max-pools, floor). Parameters: ``features_{i}`` (VGG16 convs, named by their
    torchvision index) and ``lin{l}`` (the heads, a [C_l, 1] kernel)."""
    channels: Sequence[int] = VGG16_CHANNELS
    dtype: Dtype = jnp.float32  # VGG activations; normalisation and distances run in float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        batch = x.shape[0]
        h = jnp.concatenate([x, y]).astype(jnp.float32)  # [2B, H, W, 3]: one VGG pass for both
        h = ((h - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)).astype(self.dtype)
        total = jnp.zeros((batch,), jnp.float32)
        for block, (convs, width) in enumerate(zip(VGG16_CONVS, self.channels)):
            if block:
                h = nn.max_pool(h, (2, 2), strides=(2, 2), padding="VALID")
            for index in convs:
                h = nn.Conv(width, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                            param_dtype=self.param_dtype, name=f"features_{index}")(h)
                h = nn.relu(h)
            f = unit_normalize(h)  # [2B, h, w, C]
            diff = jnp.square(f[:batch] - f[batch:])
            lin = nn.Dense(1, use_bias=False, param_dtype=self.param_dtype, name=f"lin{block}")
            total = total + jnp.mean(lin(diff)[..., 0], axis=(1, 2))
        return total


# ---------------------------------------------------------------------------------------------
# Weights


def expected_shapes(channels: Sequence[int] = VGG16_CHANNELS) -> dict[str, tuple[int, ...]]:
    """PyTorch key -> shape for a VGG16-shaped LPIPS with block widths ``channels``."""
    shapes, c_in = {}, 3
    for block, (convs, width) in enumerate(zip(VGG16_CONVS, channels)):
        for index in convs:
            shapes[f"features.{index}.weight"] = (width, c_in, 3, 3)
            shapes[f"features.{index}.bias"] = (width,)
            c_in = width
        shapes[f"lin{block}.model.1.weight"] = (1, width, 1, 1)
    return shapes


def _lin_widths(state: Mapping[str, Any]) -> tuple[int, ...]:
    widths = []
    for block, default in enumerate(VGG16_CHANNELS):
        key = f"lin{block}.model.1.weight"
        if key not in state:
            raise ValueError(f"LPIPS weights: missing {key} (expected shape (1, {default}, 1, 1))")
        shape = tuple(np.shape(state[key]))
        if len(shape) != 4 or shape[0] != 1 or shape[2:] != (1, 1) or shape[1] < 1:
            raise ValueError(f"LPIPS weights: {key} has shape {shape}, expected (1, {default}, 1, 1)")
        widths.append(shape[1])
    return tuple(widths)


def params_from_state_dict(state: Mapping[str, Any]) -> dict:
    """Flax params for ``LPIPS(channels=channels_of(params))`` from a PyTorch-named state dict
    (float32 numpy; keys beyond LPIPS', e.g. torchvision's ``classifier.*``, are ignored).

    Raises ValueError naming the first missing or misshapen key and the shape expected."""
    widths = _lin_widths(state)
    source = "" if widths == VGG16_CHANNELS else (
        f" (block widths {widths} read from lin{{0..4}}.model.1.weight; pretrained LPIPS has "
        f"{VGG16_CHANNELS})")
    params = {}
    for key, shape in expected_shapes(widths).items():
        if key not in state:
            raise ValueError(f"LPIPS weights: missing {key} (expected shape {shape}){source}")
        w = np.asarray(state[key], np.float32)
        if w.shape != shape:
            raise ValueError(f"LPIPS weights: {key} has shape {w.shape}, expected {shape}{source}")
        module, leaf = key.rsplit(".", 1)
        if module.startswith("lin"):
            params[module.split(".")[0]] = {"kernel": w.reshape(1, -1).T}  # [C, 1]
        else:
            name = module.replace(".", "_")
            params.setdefault(name, {})["kernel" if leaf == "weight" else "bias"] = (
                w.transpose(2, 3, 1, 0) if leaf == "weight" else w)  # OIHW -> HWIO
    return params


def channels_of(params: Mapping) -> tuple[int, ...]:
    """The block widths of an LPIPS parameter tree (static: shapes only)."""
    return tuple(int(params[f"lin{block}"]["kernel"].shape[0]) for block in range(len(VGG16_CONVS)))


def _load_pth(paths: Sequence[os.PathLike], unavailable: str) -> dict[str, np.ndarray]:
    """The tensors of PyTorch ``.pth`` state dicts, merged; ``torch.load(weights_only=True)``
    only (no arbitrary unpickling). Without torch: ValueError(``unavailable``)."""
    try:
        import torch
    except ImportError:
        raise ValueError(unavailable) from None
    state = {}
    for p in paths:
        try:
            loaded = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # corrupt, or a pickle that weights_only refuses
            raise ValueError(f"LPIPS weights: cannot read {p} with torch.load(weights_only=True) "
                             f"({type(e).__name__}: {e})") from None
        if not isinstance(loaded, Mapping):
            raise ValueError(f"LPIPS weights: {p} holds a {type(loaded).__name__}, not a state dict")
        state.update({k: v.float().numpy() for k, v in loaded.items() if isinstance(v, torch.Tensor)})
    return state


def _read_pth_dir(folder: pathlib.Path) -> dict[str, np.ndarray]:
    missing = [name for name in (VGG_FILE, LIN_FILE) if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"LPIPS weights: {folder} has no {', '.join(missing)} (a directory must "
                         f"hold torchvision's {VGG_FILE} and lpips' {LIN_FILE})")
    return _load_pth(
        [folder / VGG_FILE, folder / LIN_FILE],
        f"LPIPS weights: {folder} holds PyTorch pickles, which are read only with torch installed "
        "(torch.load(weights_only=True)); convert them to one safetensors file with "
        "ldm_jax.models.lpips.convert_torch_checkpoints on a machine with torch, and point "
        "autoencoder.lpips_weights at it")


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The PyTorch-named arrays in ``path``: a ``.safetensors`` or ``.npz`` file, or a directory
    with ``vgg16-397923af.pth`` and ``vgg.pth`` (torch needed; never unpickled without it)."""
    path = pathlib.Path(path).expanduser()
    if path.is_dir():
        return _read_pth_dir(path)
    if not path.is_file():
        raise ValueError(f"LPIPS weights: {path} does not exist")
    if path.suffix == ".safetensors":
        return load_safetensors(path, "LPIPS weights: ")
    if path.suffix == ".npz":
        return load_npz(path, "LPIPS weights: ")
    raise ValueError(f"LPIPS weights: {path} is neither a .safetensors or .npz file nor a directory "
                     f"with {VGG_FILE} and {LIN_FILE}")


def load_params(path: str | os.PathLike) -> dict:
    """Validated float32 LPIPS params from ``path`` (see ``read_state_dict``); build the module
    with ``LPIPS(channels=channels_of(params))``."""
    return params_from_state_dict(read_state_dict(path))


def convert_torch_checkpoints(vgg_path: str | os.PathLike, lin_path: str | os.PathLike,
                              out_path: str | os.PathLike) -> None:
    """Write torchvision's VGG16 (``vgg16-397923af.pth``) and lpips' heads (``vgg.pth``) as one
    safetensors file of the keys LPIPS uses. Needs torch; loads with ``weights_only=True``."""
    from safetensors.numpy import save_file

    state = _load_pth([vgg_path, lin_path], "convert_torch_checkpoints needs torch to read .pth files")
    params_from_state_dict(state)  # validate before writing
    keys = expected_shapes(_lin_widths(state))
    save_file({k: np.ascontiguousarray(state[k]) for k in keys}, str(out_path))
