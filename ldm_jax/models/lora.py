"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") on our frozen
linen networks, without touching their modules.

A targeted linear layer ``y = x W + b`` (``nn.Dense``, or a 1x1 ``nn.Conv``, whose kernel acts on the
channel axis alone) becomes ``y = x W + b + scale * dropout(x) A B`` (eq. 3 of the paper, with
peft's input dropout), with ``A [in, r]``, ``B [r, out]`` and ``scale = alpha / r``. The adapters are
a pytree of their own, shaped like the network's parameter tree down to the adapted layers:

    adapters = {"unet": {"down_blocks_0": {... {"attn1": {"to_q": {"A": [in, r], "B": [r, out]}}}}},
                "text_encoder": {"encoder": {"layers_0": {"self_attn": {"q_proj": {"A", "B"}}}}}}

so the frozen parameters stay as they are (no optimiser state, no copies) and the adapters alone are
trained, averaged and checkpointed. Two ways to use them:

    with adapted(adapters, scale):            # the networks' applies inside add the low-rank term
        loss = model.loss_terms(params, ...)  # (flax.linen.intercept_methods; works under jit, grad, remat)
    params = merge(params, adapters, scale)   # W + scale * A B: exact, for sampling and export

Which layers to adapt is a list of parameter paths (``interop.lora_weights.target_paths`` turns
diffusers / peft module names such as ``to_q`` or ``to_out.0`` into them).
"""
from __future__ import annotations

import contextlib
import zlib
from typing import Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models.text_encoder import CLIPTextEncoder
from ldm_jax.models.unet import UNet

# The networks adapters can attach to, by the key their parameters have in a model's params dict.
NETWORKS = {"unet": UNet, "text_encoder": CLIPTextEncoder}
INITS = ("kaiming", "gaussian")  # peft's init_lora_weights=True (kaiming-uniform A) and "gaussian"

Path = tuple[str, ...]


def is_adapter(node) -> bool:
    """Whether a node of an adapter tree is one layer's adapter ({"A", "B"})."""
    return isinstance(node, Mapping) and set(node) == {"A", "B"}


def adapter_items(tree: Mapping, prefix: Path = ()) -> dict[Path, dict]:
    """{layer path: {"A", "B"}} of one network's adapter tree."""
    out = {}
    for key, node in tree.items():
        if is_adapter(node):
            out[prefix + (key,)] = node
        elif isinstance(node, Mapping):
            out.update(adapter_items(node, prefix + (key,)))
        else:
            raise ValueError(f"adapter tree: {'/'.join(prefix + (key,))} is neither a layer's {{'A', 'B'}} "
                             "nor a subtree")
    return out


def adapter_tree(items: Mapping[Path, dict]) -> dict:
    """The inverse of `adapter_items`."""
    tree: dict = {}
    for path, adapter in items.items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = dict(adapter)
    return tree


def _layer(params: Mapping, path: Path):
    node = params
    for p in path:
        if not isinstance(node, Mapping) or p not in node:
            raise ValueError(f"no layer {'/'.join(path)} in the parameters")
        node = node[p]
    kernel = node.get("kernel") if isinstance(node, Mapping) else None
    if kernel is None:
        raise ValueError(f"{'/'.join(path)} has no kernel: not a Dense or 1x1 convolution")
    shape = tuple(kernel.shape)
    if not (len(shape) == 2 or (len(shape) == 4 and shape[:2] == (1, 1))):
        raise ValueError(f"{'/'.join(path)}: kernel of shape {shape} is not a Dense's or a 1x1 convolution's; "
                         "LoRA adapts linear maps of the channels only")
    return kernel


def linear_shape(params: Mapping, path: Path) -> tuple[int, int]:
    """(in, out) of the layer at `path` (a Dense, or a 1x1 conv); `params` may hold arrays or
    shapes (`jax.ShapeDtypeStruct`). ValueError naming the path for anything else."""
    shape = tuple(_layer(params, path).shape)
    return shape[-2], shape[-1]


def linear_kernel(params: Mapping, path: Path):
    """The kernel of the layer at `path` as [in, out] (a Dense's, or a 1x1 conv's [1, 1, in, out])."""
    kernel = _layer(params, path)
    return kernel.reshape(kernel.shape[-2:])


def init_adapters(rng, params: Mapping, paths: Iterable[Path], rank: int, init: str = "kaiming") -> dict:
    """Fresh adapters for the layers at `paths` of one network's `params`: B = 0 (the adapted network
    starts as the frozen one) and A as peft initialises it: "kaiming" (its default,
    kaiming-uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))) or "gaussian" (N(0, 1/r))."""
    if init not in INITS:
        raise ValueError(f"LoRA init {init!r} is not supported; allowed: {', '.join(INITS)}")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"LoRA rank={rank!r} must be a positive integer")
    items = {}
    for i, path in enumerate(sorted(paths)):
        fan_in, fan_out = linear_shape(params, path)
        key = jax.random.fold_in(rng, i)
        if init == "kaiming":
            bound = 1.0 / np.sqrt(fan_in)
            a = jax.random.uniform(key, (fan_in, rank), jnp.float32, -bound, bound)
        else:
            a = jax.random.normal(key, (fan_in, rank), jnp.float32) / rank
        items[path] = {"A": a, "B": jnp.zeros((rank, fan_out), jnp.float32)}
    if not items:
        raise ValueError("no layers to adapt (the target list matched nothing)")
    return adapter_tree(items)


def merge(params: Mapping, adapters: Mapping, scale: float = 1.0) -> dict:
    """One network's `params` with ``W + scale * A B`` in every adapted layer (numpy float32 for the
    merged kernels; the rest is shared). Exact: the merged network computes what the adapted one does."""
    out = jax.tree.map(lambda x: x, dict(params))  # new dicts, same leaves
    for path, ab in adapter_items(adapters).items():
        kernel = linear_kernel(params, path)
        a, b = np.asarray(ab["A"], np.float32), np.asarray(ab["B"], np.float32)
        if a.shape[0] != kernel.shape[0] or b.shape[1] != kernel.shape[1] or a.shape[1] != b.shape[0]:
            raise ValueError(f"adapter {'/'.join(path)}: A {a.shape} and B {b.shape} do not fit the kernel "
                             f"{tuple(kernel.shape)} ([in, out])")
        node = out
        for p in path:
            node[p] = dict(node[p])
            node = node[p]
        full = np.asarray(node["kernel"], np.float32)
        node["kernel"] = (full + (scale * (a @ b)).reshape(full.shape)).astype(np.asarray(node["kernel"]).dtype)
    return out


def _dropout(x, rate: float, rng, path: Path):
    # One key per layer (its path's checksum), so a rematerialised forward draws the same mask.
    key = jax.random.fold_in(rng, zlib.crc32("/".join(path).encode()))
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


@contextlib.contextmanager
def adapted(adapters: Mapping[str, Mapping], scale: float = 1.0, *, dropout: float = 0.0, rng=None):
    """Inside this context, every apply of a network in `NETWORKS` whose key `adapters` holds adds
    ``scale * dropout(x) A B`` to its adapted layers' outputs (see the module docstring). `dropout`
    needs `rng` (training); the context must enclose the tracing of the applies (put it inside the
    jitted function). Adapters of a layer that the network never calls are an error at exit."""
    if dropout and rng is None:
        raise ValueError("LoRA dropout needs an rng")
    unknown = set(adapters) - set(NETWORKS)
    if unknown:
        raise ValueError(f"adapters for unknown networks {sorted(unknown)}; allowed: {', '.join(NETWORKS)}")
    by_network = {name: adapter_items(tree) for name, tree in adapters.items()}
    roots: list[str | None] = []  # the network whose apply is running (a stack: applies may nest)
    ran: set[str | None] = set()
    used: set[tuple[str, Path]] = set()

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if module.path == ():  # the root module of an apply: note which network it is
            roots.append(next((n for n, cls in NETWORKS.items() if isinstance(module, cls)), None))
            if roots[-1] in by_network and getattr(module, "scan_layers", False):
                roots.pop()
                raise ValueError(f"LoRA adapters on a {type(module).__name__} with "
                                 "scan_layers=True: the scanned layers run as one loop body the adapters cannot "
                                 "reach; apply it with scan_layers=False (the parameter tree is the same)")
            ran.add(roots[-1])
            try:
                return next_fun(*args, **kwargs)
            finally:
                roots.pop()
        y = next_fun(*args, **kwargs)
        if context.method_name != "__call__" or not roots or roots[-1] not in by_network:
            return y
        ab = by_network[roots[-1]].get(tuple(module.path))
        if ab is None or not isinstance(module, (nn.Dense, nn.Conv)):
            return y
        used.add((roots[-1], tuple(module.path)))
        x = args[0]
        if dropout:
            x = _dropout(x, dropout, rng, tuple(module.path))
        dtype = y.dtype  # the layer's activation dtype (bfloat16 in mixed precision)
        delta = (x.astype(dtype) @ ab["A"].astype(dtype)) @ ab["B"].astype(dtype)
        return y + (scale * delta).astype(dtype)

    with nn.intercept_methods(interceptor):
        yield
    # A network that ran must have called every layer it has adapters for (else they name no layer).
    unused = [f"{name}:{'/'.join(p)}" for name, items in by_network.items() if name in ran
              for p in items if (name, p) not in used]
    if unused:
        raise ValueError(f"LoRA adapters for layers the network never called: {unused[:10]}")
