"""Test-wide setup: CPU only, four fake devices, no network.

These variables must be set before jax is first imported, which is why they live at the top of
the conftest (pytest imports it before any test module).
"""
import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import shutil  # noqa: E402
import tempfile  # noqa: E402

# One persistent compilation cache per test session, made by the controlling process and
# inherited by the xdist workers: a program compiled by several test files (the tiny models'
# steps and samplers) is compiled once. Never the user's cache, so that a local run costs what a
# clean CI run does; removed at the end of the session.
if "_LDM_JAX_TEST_CACHE" not in os.environ:
    os.environ["_LDM_JAX_TEST_CACHE"] = tempfile.mkdtemp(prefix="ldm_jax_test_jax_cache_")
    _OWN_CACHE = True
else:
    _OWN_CACHE = False
os.environ["LDM_JAX_COMPILATION_CACHE"] = os.environ["_LDM_JAX_TEST_CACHE"]

import jax  # noqa: E402

# Exact float32 matmuls on CPU so parity tests compare like with like.
jax.config.update("jax_default_matmul_precision", "highest")

from ldm_jax.training.loop import enable_compilation_cache  # noqa: E402

enable_compilation_cache()  # reads LDM_JAX_COMPILATION_CACHE


import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Files with slow tests run first (stable order otherwise): with xdist handing out whole
    files, the longest ones then start early instead of keeping one worker busy at the end."""
    slow = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in slow)


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(os.environ["_LDM_JAX_TEST_CACHE"], ignore_errors=True)


from tests.sizes import SMALL_SHAPES  # noqa: E402


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """A small shapes build shared by the data and evaluation tests (the full build's code, fewer images)."""
    from ldm_jax.data import builder

    data_dir = str(tmp_path_factory.mktemp("datasets"))
    builder.prepare("shapes", data_dir, **SMALL_SHAPES)
    return data_dir
