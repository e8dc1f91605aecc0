"""LPIPS (VGG): parity with a PyTorch LPIPS built here from torch.nn layers (torchvision's VGG16
``features`` layout, lpips' heads and normalisation) at random weights through the loader; the
metric's closed-form properties (d(x, x) = 0, symmetry, d >= 0 for non-negative heads, linearity
in the heads, a finite gradient where features vanish); the file formats; and errors naming the
bad key."""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from ldm_jax.models import lpips

TINY = (4, 8, 8, 16, 16)  # VGG16-shaped, narrow: the same code path at a fraction of the cost
# torchvision's vgg16 "D" configuration: widths by conv, "M" a 2x2 max-pool.
VGG16_CFG = (0, 0, "M", 1, 1, "M", 2, 2, 2, "M", 3, 3, 3, "M", 4, 4, 4, "M")


def random_state_dict(channels, seed, lin_low=0.0):
    """Random PyTorch-named LPIPS weights (He-scaled convs, non-zero biases, heads uniform in
    [lin_low, 1): non-negative by default, as the trained heads are)."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in lpips.expected_shapes(channels).items():
        if key.startswith("lin"):
            state[key] = rng.uniform(lin_low, 1.0, shape).astype(np.float32)
        elif key.endswith("weight"):
            fan_in = shape[1] * 9
            state[key] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        else:
            state[key] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    return state


def images(shape, seed):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


@pytest.fixture(scope="module")
def distance():
    """jit(d)(params, x, y), compiled per parameter shape / image shape."""
    @jax.jit
    def d(params, x, y):
        return lpips.LPIPS(channels=lpips.channels_of(params)).apply({"params": params}, x, y)
    return d


# ---------------------------------------------------------------------------------------------
# Parity with a PyTorch LPIPS


def torch_lpips(channels):
    """taming-transformers / lpips ``LPIPS`` (VGG, eval) from torch.nn layers: ``features`` is
    torchvision's ``vgg16().features`` layout, sliced at relu1_2 .. relu5_3 as lpips does."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class NetLinLayer(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, stride=1, padding=0, bias=False))

    class Reference(nn.Module):
        def __init__(self):
            super().__init__()
            layers, c_in = [], 3
            for v in VGG16_CFG:
                if v == "M":
                    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                else:
                    layers += [nn.Conv2d(c_in, channels[v], kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                    c_in = channels[v]
            self.features = nn.Sequential(*layers)
            for i, c in enumerate(channels):
                setattr(self, f"lin{i}", NetLinLayer(c))
            self.register_buffer("shift", torch.tensor([-.030, -.088, -.188])[None, :, None, None], persistent=False)
            self.register_buffer("scale", torch.tensor([.458, .448, .450])[None, :, None, None], persistent=False)

        def taps(self, x):  # lpips.pretrained_networks.vgg16 slices [0:4], [4:9], [9:16], [16:23], [23:30]
            outs, h = [], x
            for start, stop in ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30)):
                h = self.features[start:stop](h)
                outs.append(h)
            return outs

        def forward(self, x, y):  # NCHW in [-1, 1] -> [B, 1, 1, 1]
            def normalize_tensor(f, eps=1e-10):
                return f / (torch.sqrt(torch.sum(f ** 2, dim=1, keepdim=True)) + eps)

            fx, fy = self.taps((x - self.shift) / self.scale), self.taps((y - self.shift) / self.scale)
            val = 0
            for i, (a, b) in enumerate(zip(fx, fy)):
                diff = (normalize_tensor(a) - normalize_tensor(b)) ** 2
                val = val + getattr(self, f"lin{i}").model(diff).mean([2, 3], keepdim=True)
            return val

    return Reference().eval()


def test_parity_with_torch_reference(distance):
    """Full VGG16 widths, random weights, an odd-sized batch (48x40: the last pool floors 5 -> 2)."""
    torch = pytest.importorskip("torch")
    ref = torch_lpips(lpips.VGG16_CHANNELS)
    state = random_state_dict(lpips.VGG16_CHANNELS, seed=0)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    assert set(state) == set(ref.state_dict())
    params = lpips.params_from_state_dict({k: v.numpy() for k, v in ref.state_dict().items()})
    x, y = images((3, 48, 40, 3), 1), images((3, 48, 40, 3), 2)
    y[2] = x[2] + 0.05 * images((48, 40, 3), 3)  # a near pair: small distance, same tolerance
    with torch.no_grad():
        expected = ref(*(torch.from_numpy(a).permute(0, 3, 1, 2) for a in (x, y))).numpy().reshape(-1)
    out = np.asarray(distance(params, x, y))
    rel = np.abs(out - expected) / np.abs(expected)
    print(f"\nLPIPS parity (VGG16, random weights): jax {out}, torch {expected}, max rel err {rel.max():.2e}")
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    assert expected[2] < 0.5 * expected[:2].min()  # the near pair is nearer: the test can tell


# ---------------------------------------------------------------------------------------------
# Closed-form properties


@pytest.fixture(scope="module")
def tiny_params():
    return lpips.params_from_state_dict(random_state_dict(TINY, seed=4))


def test_metric_properties(distance, tiny_params):
    x, y = images((4, 32, 32, 3), 5), images((4, 32, 32, 3), 6)
    d_xy, d_yx, d_xx = (np.asarray(distance(tiny_params, a, b)) for a, b in ((x, y), (y, x), (x, x)))
    # x and y go through VGG as one batch: rows of a batched conv agree to rounding, not bitwise.
    np.testing.assert_allclose(d_xx, 0.0, atol=1e-12)
    np.testing.assert_allclose(d_xy, d_yx, rtol=1e-6)
    assert np.all(d_xy > 0)
    # Each layer's term is a mean of w . (unit - unit)^2 <= 4 * sum(w): a bound that can fail.
    bound = sum(4 * float(tiny_params[f"lin{l}"]["kernel"].sum()) for l in range(5))
    assert np.all(d_xy <= bound)
    # d is linear in the heads: non-negativity comes from non-negative heads (as trained), and
    # negated heads give exactly -d.
    negated = jax.tree.map(np.copy, tiny_params)
    for l in range(5):
        negated[f"lin{l}"]["kernel"] *= -1
    np.testing.assert_allclose(distance(negated, x, y), -d_xy, rtol=1e-6)


def test_parameter_counts_match_vgg16():
    shapes = lpips.expected_shapes()
    conv = sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith("features"))
    assert conv == 14_714_688  # torchvision vgg16().features
    assert sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith("lin")) == 1472
    assert lpips.channels_of(lpips.params_from_state_dict(random_state_dict(TINY, 0))) == TINY


def test_unit_normalize_value_and_gradient_at_an_all_zero_pixel():
    """lpips' normalize_tensor, and a finite gradient where its sqrt has none: at an all-zero
    pixel d/df sum(c * f / (|f| + eps)) = c / eps exactly (a NaN with a plain sqrt)."""
    rng = np.random.default_rng(10)
    f, c = rng.uniform(0, 1, (2, 3, 3, 5)).astype(np.float32), rng.standard_normal((2, 3, 3, 5)).astype(np.float32)
    f[0, 1, 2] = 0.0
    np.testing.assert_allclose(lpips.unit_normalize(f), f / (np.linalg.norm(f, axis=-1, keepdims=True) + 1e-10),
                               rtol=1e-6)
    grad = np.asarray(jax.jit(jax.grad(lambda f: jnp.sum(c * lpips.unit_normalize(f))))(f))
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad[0, 1, 2], c[0, 1, 2] / 1e-10, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Files and errors


def test_file_formats_load_the_same_params(tmp_path):
    state = random_state_dict(TINY, seed=9)
    state["classifier.0.weight"] = np.zeros((2, 3), np.float32)  # torchvision extras are ignored
    expected = lpips.params_from_state_dict(state)
    save_file(state, str(tmp_path / "w.safetensors"))
    np.savez(tmp_path / "w.npz", **state)
    loaded = [lpips.load_params(tmp_path / "w.safetensors"), lpips.load_params(str(tmp_path / "w.npz"))]
    torch = pytest.importorskip("torch")
    folder = tmp_path / "pth"
    folder.mkdir()
    torch.save({k: torch.from_numpy(v) for k, v in state.items() if not k.startswith("lin")},
               folder / lpips.VGG_FILE)
    torch.save({k: torch.from_numpy(v) for k, v in state.items() if k.startswith("lin")},
               folder / lpips.LIN_FILE)
    loaded.append(lpips.load_params(folder))
    lpips.convert_torch_checkpoints(folder / lpips.VGG_FILE, folder / lpips.LIN_FILE,
                                    tmp_path / "combined.safetensors")
    loaded.append(lpips.load_params(tmp_path / "combined.safetensors"))
    for params in loaded:
        assert jax.tree.structure(params) == jax.tree.structure(expected)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
            np.testing.assert_array_equal(a, b)


def test_pth_directory_is_refused_without_torch(tmp_path, monkeypatch):
    for name in (lpips.VGG_FILE, lpips.LIN_FILE):
        (tmp_path / name).write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(ValueError, match="safetensors"):
        lpips.load_params(tmp_path)


def test_bad_files_fail_naming_the_key(tmp_path):
    state = {k: np.zeros(s, np.float32) for k, s in lpips.expected_shapes().items()}
    bad = dict(state, **{"features.2.weight": np.zeros((64, 32, 3, 3), np.float32)})
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"features\.2\.weight.*\(64, 32, 3, 3\).*expected \(64, 64, 3, 3\)"):
        lpips.load_params(tmp_path / "bad.safetensors")
    missing = {k: v for k, v in state.items() if k != "features.26.bias"}
    np.savez(tmp_path / "missing.npz", **missing)
    with pytest.raises(ValueError, match=r"missing features\.26\.bias \(expected shape \(512,\)\)"):
        lpips.load_params(tmp_path / "missing.npz")
    transposed = dict(state, **{"lin3.model.1.weight": np.zeros((512, 1, 1, 1), np.float32)})
    with pytest.raises(ValueError, match=r"lin3\.model\.1\.weight.*expected \(1, 512, 1, 1\)"):
        lpips.params_from_state_dict(transposed)
    with pytest.raises(ValueError, match="does not exist"):
        lpips.load_params(tmp_path / "nowhere.safetensors")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cannot read"):
        lpips.load_params(tmp_path / "junk.npz")
    (tmp_path / "w.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"\.safetensors or \.npz"):
        lpips.load_params(tmp_path / "w.pt")
    with pytest.raises(ValueError, match=lpips.LIN_FILE):
        lpips.load_params(tmp_path)  # a directory without the .pth files
