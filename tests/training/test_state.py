import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import optim
from ldm_jax.training.state import TrainState, apply_gradients, ema_decay_at, merge_params, split_params


@pytest.fixture(params=[False, True], ids=["tree", "flat"])
def flat(request):
    """Every update test runs on both paths: per parameter array, and on the raveled vector."""
    return request.param


def make(flat, lr=0.1):
    tx = optim.make_optimizer(lr=lr, total_steps=100, grad_clip=None)
    return TrainState.create({"w": jnp.array([1.0, 2.0])}, tx, jax.random.PRNGKey(0), flat=flat), tx


def test_update_and_ema(flat):
    state, tx = make(flat)
    new, info = apply_gradients(state, {"w": jnp.array([1.0, -1.0])}, jnp.float32(0.5), tx, ema_decay=0.9, ema_warmup=False)
    # Adam's first step moves each parameter by lr against the sign of its gradient.
    np.testing.assert_allclose(new.params["w"], [0.9, 2.1], rtol=1e-5)
    np.testing.assert_allclose(new.ema_params["w"], 0.9 * np.array([1.0, 2.0]) + 0.1 * np.array([0.9, 2.1]), rtol=1e-6)
    assert int(new.step) == 1 and bool(info["finite"]) and int(new.nonfinite) == 0


@pytest.mark.parametrize("bad", ["grad", "loss"])
def test_nonfinite_step_is_skipped_and_counted(bad, flat):
    state, tx = make(flat)
    state = state.replace(extra={"x": jnp.zeros(())})
    grads = {"w": jnp.array([jnp.nan if bad == "grad" else 1.0, 1.0])}
    loss = jnp.float32(jnp.inf if bad == "loss" else 1.0)
    new, info = apply_gradients(state, grads, loss, tx, extra={"x": jnp.ones(())})
    np.testing.assert_array_equal(new.params["w"], state.params["w"])
    np.testing.assert_array_equal(new.ema_params["w"], state.ema_params["w"])
    for a, b in zip(jax.tree.leaves(new.opt_state), jax.tree.leaves(state.opt_state)):
        np.testing.assert_array_equal(a, b)
    assert float(new.extra["x"]) == 0.0  # the new stage state of a skipped step is dropped too
    assert int(new.step) == 1 and int(new.nonfinite) == 1 and int(new.nonfinite_streak) == 1
    assert not bool(info["finite"])
    again, _ = apply_gradients(new, grads, loss, tx)
    good, _ = apply_gradients(again, {"w": jnp.ones(2)}, jnp.float32(1.0), tx)
    assert int(again.nonfinite_streak) == 2 and int(good.nonfinite_streak) == 0
    assert int(good.max_nonfinite_streak) == 2 and int(good.nonfinite) == 2


def test_ema_warmup_and_lr_schedule():
    assert float(ema_decay_at(0, 0.999)) == pytest.approx(0.1)
    assert float(ema_decay_at(10_000, 0.999)) == pytest.approx(0.999)
    f = optim.learning_rate_schedule(1.0, 10, 110, "cosine")
    np.testing.assert_allclose([float(f(i)) for i in (0, 5, 10, 60, 110)], [0, 0.5, 1, 0.5, 0], atol=1e-6)
    assert float(optim.learning_rate_schedule(1.0, 0, 100)(0)) == 1.0
    with pytest.raises(ValueError, match="optim.schedule"):
        optim.learning_rate_schedule(1.0, 0, 100, "linear")


def test_gradient_accumulation_averages_micro_batches(flat):
    tx = optim.make_optimizer(lr=0.1, total_steps=10, grad_clip=None, grad_accum=2)
    state = TrainState.create({"w": jnp.zeros(1)}, tx, jax.random.PRNGKey(0), flat=flat)
    s1, _ = apply_gradients(state, {"w": jnp.array([1.0])}, jnp.float32(0), tx)
    np.testing.assert_array_equal(s1.params["w"], [0.0])  # first micro-batch: no update yet
    s2, _ = apply_gradients(s1, {"w": jnp.array([3.0])}, jnp.float32(0), tx)
    ref_tx = optim.make_optimizer(lr=0.1, total_steps=10, grad_clip=None)
    ref, _ = apply_gradients(TrainState.create({"w": jnp.zeros(1)}, ref_tx, jax.random.PRNGKey(0)),
                             {"w": jnp.array([2.0])}, jnp.float32(0), ref_tx)
    np.testing.assert_allclose(s2.params["w"], ref.params["w"], rtol=1e-6)


def test_frozen_paths_are_kept_out_of_the_optimiser_and_the_ema(flat):
    tx = optim.make_optimizer(lr=0.1, total_steps=100, grad_clip=None)
    params = {"enc": {"table": jnp.array([5.0, 6.0]), "w": jnp.array([1.0])}, "head": jnp.array([2.0])}
    state = TrainState.create(params, tx, jax.random.PRNGKey(0), frozen_paths=[("enc", "table")], flat=flat)
    trainable, fixed = split_params(state.params, state.frozen_paths)
    assert set(trainable) == {"enc", "head"} and set(trainable["enc"]) == {"w"}
    assert jax.tree.leaves(fixed) == [state.params["enc"]["table"]]
    # Adam's two moments cover the two trainable numbers (w, head), not the table's two.
    assert sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim) == 2 * 2
    new, _ = apply_gradients(state, {"enc": {"w": jnp.array([1.0])}, "head": jnp.array([-1.0])},
                             jnp.float32(0.0), tx, ema_decay=0.5, ema_warmup=False)
    np.testing.assert_allclose(new.params["enc"]["w"], [0.9], rtol=1e-6)
    np.testing.assert_allclose(new.params["head"], [2.1], rtol=1e-6)
    np.testing.assert_array_equal(new.params["enc"]["table"], [5.0, 6.0])
    np.testing.assert_array_equal(new.ema_params["enc"]["table"], [5.0, 6.0])
    assert merge_params(*split_params(new.params, new.frozen_paths)) == new.params
    with pytest.raises(KeyError, match="enc/nope"):
        split_params(params, [("enc", "nope")])


def test_flat_and_tree_updates_agree():
    """Several steps with clipping, weight decay and a frozen subtree: the raveled update is the
    per-array one (same arithmetic, up to float rounding), and its optimiser state is one vector
    per moment."""
    tx = optim.make_optimizer(lr=0.05, total_steps=10, warmup_steps=2, grad_clip=0.5, weight_decay=0.1)
    rng = np.random.default_rng(0)
    params = {"a": {"k": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "t": jnp.ones(5)},
              "b": jnp.asarray(rng.normal(size=(7,)), jnp.float32)}
    states = [TrainState.create(params, tx, jax.random.PRNGKey(0), frozen_paths=[("a", "t")], flat=f)
              for f in (False, True)]
    assert [x.shape for x in jax.tree.leaves(states[1].opt_state) if x.ndim] == [(19,), (19,)]
    step = jax.jit(lambda s, g: apply_gradients(s, g, jnp.float32(1.0), tx, ema_decay=0.9))
    for i in range(4):
        grads = {"a": {"k": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)},
                 "b": jnp.asarray(rng.normal(size=(7,)), jnp.float32)}
        (tree, info_t), (flat_s, info_f) = step(states[0], grads), step(states[1], grads)
        states = [tree, flat_s]
        np.testing.assert_allclose(info_t["grad_norm"], info_f["grad_norm"], rtol=1e-6)
    for name in ("params", "ema_params"):
        for x, y in zip(jax.tree.leaves(getattr(states[0], name)), jax.tree.leaves(getattr(states[1], name))):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    assert int(states[1].step) == 4 and int(states[1].nonfinite) == 0


@pytest.mark.parametrize("weight_decay,grad_clip,mu_dtype", [(0.1, 2.0, "float32"), (0.0, None, "float32"),
                                                           (0.1, 2.0, "bfloat16")])
def test_fused_update_is_optax(weight_decay, grad_clip, mu_dtype):
    """`optim.AdamW.apply` (the tree update's fused path) against optax's chain through the same
    tree update, over steps with the clip on and off, a warm-up, weight decay, a frozen subtree and a
    non-finite step. With a float32 first moment: the same state to float32 rounding (the same ops;
    XLA's CPU code contracts a multiply and an add into one FMA in some fusions and not others).
    With a bfloat16 one, the fused update reads the stored (rounded) moment where optax reads it
    before rounding: each step's parameter change then differs by at most its bfloat16 rounding
    (2^-8 relative, and Adam's step is at most lr in size). The counters agree exactly."""
    lr = 0.05
    fused = optim.make_optimizer(lr=lr, total_steps=10, warmup_steps=2, grad_clip=grad_clip,
                                 weight_decay=weight_decay, mu_dtype=mu_dtype)
    assert isinstance(fused, optim.AdamW)
    rng = np.random.default_rng(1)
    params = {"a": {"k": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "t": jnp.ones(5)},
              "b": jnp.asarray(rng.normal(size=(7,)), jnp.float32)}
    states = [TrainState.create(params, tx, jax.random.PRNGKey(0), frozen_paths=[("a", "t")])
              for tx in (fused, fused.chain)]
    steps = [jax.jit(lambda s, g, loss, tx=tx: apply_gradients(s, g, loss, tx, ema_decay=0.9))
             for tx in (fused, fused.chain)]
    exact = mu_dtype == "float32"
    clipped = []
    for i, scale in enumerate([0.1, 3.0, 1.0, 0.5, 5.0]):
        grads = {"a": {"k": jnp.asarray(scale * rng.normal(size=(3, 4)), jnp.float32)},
                 "b": jnp.asarray(scale * rng.normal(size=(7,)), jnp.float32)}
        if i == 2:
            grads["b"] = grads["b"].at[3].set(jnp.inf)
        out = [step(s, grads, jnp.float32(1.0)) for step, s in zip(steps, states)]
        states = [s for s, _ in out]
        for x, y in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
            assert x.dtype == y.dtype
            if not jnp.issubdtype(x.dtype, jnp.floating):
                np.testing.assert_array_equal(x, y)
            elif exact:
                np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-8)
            else:  # parameters and EMA: (i + 1) steps of at most lr * 2^-8 each; moments: bfloat16's rounding
                np.testing.assert_allclose(np.float32(x), np.float32(y), rtol=2 ** -7, atol=(i + 1) * lr * 2 ** -8)
        (_, a), (_, b) = out
        assert bool(a["finite"]) == bool(b["finite"]) == (i != 2)
        np.testing.assert_array_max_ulp(a["grad_norm"], b["grad_norm"], maxulp=1)
        clipped.append(bool(grad_clip) and float(a["grad_norm"]) > grad_clip)
    mu = [s.opt_state[-1][0].mu for s in states]
    assert {x.dtype for x in jax.tree.leaves(mu)} == {jnp.dtype(mu_dtype)}
    assert int(states[0].nonfinite) == 1 and int(states[0].step) == 5
    assert not grad_clip or (any(clipped) and not all(clipped))  # both branches of the clip were taken


def test_unknown_mu_dtype_is_refused():
    with pytest.raises(ValueError, match="optim.mu_dtype 'float16'.*float32, bfloat16"):
        optim.make_optimizer(lr=0.1, total_steps=10, mu_dtype="float16")


def test_fused_update_keeps_no_copy_of_the_parameters():
    """XLA's buffer assignment of the update alone (gradients an argument, the state donated, XLA's
    memory-optimised scheduler): optax's chain keeps more than the parameters' size in temporaries
    (clipped gradients, updates, copies of donated moments); the fused update almost nothing (SD 1.5:
    6.0 and 0.11 GiB)."""
    from ldm_jax.runtime.xla_options import compiler_options

    params = {f"layer{i}": {"kernel": jax.ShapeDtypeStruct((64, 128), jnp.float32),
                            "bias": jax.ShapeDtypeStruct((128,), jnp.float32)} for i in range(40)}
    nbytes = sum(x.size * 4 for x in jax.tree.leaves(params))
    tx = optim.make_optimizer(lr=1e-3, total_steps=10, weight_decay=0.01)
    state = jax.eval_shape(lambda p: TrainState.create(p, tx, jax.random.PRNGKey(0)), params)
    memory_scheduler = {**(compiler_options() or {}),
                        "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}

    def temporaries(update, options):
        step = jax.jit(lambda s, g: apply_gradients(s, g, jnp.float32(1.0), update), donate_argnums=0,
                       compiler_options=options)
        return step.lower(state, params).compile().memory_analysis().temp_size_in_bytes / nbytes

    assert temporaries(tx.chain, memory_scheduler) > 1.0
    assert temporaries(tx, memory_scheduler) < 0.05
