import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import optim
from ldm_jax.runs.checkpoint import ShapeMismatchError, StageCheckpoints
from ldm_jax.runtime import sharding
from ldm_jax.training.state import TrainState


def test_mesh_shapes_and_errors():
    mesh = sharding.make_mesh()
    assert mesh.shape == {"data": 4, "fsdp": 1}
    assert sharding.make_mesh(fsdp=2).shape == {"data": 2, "fsdp": 2}
    with pytest.raises(ValueError, match="mesh.fsdp=3"):
        sharding.make_mesh(fsdp=3)
    assert sharding.make_mesh(data=1).devices.shape == (1, 1)  # a single-device run on a 4-device host
    with pytest.raises(ValueError, match="mesh.data=5"):
        sharding.make_mesh(data=5)


def test_fsdp_shards_the_largest_divisible_dimension():
    mesh = sharding.make_mesh(fsdp=2)
    tree = {"k": jnp.zeros((3, 8)), "b": jnp.zeros((5,)), "s": jnp.zeros(())}
    sh = sharding.tree_shardings(tree, mesh, shard_params=True)
    assert sh["k"].spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert sh["b"].spec == jax.sharding.PartitionSpec() and sh["s"].spec == jax.sharding.PartitionSpec()
    assert sharding.tree_shardings(tree, mesh)["k"].spec == jax.sharding.PartitionSpec()
    placed = jax.device_put(tree["k"], sh["k"])
    assert {s.data.shape for s in placed.addressable_shards} == {(3, 4)}


def _state(width=4):
    tx = optim.make_optimizer(lr=1e-3, total_steps=10)
    return TrainState.create({"dense": {"kernel": jnp.arange(2.0 * width).reshape(2, width)}}, tx, jax.random.PRNGKey(3))


def test_save_restore_round_trip(tmp_path):
    ckpt = StageCheckpoints(str(tmp_path), "ldm", keep=2)
    state = _state().replace(step=jnp.int32(7))
    ckpt.save(7, state, {"next_index": 12}, {"scale_factor": 0.5})
    ckpt.save(8, state.replace(step=jnp.int32(8)), {"next_index": 13}, {"scale_factor": 0.5})
    ckpt.save(9, state.replace(step=jnp.int32(9)), {"next_index": 14}, {"scale_factor": 0.5})
    assert ckpt.manager.all_steps() == [8, 9]  # keep the last K
    restored, data, meta = ckpt.restore(jax.eval_shape(lambda: _state()))
    assert int(restored.step) == 9 and data == {"next_index": 14} and meta == {"scale_factor": 0.5}
    assert ckpt.restore_meta() == {"scale_factor": 0.5} and ckpt.restore_meta(8) == {"scale_factor": 0.5}
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        if a.dtype != jax.dtypes.float0:
            assert a.shape == b.shape
    np.testing.assert_array_equal(restored.params["dense"]["kernel"], state.params["dense"]["kernel"])
    np.testing.assert_array_equal(jax.random.key_data(restored.rng) if jnp.issubdtype(restored.rng.dtype, jax.dtypes.prng_key) else restored.rng, state.rng)


def test_restoring_into_other_shapes_names_the_parameter(tmp_path):
    ckpt = StageCheckpoints(str(tmp_path), "ldm")
    ckpt.save(1, _state(4))
    with pytest.raises(ShapeMismatchError, match=r"params/dense/kernel has shape \(2, 4\), but the config gives \(2, 6\)"):
        ckpt.restore(jax.eval_shape(lambda: _state(6)))
