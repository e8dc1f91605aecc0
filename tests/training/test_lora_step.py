"""LoRA training (the `lora` config group, `ldm.adapters`): a tiny random SD folder imported as a run
(`diffusers_runs.config_for_diffusers`) with rank-4 adapters on the UNet's attention and the text
encoder's, trained a few steps by the training loop; the adapters alone are trained, carry the
optimiser state and the EMA and are checkpointed, and the run's export loads in diffusers (parity
extra) computing what our adapted networks compute. The step is DreamBooth-LoRA's (a caption is the
prior-preservation class prompt, weighed 0.5). Also the config's checks and configs/sd15_lora.py's
adapter count."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import config as config_lib
from ldm_jax.ldm import adapters
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
    ("unet.scan_layers", True, "set unet.scan_layers=False"),
])
def test_bad_lora_keys_are_named(key, value, message):
    config = config_lib.load_config(f"{ROOT}/configs/sd15_lora.py")
    group, name = key.split(".")
    config[group][name] = value
    with pytest.raises(ValueError, match=message):
        config_lib.validate(config)


@pytest.fixture(scope="module")
def run(shapes_dir, tmp_path_factory):
    """A LoRA run of the training loop (`loop.train_and_evaluate`) on the tiny folder: rank-4 adapters
    on the UNet's attention and proj_in (a 1x1 convolution) and on the text encoder's attention, in
    rematerialised blocks (as configs/sd15_lora.py), with LoRA dropout, trained 3 steps on 16x16
    shapes images, DreamBooth-LoRA's step (one caption is the prior-preservation class prompt).
    Returns (config, model, frozen base networks, workdir, its last checkpoint, folder, summary)."""
    pytest.importorskip("diffusers")
    from ldm_jax.interop import diffusers as hf
    from ldm_jax.runs.workdir import restore_stage
    from ldm_jax.runtime import sharding
    from ldm_jax.training import loop
    from ldm_jax.training.diffusers_runs import config_for_diffusers
    from tests.interop.test_lora import tiny_sd_pipeline
    from tests.sizes import SMALL_SHAPES
    from tests.training.tiny import cheap_compilation

    folder = tmp_path_factory.mktemp("sd_lora_run")
    tiny_sd_pipeline(seed=7).save_pretrained(str(folder), safe_serialization=True)
    components = hf.load_diffusers_dir(folder)
    config = config_for_diffusers(components, str(folder))
    config.lora.update(enabled=True, base=f"diffusers:{folder}", rank=4, alpha=8.0, dropout=0.1, text_encoder=True,
                       unet_targets=("to_q", "to_k", "to_v", "to_out.0", "proj_in"))
    config.data.update(name="shapes", data_dir=shapes_dir, image_size=16, batch_size=4, flip=False)
    config.data.options = dict(SMALL_SHAPES)  # replaces the image_folder's options (update would merge them)
    config.dreambooth.update(class_prompt="a red circle on the left", prior_loss_weight=0.5)
    config.optim.update(lr=1e-2, warmup_steps=0, ema_decay=0.9)
    config.sampler.num_steps = 2
    config.train.update(steps=3, log_every=1, checkpoint_every=3, sample_every=1000, remat=True,
                        sample_prompts=("a red circle on the left",))
    config.eval.splits = ()
    config_lib.validate(config)
    workdir = tmp_path_factory.mktemp("lora_run")
    with cheap_compilation():
        summary = loop.train_and_evaluate(config, str(workdir))
    state, _ = restore_stage(str(workdir), "ldm", sharding.make_mesh())
    frozen = {"unet": components.unet_params, "text_encoder": components.text_encoder_params}
    return dict(config=config, model=ldm_stage.build_models(config), frozen=frozen, workdir=workdir,
                state=jax.device_get(state), folder=folder, summary=summary)


def test_only_the_adapters_train(run):
    """The loop's checkpoint: params, EMA and optimiser state are the adapters' alone (flat AdamW
    moments of their size); every adapter's B has left its zeros; the losses were finite."""
    state, workdir = run["state"], run["workdir"]
    assert run["summary"]["status"] == "done" and int(state["step"]) == 3 and int(state["nonfinite"]) == 0
    assert set(state["params"]) == set(state["ema_params"]) == {"lora"}
    assert set(state["params"]["lora"]) == {"unet", "text_encoder"}
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
    sizes = {int(np.size(x)) for x in jax.tree.leaves(state["opt_state"])}
    assert n in sizes and sizes <= {1, n}, sizes
    for net in ("unet", "text_encoder"):
        items = lora.adapter_items(state["params"]["lora"][net])
        assert items and all(np.abs(np.asarray(ab["B"])).max() > 0 for ab in items.values()), net
    with open(workdir / "metrics.jsonl") as f:
        losses = [row["ldm/loss"] for row in map(json.loads, f) if "ldm/loss" in row]
    assert len(losses) == 3 and all(np.isfinite(losses)), losses
    # The base is the folder's, untouched: the run wrote no UNet or text encoder, and its merged
    # export equals base + scale A B (test_a_lora_run_samples_merged).
    assert not any("unet" in k or "text_encoder" in k for k in state["params"])


def test_export_loads_in_diffusers_with_the_same_outputs(run):
    """The file the run's end wrote (<workdir>/lora/pytorch_lora_weights.safetensors, the EMA adapters)
    in diffusers' pipe.load_lora_weights: its text encoder and UNet (adapters on a 1x1 convolution
    included) compute what our adapted ones do (eval mode), and so do ours with the adapters merged
    into the weights."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    config, model, state = run["config"], run["model"], run["state"]
    setup = adapters.from_config(config)
    export = run["workdir"] / "lora"
    assert sorted(p.name for p in export.iterdir()) == ["pytorch_lora_weights.safetensors"]

    ids = tokenize(model.conditioning.tokenizer, PROMPTS)
    x = np.random.default_rng(1).standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([20, 800], np.int32)
    params = {**run["frozen"], "lora": state["ema_params"]["lora"]}

    @functools.partial(jax.jit, compiler_options=CHEAP_COMPILE)
    def ours(params):
        with adapters.applied(setup, params):
            context = model.context(params, ids)
            return context, model.unet.apply({"params": params["unet"]}, x, t, context)

    context, eps = ours(params)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(run["folder"]), local_files_only=True)
    pipe.load_lora_weights(str(export))
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


def test_a_lora_run_checkpoints_the_adapters_and_samples_merged(run):
    """A LoRA run's checkpoints hold the adapters alone (far smaller than the UNet), and
    LatentDiffusionPipeline.from_workdir samples the base with the EMA adapters merged in."""
    from ldm_jax.pipeline import LatentDiffusionPipeline

    config, state, workdir = run["config"], run["state"], run["workdir"]
    stored = sum(f.stat().st_size for f in (workdir / "checkpoints").rglob("*") if f.is_file())
    unet_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(run["frozen"]["unet"]))
    assert stored < unet_bytes / 2, (stored, unet_bytes)

    pipe = LatentDiffusionPipeline.from_workdir(str(workdir))
    want = adapters.from_config(config).merged(run["frozen"], state["ema_params"]["lora"])
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


def test_a_lora_run_exports_as_a_full_model(run, tmp_path):
    """python -m ldm_jax.convert --workdir <LoRA run> --to_diffusers OUT (`workdir_to_diffusers`): a
    whole diffusers folder whose UNet and text encoder are the base with the EMA adapters merged."""
    from ldm_jax.interop import diffusers as hf
    from ldm_jax.training.diffusers_runs import workdir_to_diffusers

    out = workdir_to_diffusers(str(run["workdir"]), str(tmp_path / "merged"))
    exported = hf.load_diffusers_dir(out)
    want = adapters.from_config(run["config"]).merged(run["frozen"], run["state"]["ema_params"]["lora"])
    for net, got in (("unet", exported.unet_params), ("text_encoder", exported.text_encoder_params)):
        assert jax.tree.structure(got) == jax.tree.structure(want[net]), net
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want[net])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(exported.unet_params["down_blocks_0"]["attentions_0"]["proj_in"]["kernel"],
                              run["frozen"]["unet"]["down_blocks_0"]["attentions_0"]["proj_in"]["kernel"])
