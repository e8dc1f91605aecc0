"""LoRA training (the `lora` config group, `ldm.adapters`): a tiny random SD folder imported as a run
(`diffusers_runs.config_for_diffusers`) with rank-4 adapters on the UNet's attention and the text
encoder's, trained a few steps by the stage's own step; the adapters alone are trained, carry the
optimiser state and the EMA, and the export loads in diffusers (parity extra) computing what our
adapted networks compute. The step is DreamBooth-LoRA's (one of the two examples is a prior-preservation
class image, weighed 0.5). Also the config's checks and configs/sd15_lora.py's adapter count."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import config as config_lib
from ldm_jax.ldm import adapters, sources
from ldm_jax.models import lora
from ldm_jax.models.text_encoder import tokenize
from ldm_jax.training import ldm_stage
from tests.training.tiny import CHEAP_COMPILE, ROOT

PROMPTS = ["a photo of a cat", "a red circle"]


def test_sd15_lora_config_adapts_the_attention_projections():
    """configs/sd15_lora.py: rank 4 on to_q, to_k, to_v, to_out.0 of SD 1.5's 16 transformer blocks is
    797,184 parameters in 256 arrays (diffusers' SD 1.5 LoRA); with the text encoder, CLIP-L's 48
    attention projections add 294,912 (shapes only)."""
    config = config_lib.load_config(f"{ROOT}/configs/sd15_lora.py", ["lora.text_encoder=True"])
    config_lib.validate(config)
    model = ldm_stage.build_models(config)
    shapes = jax.eval_shape(lambda rng: ldm_stage.init_params(config, model, rng), jax.random.PRNGKey(0))
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
    assert set(shapes) == {"lora"} and set(shapes["lora"]) == {"unet", "text_encoder"}
    assert (count(shapes["lora"]["unet"]), len(jax.tree.leaves(shapes["lora"]["unet"]))) == (797_184, 256)
    assert count(shapes["lora"]["text_encoder"]) == 294_912
    assert adapters.from_config(config).scale == 1.0


@pytest.mark.parametrize("key, value, message", [
    ("lora.rank", 0, "lora.rank=0 must be a positive integer"),
    ("lora.alpha", -1.0, "lora.alpha=-1.0 must be a positive number"),
    ("lora.dropout", 1.0, r"lora.dropout=1.0 must be in \[0, 1\)"),
    ("lora.init", "zeros", "lora.init='zeros' is not allowed; allowed: 'kaiming', 'gaussian'"),
    ("lora.unet_targets", (), "lora.unet_targets=.* must be a non-empty list"),
    ("lora.base", "/models/sd15", "lora.base='/models/sd15' is not allowed; allowed: 'diffusers:<path>'"),
    ("text_encoder.train", True, "set text_encoder.train=False"),
    ("autoencoder.source", "train", "autoencoder.source must be its autoencoder"),
])
def test_bad_lora_keys_are_named(key, value, message):
    config = config_lib.load_config(f"{ROOT}/configs/sd15_lora.py")
    group, name = key.split(".")
    config[group][name] = value
    with pytest.raises(ValueError, match=message):
        config_lib.validate(config)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(config, model, frozen, state after 3 steps, state at step 0) of a LoRA run on the tiny folder."""
    pytest.importorskip("diffusers")
    from ldm_jax.interop import diffusers as hf
    from ldm_jax.training.diffusers_runs import config_for_diffusers
    from tests.interop.test_lora import tiny_sd_pipeline

    folder = tmp_path_factory.mktemp("sd_lora_run")
    tiny_sd_pipeline(seed=7).save_pretrained(str(folder), safe_serialization=True)
    config = config_for_diffusers(hf.load_diffusers_dir(folder), str(folder))
    config.lora.update(enabled=True, base=f"diffusers:{folder}", rank=4, alpha=8.0, dropout=0.1, text_encoder=True,
                       unet_targets=("to_q", "to_k", "to_v", "to_out.0", "proj_in"))  # proj_in: a 1x1 conv
    config.data.batch_size = 2
    config.dreambooth.update(class_prompt=PROMPTS[1], prior_loss_weight=0.5)  # DreamBooth-LoRA's step: a class image
    config.optim.update(lr=1e-2, warmup_steps=0, ema_decay=0.9)
    config.train.remat = True  # as configs/sd15_lora.py: the adapters' forward inside rematerialised blocks
    config_lib.validate(config)
    model = ldm_stage.build_models(config)
    frozen = {"autoencoder": sources.autoencoder_params(config, None, None), "scale": np.float32(0.18215),
              "text_encoder": sources.text_encoder_params(config),
              "unet": adapters.from_config(config).base_unet_params(model)}  # as the training loop's run_ldm
    state0 = jax.jit(lambda rng: ldm_stage.init_state(config, model, rng))(jax.random.PRNGKey(0))
    step = jax.jit(ldm_stage.make_train_step(config, model), compiler_options=CHEAP_COMPILE)
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32),
             "ids": tokenize(model.conditioning.tokenizer, PROMPTS)}
    state, losses = state0, []
    for _ in range(3):
        state, metrics = step(state, batch, frozen)
        losses.append(float(metrics["loss"]))
    return dict(config=config, model=model, frozen=frozen, state=state, state0=state0,
                losses=losses, folder=folder)


def test_only_the_adapters_train(run):
    state, state0, model = run["state"], run["state0"], run["model"]
    assert int(state.step) == 3 and int(state.nonfinite) == 0 and all(np.isfinite(run["losses"]))
    # The state holds the adapters alone: params, EMA, optimiser state (flat AdamW moments of their size).
    assert set(state.params) == set(state.ema_params) == {"lora"}
    assert set(state.params["lora"]) == {"unet", "text_encoder"}
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    sizes = {int(np.size(x)) for x in jax.tree.leaves(state.opt_state)}
    assert n in sizes and sizes <= {1, n}, sizes
    # Every adapter moved: B from its zeros, A from peft's init.
    for net in ("unet", "text_encoder"):
        items, items0 = lora.adapter_items(state.params["lora"][net]), lora.adapter_items(state0.params["lora"][net])
        assert items and all(np.abs(np.asarray(ab["B"])).max() > 0 for ab in items.values()), net
        assert all(not np.array_equal(ab["A"], items0[p]["A"]) for p, ab in items.items()), net
        assert not any(np.any(items0[p]["B"]) for p in items), net
    assert run["losses"][-1] != run["losses"][0]


def test_export_loads_in_diffusers_with_the_same_outputs(run, tmp_path):
    """The run's export (`LoraSetup.export`, which the loop calls at the end) in diffusers'
    pipe.load_lora_weights: its text encoder and UNet (adapters on a 1x1 convolution included) compute
    what our adapted ones do (eval mode), and so do ours with the adapters merged into the weights."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    config, model, state = run["config"], run["model"], run["state"]
    setup = adapters.from_config(config)
    file = setup.export(str(tmp_path), state.ema_params["lora"], model)
    assert file.name == "pytorch_lora_weights.safetensors"

    ids = tokenize(model.conditioning.tokenizer, PROMPTS)
    x = np.random.default_rng(1).standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([20, 800], np.int32)
    params = {**run["frozen"], "lora": state.ema_params["lora"]}

    @functools.partial(jax.jit, compiler_options=CHEAP_COMPILE)
    def ours(params):
        with adapters.applied(setup, params):
            context = model.context(params, ids)
            return context, model.unet.apply({"params": params["unet"]}, x, t, context)

    context, eps = ours(params)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(run["folder"]), local_files_only=True)
    pipe.load_lora_weights(str(tmp_path))
    with torch.no_grad():
        ref_context = pipe.text_encoder(torch.from_numpy(ids).long())[0]
        ref_eps = pipe.unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t), ref_context).sample
    ref_context, ref_eps = ref_context.numpy(), ref_eps.numpy().transpose(0, 2, 3, 1)
    # The adapters merged into the weights (W + scale A B; zero adapters on top) compute the same:
    zero = jax.tree.map(jnp.zeros_like, params["lora"])
    merged_context, merged_eps = ours({**setup.merged(params, params["lora"]), "lora": zero})
    _, frozen_eps = ours({**params, "lora": zero})
    rel = lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(1.0, np.abs(b).max()))  # noqa: E731
    errs = {"diffusers text": rel(context, ref_context), "diffusers unet": rel(eps, ref_eps),
            "merged text": rel(merged_context, context), "merged unet": rel(merged_eps, eps)}
    moved = np.abs(np.asarray(eps) - np.asarray(frozen_eps)).max()
    print("\ntrained LoRA, max rel err: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items())
          + f" (the adapters moved eps by {moved:.3f})")
    assert all(v <= 1e-5 for v in errs.values()), errs
    assert moved > 1e-3


def test_a_lora_checkpoint_holds_the_adapters_and_samples_merged(run, tmp_path):
    """A LoRA run's checkpoint holds the adapters alone (far smaller than the UNet), and
    LatentDiffusionPipeline.from_workdir samples the base with its EMA adapters merged in."""
    from ldm_jax.pipeline import LatentDiffusionPipeline
    from ldm_jax.runs import run_record
    from ldm_jax.runs.checkpoint import StageCheckpoints

    config, state = run["config"], run["state"]
    run_record.write_config(str(tmp_path), config)
    ckpt = StageCheckpoints(str(tmp_path), "ldm")
    ckpt.save(3, state, meta={"scale_factor": 0.18215})
    ckpt.close()
    stored = sum(f.stat().st_size for f in (tmp_path / "checkpoints").rglob("*") if f.is_file())
    unet_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(run["frozen"]["unet"]))
    assert stored < unet_bytes / 2, (stored, unet_bytes)

    pipe = LatentDiffusionPipeline.from_workdir(str(tmp_path))
    want = adapters.from_config(config).merged(run["frozen"], state.ema_params["lora"])
    for net in ("unet", "text_encoder"):
        leaves, ref = jax.tree.leaves(pipe.params[net]), jax.tree.leaves(want[net])
        assert len(leaves) == len(ref)
        for a, b in zip(leaves, ref):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    kernel = ("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn1", "to_q", "kernel")
    node, base = pipe.params["unet"], run["frozen"]["unet"]
    for k in kernel:
        node, base = node[k], base[k]
    assert np.abs(np.asarray(node) - np.asarray(base)).max() > 1e-4  # the LoRA is in
