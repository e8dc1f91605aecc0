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

import jax  # noqa: E402

# Exact float32 matmuls on CPU so parity tests compare like with like.
jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402

from tests.sizes import SMALL_SHAPES  # noqa: E402


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """A small shapes build shared by the data and evaluation tests (the full build's code, fewer images)."""
    from ldm_jax.data import builder

    data_dir = str(tmp_path_factory.mktemp("datasets"))
    builder.prepare("shapes", data_dir, **SMALL_SHAPES)
    return data_dir
