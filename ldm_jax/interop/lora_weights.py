"""LoRA files in and out: diffusers' ``pytorch_lora_weights.safetensors`` <-> our adapter trees
(`ldm_jax.models.lora`).

Written: the peft key format that diffusers' ``StableDiffusionPipeline.save_lora_weights`` writes for
peft-adapted models (diffusers 0.42, peft 0.21; checked against it in tests/interop/test_lora.py):

    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight   [r, in]
    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight   [out, r]
    text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight

with the safetensors metadata ``{"format": "pt", "lora_adapter_metadata": JSON}``, whose keys are
peft ``LoraConfig`` fields prefixed by the network (``"unet.r"``, ``"unet.lora_alpha"``,
``"unet.target_modules"``, ...): diffusers builds each network's LoraConfig from them, so the scale
alpha / r survives the round trip. Text-encoder keys carry transformers 4's ``text_model.`` (what
save_lora_weights writes with transformers 4, and the Hub's files hold); diffusers with transformers
5, which itself writes them without it, reads them the same (checked), and the target_modules
(transformers 5's names, ``encoder.layers.0.self_attn.q_proj``) end both versions' module names.

Read: that format (with or without metadata: without, alpha = r, diffusers' convention), diffusers'
older ``.lora.down.weight`` / ``.lora.up.weight`` / ``.lora_linear_layer.{down,up}.weight`` keys,
text-encoder keys under transformers 4's ``text_model.`` prefix, and kohya's
(``lora_unet_down_blocks_0_..._to_q.lora_down.weight``, ``.lora_up.weight``, ``.alpha``;
``lora_te_text_model_encoder_layers_0_self_attn_q_proj...``). Every layer's alpha / r is folded into
its B on reading, so a read file's adapters apply with scale 1 (times the user's scale).

Module names are diffusers' / transformers' (``to_out.0``); our parameter paths mirror them
(``to_out_0``, `interop.mapping`), and `target_paths` resolves peft-style target lists.
"""
from __future__ import annotations

import collections
import json
import pathlib
import re
from typing import Iterable, Mapping

import numpy as np

from ldm_jax.interop.mapping import flatten, torch_key
from ldm_jax.models import lora
from ldm_jax.runtime.files import load_safetensors

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' LoRA training scripts' default
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
PREFIXES = {"unet": "unet.", "text_encoder": "text_encoder."}
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}


# ---------------------------------------------------------------------------------------------
# Module names


def module_names(params: Mapping) -> dict[str, lora.Path]:
    """{diffusers / transformers module name: our parameter path} of every layer LoRA can adapt (a
    Dense, or a 1x1 convolution) in one network's params."""
    out = {}
    for path, leaf in flatten(params).items():
        shape = tuple(leaf.shape)  # arrays or jax.ShapeDtypeStruct
        if path[-1] == "kernel" and (len(shape) == 2 or (len(shape) == 4 and shape[:2] == (1, 1))):
            out[torch_key(path)[: -len(".weight")]] = path[:-1]
    return out


def target_paths(params: Mapping, targets: Iterable[str]) -> list[lora.Path]:
    """The layers of `params` that peft's ``target_modules=targets`` adapts: a module named `t`, or
    ending in ``.t`` (``to_q``, ``attn2.to_k``, ``to_out.0``). ValueError naming a target that
    matches no layer, with examples of the names there are."""
    names = module_names(params)
    found: dict[str, lora.Path] = {}
    for t in targets:
        if not isinstance(t, str) or not t:
            raise ValueError(f"LoRA target {t!r} must be a module name such as 'to_q' or 'to_out.0'")
        hits = {n: p for n, p in names.items() if n == t or n.endswith("." + t)}
        if not hits:
            examples = sorted({n.rsplit(".", 2 if n.split(".")[-1].isdigit() else 1)[-1] for n in names})
            raise ValueError(f"LoRA target {t!r} matches no layer; the linear layers here end in: "
                             f"{', '.join(repr(e) for e in examples[:30])}")
        found.update(hits)
    return sorted(found.values())


# ---------------------------------------------------------------------------------------------
# Writing


def lora_state_dict(adapters: Mapping[str, Mapping], alpha: float | None = None,
                    params: Mapping[str, Mapping] | None = None) -> tuple[dict, dict]:
    """(state dict {peft key: float32 numpy, torch layout}, the metadata dict diffusers stores) of
    `adapters` ({"unet": tree, "text_encoder": tree}). `alpha`: the scale numerator of every layer
    (scale = alpha / r); None writes alpha = r (scale 1). `params` (the networks' parameters or
    shapes) is needed when a 1x1 convolution is adapted: peft's conv adapters are convolutions
    ([r, in, 1, 1], [out, r, 1, 1]); without it, a layer that is not a Dense is refused."""
    state, meta = {}, {}
    for network, tree in adapters.items():
        if network not in PREFIXES:
            raise ValueError(f"adapters for {network!r}; LoRA files hold {', '.join(PREFIXES)}")
        items = lora.adapter_items(tree)
        if not items:
            continue
        names, ranks = [], {}
        for path, ab in sorted(items.items()):
            name = torch_key(path + ("kernel",))[: -len(".weight")]
            a, b = np.asarray(ab["A"], np.float32), np.asarray(ab["B"], np.float32)
            a_t, b_t = a.T, b.T  # [r, in], [out, r] as torch.nn.Linear weights
            if _is_conv(params, network, path, name):
                a_t, b_t = a_t[:, :, None, None], b_t[:, :, None, None]
            key = f"{PREFIXES[network]}{'text_model.' if network == 'text_encoder' else ''}{name}"
            state[f"{key}.lora_A.weight"] = np.ascontiguousarray(a_t)
            state[f"{key}.lora_B.weight"] = np.ascontiguousarray(b_t)
            names.append(name)
            ranks[name] = a.shape[1]
        r = collections.Counter(ranks.values()).most_common(1)[0][0]
        rank_pattern = {n: k for n, k in ranks.items() if k != r}
        alphas = {n: float(k if alpha is None else alpha) for n, k in ranks.items()}
        lora_alpha = float(r if alpha is None else alpha)
        alpha_pattern = {n: a for n, a in alphas.items() if a != lora_alpha}
        # Full module names as target_modules: peft matches them exactly (no other layer ends in one).
        fields = {"r": r, "lora_alpha": lora_alpha, "target_modules": names, "rank_pattern": rank_pattern,
                  "alpha_pattern": alpha_pattern, "lora_dropout": 0.0, "bias": "none", "use_dora": False,
                  "lora_bias": False, "init_lora_weights": True, "peft_type": "LORA"}
        meta.update({f"{PREFIXES[network]}{k}": v for k, v in fields.items()})
    if not state:
        raise ValueError("no adapters to write")
    return state, meta


def _is_conv(params, network: str, path, name: str) -> bool:
    if params is None:  # names alone: the adapted layers diffusers' and our defaults target are Dense
        if name.rsplit(".", 1)[-1] in ("proj_in", "proj_out", "conv1", "conv2", "conv_shortcut"):
            raise ValueError(f"adapter {network}:{name} may be a convolution: give the networks' params to "
                             "write it (peft stores convolutions' adapters as 1x1 convolutions)")
        return False
    node = params[network]
    for p in path:
        node = node[p]
    return len(tuple(node["kernel"].shape)) == 4


def save_lora_weights(path, adapters: Mapping[str, Mapping], alpha: float | None = None,
                      params: Mapping[str, Mapping] | None = None) -> pathlib.Path:
    """Write `adapters` as diffusers' LoRA file: `path` is a folder (which gets
    pytorch_lora_weights.safetensors, as save_lora_weights(dir) does) or a .safetensors file name.
    Returns the file written. Loads with ``StableDiffusionPipeline.load_lora_weights(folder)``.
    `params`: as `lora_state_dict`."""
    from safetensors.numpy import save_file

    path = pathlib.Path(path).expanduser()
    file = path if path.suffix == ".safetensors" else path / WEIGHT_NAME
    state, meta = lora_state_dict(adapters, alpha, params)
    file.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(file), metadata={"format": "pt", METADATA_KEY: json.dumps(meta, indent=2, sort_keys=True)})
    return file


# ---------------------------------------------------------------------------------------------
# Reading


def lora_file(path) -> pathlib.Path:
    """The LoRA file `path` names: the file itself, or a folder's pytorch_lora_weights.safetensors."""
    path = pathlib.Path(path).expanduser()
    if path.is_dir():
        path = path / WEIGHT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA file {path}" + (f" (a folder must hold {WEIGHT_NAME})"
                                                         if path.name == WEIGHT_NAME else ""))
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: LoRA files are read from .safetensors only (never unpickled)")
    return path


def safetensors_metadata(path: pathlib.Path) -> dict:
    """The `__metadata__` strings of a .safetensors file's header ({} when it has none)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: cannot read the safetensors header ({e})") from None
    return dict(header.get("__metadata__") or {})


# Older diffusers key spellings -> peft's (the attention-processor era's names first).
_LEGACY = ((".processor.to_q_lora.", ".to_q.lora."), (".processor.to_k_lora.", ".to_k.lora."),
           (".processor.to_v_lora.", ".to_v.lora."), (".processor.to_out_lora.", ".to_out.0.lora."),
           (".lora_linear_layer.down.", ".lora_A."), (".lora_linear_layer.up.", ".lora_B."),
           (".lora.down.", ".lora_A."), (".lora.up.", ".lora_B."))
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")
_KOHYA_KEY = re.compile(r"^(?P<module>lora_(?:unet|te)_[A-Za-z0-9_]+)\."
                        r"(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")


def _peft_layers(state: dict, file) -> dict[tuple[str, str], dict]:
    """{(network, module name): {"down": [r, in...], "up": [out, r...], "alpha"?}} of a diffusers /
    peft file."""
    layers: dict = {}
    has_prefix = any(k.startswith(tuple(PREFIXES.values())) for k in state)
    for key, value in state.items():
        k = key
        for old, new in _LEGACY:
            k = k.replace(old, new)
        network = next((n for n, p in PREFIXES.items() if k.startswith(p)), None)
        if network is None and has_prefix:
            raise ValueError(f"{file}: key {key!r} belongs to neither the UNet ('unet.') nor the text encoder "
                             "('text_encoder.')")
        network = network or "unet"  # a file of UNet keys alone, without the prefix (as diffusers reads it)
        k = k[len(PREFIXES[network]):] if k.startswith(PREFIXES[network]) else k
        if network == "text_encoder" and k.startswith("text_model."):
            k = k[len("text_model."):]  # transformers 4's module names
        if k.endswith(".alpha"):
            layers.setdefault((network, k[: -len(".alpha")]), {})["alpha"] = (key, value)
            continue
        m = _PEFT_KEY.match(k)
        if m is None:
            raise ValueError(f"{file}: key {key!r} is not a LoRA weight (expected <module>.lora_A.weight / "
                             ".lora_B.weight, or diffusers' older .lora.down/.lora.up)")
        part = "down" if m["part"] == "lora_A" else "up"
        layers.setdefault((network, m["module"]), {})[part] = (key, value)
    return layers


def _kohya_layers(state: dict, file, names: Mapping[str, Mapping[str, lora.Path]]) -> dict:
    """As `_peft_layers`, for kohya's keys (module names with '_' for '.'), resolved against the
    networks' module names."""
    table = {}
    for network, prefix in KOHYA_PREFIXES.items():
        for name in names.get(network, {}):
            full = ("text_model." + name) if network == "text_encoder" else name
            table[prefix + full.replace(".", "_")] = (network, name)
    layers: dict = {}
    for key, value in state.items():
        m = _KOHYA_KEY.match(key)
        if m is None:
            raise ValueError(f"{file}: key {key!r} is not a kohya LoRA weight (<lora_unet_|lora_te_...>"
                             ".lora_down.weight / .lora_up.weight / .alpha)")
        if m["module"] not in table:
            raise ValueError(f"{file}: key {key!r} names no linear layer of the "
                             f"{'UNet' if m['module'].startswith('lora_unet_') else 'text encoder'}")
        part = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[m["part"]]
        layers.setdefault(table[m["module"]], {})[part] = (key, value)
    return layers


def _alphas_from_metadata(meta: dict, file) -> dict[str, tuple[float | None, dict]]:
    """{network: (lora_alpha or None, alpha_pattern)} from diffusers' lora_adapter_metadata;
    ValueError for the LoraConfig variants whose forward is not W + alpha / r B A (rsLoRA, DoRA)."""
    if METADATA_KEY not in meta:
        return {}
    try:
        fields = json.loads(meta[METADATA_KEY])
    except ValueError as e:
        raise ValueError(f"{file}: metadata {METADATA_KEY!r} is not JSON ({e})") from None
    out = {}
    for network, prefix in PREFIXES.items():
        for flag in ("use_rslora", "use_dora"):
            if fields.get(prefix + flag):
                raise ValueError(f"{file}: metadata {prefix}{flag}=true is not supported (plain LoRA only)")
        alpha = fields.get(prefix + "lora_alpha")
        out[network] = (None if alpha is None else float(alpha), dict(fields.get(prefix + "alpha_pattern") or {}))
    return out


def _pattern_alpha(name: str, pattern: Mapping[str, float]):
    # peft's alpha_pattern keys are regular expressions matched against the end of the module name.
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return float(value)
    return None


def load_lora_weights(path, params: Mapping[str, Mapping]) -> dict[str, dict]:
    """The adapters of a LoRA file (see the module docstring) for the networks of `params`
    ({"unet": unet params, "text_encoder": text encoder params}), each layer's alpha / r folded
    into its B: {"unet": tree, "text_encoder": tree} (a network the file has no layers for is
    absent). ValueError naming the file and the key for keys that match no layer, miss their
    other half, or have the wrong shape."""
    file = lora_file(path)
    state = load_safetensors(file, "LoRA file ")
    if not state:
        raise ValueError(f"{file}: holds no tensors")
    names = {net: module_names(p) for net, p in params.items() if p is not None}
    if all(k.startswith(tuple(KOHYA_PREFIXES.values())) for k in state):
        layers, meta_alphas = _kohya_layers(state, file, names), {}
    else:
        layers, meta_alphas = _peft_layers(state, file), _alphas_from_metadata(safetensors_metadata(file), file)
    items: dict[str, dict] = {}
    for (network, name), parts in sorted(layers.items()):
        any_key = next(iter(parts.values()))[0]
        if network not in names:
            raise ValueError(f"{file}: key {any_key!r} adapts the {network.replace('_', ' ')}, which this model "
                             "does not have")
        if name not in names[network]:
            raise ValueError(f"{file}: key {any_key!r}: {name!r} is not a linear layer of the "
                             f"{network.replace('_', ' ')}")
        for half in ("down", "up"):
            if half not in parts:
                raise ValueError(f"{file}: key {any_key!r} has no {'lora_A/down' if half == 'down' else 'lora_B/up'} "
                                 f"weight for {name!r}")
        (down_key, down), (up_key, up) = parts["down"], parts["up"]
        down, up = np.asarray(down, np.float32), np.asarray(up, np.float32)
        path_ = names[network][name]
        fan_in, fan_out = lora.linear_shape(params[network], path_)
        for key, w, want in ((down_key, down, "[r, in]"), (up_key, up, "[out, r]")):
            if w.ndim == 4 and w.shape[2:] == (1, 1):
                w = w.reshape(w.shape[:2])  # a 1x1 conv's [r, in, 1, 1]
            if w.ndim != 2:
                raise ValueError(f"{file}: key {key!r} has shape {tuple(w.shape)}; expected {want} "
                                 "(LoRA on convolutions wider than 1x1 is not supported)")
            if key == down_key:
                down = w
            else:
                up = w
        rank = down.shape[0]
        if down.shape != (rank, fan_in) or up.shape != (fan_out, rank):
            raise ValueError(f"{file}: keys {down_key!r} {tuple(down.shape)} and {up_key!r} {tuple(up.shape)} do "
                             f"not fit {name!r} (in {fan_in}, out {fan_out}): expected ({rank}, {fan_in}) and "
                             f"({fan_out}, {rank})")
        alpha = None
        if "alpha" in parts:
            alpha = float(np.asarray(parts["alpha"][1]).reshape(()))
        elif network in meta_alphas:
            lora_alpha, pattern = meta_alphas[network]
            alpha = _pattern_alpha(name, pattern)
            alpha = lora_alpha if alpha is None else alpha
        scale = 1.0 if alpha is None else alpha / rank  # no alpha: alpha = r (diffusers' convention)
        items.setdefault(network, {})[path_] = {"A": down.T.copy(), "B": (up.T * scale).astype(np.float32)}
    return {network: lora.adapter_tree(it) for network, it in items.items()}
