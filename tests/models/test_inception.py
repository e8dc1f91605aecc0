"""FID Inception-v3: pool3 features in parity with pytorch-fid's ``InceptionV3`` (the FID blocks,
resize and scaling) at random weights converted through the loader; the resize against PyTorch's
``F.interpolate``; the weight file formats; and errors naming the bad key.

The PyTorch reference is pytorch-fid's source vendored in ``fid_inception_reference.py`` (torchvision
cannot be installed next to the CPU torch; see that file). Tests that need torch skip without it;
the loader tests run everywhere."""
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from ldm_jax.evaluation import fid
from ldm_jax.models import inception

# pool3 features agree to ~6e-7 of their largest value on CPU (float32, 299 x 299, 94 convs);
# the bound leaves a margin for other CPUs' summation orders.
FEATURE_RTOL = 2e-5


def random_state_dict(seed):
    """Random FID-Inception weights under PyTorch names, as in the real file (with its
    1008-class ``fc``): He-scaled convs, batch-norm statistics away from the identity."""
    rng = np.random.default_rng(seed)
    state = {"fc.weight": rng.standard_normal((1008, 2048), np.float32) * 0.02,
             "fc.bias": np.zeros(1008, np.float32)}
    for key, shape in inception.expected_shapes().items():
        if key.endswith("conv.weight"):
            state[key] = (rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))).astype(np.float32)
        elif key.endswith("running_var"):
            state[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            offset = 1.0 if key.endswith("bn.weight") else 0.0
            state[key] = (offset + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    return state


def assert_trees_equal(a, b):
    flat_a, tree_a = jax.tree_util.tree_flatten(a)
    flat_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b
    for x, y in zip(flat_a, flat_b):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def state():
    return random_state_dict(0)


# ---------------------------------------------------------------------------------------------
# Parity with pytorch-fid


@pytest.fixture(scope="module")
def reference():
    """pytorch-fid's ``InceptionV3([3], resize_input=True, normalize_input=True,
    use_fid_inception=True)`` at random weights, and those weights as numpy (Inception3 names,
    as in pt_inception-2015-12-05-6726825d.pth). Its download is patched to return them, so
    ``fid_inception_v3`` loads them strictly, as it loads the real file."""
    torch = pytest.importorskip("torch")
    from tests.models import fid_inception_reference as ref
    from tests.torch_random import randomize_torch

    torch.manual_seed(0)
    template = ref.Inception3(num_classes=1008)  # the modules of the FID file, randomised below
    randomize_torch(template, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in template.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.mul_(2 ** 0.5)  # He scale: features neither vanish nor blow up over 94 ReLU layers
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    weights = template.state_dict()
    with mock.patch.object(ref, "load_state_dict_from_url", lambda url, progress=True: weights):
        model = ref.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True)
    return model.eval(), {k: v.numpy() for k, v in weights.items()}


@pytest.fixture(scope="module")
def extractor(reference):
    """One jitted forward at batch 2, shared by the tests below."""
    return fid.InceptionFeatures.from_params(inception.params_from_state_dict(reference[1]), batch_size=2)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(3).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def features(extractor, images):
    return extractor.features(images)


def test_features_match_pytorch_fid(reference, images, features):
    import torch

    model, _ = reference
    with torch.no_grad():  # pytorch-fid's loader: ToTensor() (uint8 / 255, NCHW)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        want = model(x)[0][:, :, 0, 0].numpy()  # [2, 2048]
    assert features.shape == (2, 2048) and features.dtype == np.float32
    scale = np.abs(want).max()
    assert want.std() > 0.1 and np.mean(want > 0) > 0.5  # features that carry signal
    assert np.abs(features - want).max() <= FEATURE_RTOL * scale
    assert np.abs(features[0] - features[1]).max() > 100 * FEATURE_RTOL * scale  # images differ


def test_padded_batch_matches_full_batch(extractor, images, features):
    # Three images at batch 2: the second batch holds one image and one of zero padding.
    got = extractor.features(np.stack([images[0], images[1], images[1]]))
    np.testing.assert_allclose(got[:2], features, rtol=0, atol=1e-6 * np.abs(features).max())
    np.testing.assert_allclose(got[2], features[1], rtol=0, atol=1e-6 * np.abs(features).max())


def test_resize_matches_torch_interpolate():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    for h, w in [(64, 64), (37, 501)]:  # up; up in height and down in width
        x = rng.random((1, h, w, 3), dtype=np.float32)
        want = torch.nn.functional.interpolate(
            torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear",
            align_corners=False).permute(0, 2, 3, 1).numpy()
        got = np.asarray(inception.resize_bilinear(jnp.asarray(x)))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=f"{h}x{w}")
    # Why antialias=False: jax.image.resize's default widens the kernel when downsampling.
    default = np.asarray(jax.image.resize(jnp.asarray(x), (1, 299, 299, 3), "bilinear"))
    assert np.abs(default - want).max() > 0.1


def test_wrapper_state_dict_loads_the_same(reference):
    # pytorch-fid's InceptionV3 names the same tensors blocks.{i}.{j}.*
    model, weights = reference
    wrapper = {k: v.numpy() for k, v in model.state_dict().items()}
    assert any(k.startswith("blocks.3.2.") for k in wrapper)
    assert_trees_equal(inception.params_from_state_dict(wrapper), inception.params_from_state_dict(weights))


def test_pth_and_conversion_round_trip(reference, tmp_path):
    torch = pytest.importorskip("torch")
    _, weights = reference
    pth = tmp_path / "pt_inception.pth"
    torch.save({k: torch.from_numpy(v) for k, v in weights.items()}, pth)
    expected = inception.params_from_state_dict(weights)
    assert_trees_equal(inception.load_params(pth), expected)
    inception.convert_torch_checkpoint(pth, tmp_path / "converted.safetensors")
    assert_trees_equal(inception.load_params(tmp_path / "converted.safetensors"), expected)


# ---------------------------------------------------------------------------------------------
# Loading (no torch)


def test_param_tree_matches_torch_names(state):
    params = inception.params_from_state_dict(state)
    kernel = params["Mixed_7c"]["branch3x3dbl_3a"]["conv"]["kernel"]  # torch (384, 384, 1, 3)
    assert kernel.shape == (1, 3, 384, 384)
    np.testing.assert_array_equal(kernel, state["Mixed_7c.branch3x3dbl_3a.conv.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["Mixed_5b"]["branch_pool"]["bn"]["var"],
                                  state["Mixed_5b.branch_pool.bn.running_var"])
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    assert n == 21_820_000  # convs + BN (scale, bias, mean, var) of Inception-v3 without fc


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_file_round_trip(state, tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"
    (save_file if suffix == ".safetensors" else lambda d, p: np.savez(p, **d))(state, str(path))
    assert_trees_equal(inception.load_params(path), inception.params_from_state_dict(state))


def test_bad_weights_name_the_key(state, tmp_path):
    missing = dict(state)
    del missing["Mixed_6b.branch7x7_2.conv.weight"]
    with pytest.raises(ValueError, match=r"missing Mixed_6b\.branch7x7_2\.conv\.weight .*\(128, 128, 1, 7\)"):
        inception.params_from_state_dict(missing)
    transposed = dict(state, **{"Mixed_6b.branch7x7_2.conv.weight": np.zeros((128, 128, 7, 1), np.float32)})
    with pytest.raises(ValueError, match=r"Mixed_6b\.branch7x7_2\.conv\.weight has shape \(128, 128, 7, 1\), "
                                         r"expected \(128, 128, 1, 7\)"):
        inception.params_from_state_dict(transposed)
    with pytest.raises(ValueError, match="unexpected key 'Mixed_8a.conv.weight'"):
        inception.params_from_state_dict(dict(state, **{"Mixed_8a.conv.weight": np.zeros(1)}))
    imagenet = dict(state, **{"fc.weight": np.zeros((1000, 2048), np.float32)})
    with pytest.raises(ValueError, match="torchvision's ImageNet Inception-v3"):
        inception.params_from_state_dict(imagenet)
    with pytest.raises(FileNotFoundError, match="nothing.safetensors does not exist"):
        inception.load_params(tmp_path / "nothing.safetensors")
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match="allowed: .safetensors, .npz, .pth"):
        inception.load_params(tmp_path / "weights.bin")
    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="cannot read"):
        inception.load_params(tmp_path / "broken.safetensors")


def test_images_must_be_rgb():
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        jax.eval_shape(inception.InceptionV3().init, jax.random.PRNGKey(0),
                       jax.ShapeDtypeStruct((1, 64, 64, 4), jnp.uint8))
