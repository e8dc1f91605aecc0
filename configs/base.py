"""The offline default: text-to-image on the built-in `shapes` set (32x32), trained from scratch.

    python -m ldm_jax.train --config configs/base.py --workdir runs/base

Stage 1 trains a small KL autoencoder (32x32x3 -> 8x8x4 latents), stage 2 a small text-conditional
UNet on its latents with a from-scratch CLIP-architecture text encoder, on a 2-core CPU.

Expect (benchmarks/results/base_run.json, written by `python benchmarks/base_run.py`, which runs
this command from a fresh workdir and records the machine, the package versions and the commit):
on a 2-core AMD EPYC without AVX-512, with other benchmarks and tests running beside it part of
the time, 38:08 wall (autoencoder stage 782 s at a median 60 img/s, latent table 49 s, diffusion
training 1366 s at 81 img/s, samples and prompt accuracy 39 s), peak RSS 3.1 GiB; autoencoder
reconstructions keep the captioned shape 99.2% of the time; EMA model prompt accuracy 94.5% on the
shapes test split (95% interval 91.0-96.7%; colour 100, shape 94.5, position 100) and 94.1% on the
held-out combinations (90.6-96.4%), with 20-step DPM-Solver++ at guidance 2. Before the CPU
convolutions moved from YNNPACK to XLA's Eigen kernels (`runtime/xla_options.py`; different
rounding), the same command gave 95.3% and 94.5% on an AVX-512 EPYC in 25:38
(results/base_run_ynn_convolutions.json). The discrete eps + min-SNR
recipe this config had before (configs/base_discrete.py) reached 90.2% and 84.4% with the same
steps (benchmarks/results/base_discrete_run.json, on an Intel Xeon). The figures are bitwise
reproducible on one kind of machine; another CPU may differ by a caption or a few (XLA compiles
for the host's instruction set).
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.stages = ("autoencoder", "ldm")

    c.data = dict(
        name="shapes", data_dir="~/.cache/ldm_jax/datasets", split="train", image_size=32,
        batch_size=64, seed=0, shuffle=True, flip=False, num_workers=0,
        image_key="image", caption_key="caption", label_key=None, options={},
    )

    c.autoencoder = dict(
        kind="kl",  # "kl" | "vq" | "identity" (pixel-space diffusion)
        source="train",  # "train" | "workdir:<path>" | "diffusers:<path>"
        model=dict(block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=4,
                   norm_num_groups=8, mid_block_add_attention=True),
        vq=dict(num_codes=256, beta=0.25),  # used when kind="vq"
        kl_weight=1e-6,
        disc_start=None,  # step at which the PatchGAN loss switches on; None: never
        disc_weight=0.5,
        disc=dict(n_layers=2, base_channels=32),  # PatchDiscriminator(**disc)
        disc_optim=dict(lr=1e-3, b1=0.5, b2=0.9, weight_decay=0.0, grad_clip=None),  # LDM's Adam betas
        lpips_weights=None,  # a local path to LPIPS weights, or None for no perceptual loss
        perceptual_weight=1.0,  # LDM's weight on the LPIPS term (used when lpips_weights is set)
        steps=1400,  # lr 2e-3; benchmarks/results/base_run.json gives the reconstructions' shape-keeping rate
        batch_size=32,
        optim=dict(lr=2e-3, warmup_steps=100, schedule="constant", weight_decay=0.0, grad_clip=1.0,
                   ema_decay=0.999),
        scale_factor=None,  # None: 1/std of the first latents (LDM's scale_by_std); SD: 0.18215
    )

    c.text_encoder = dict(
        source="scratch",  # "scratch" (trained jointly) | "diffusers:<path>" (pretrained, frozen)
        train=True,
        train_token_embedding=False,  # keep the random [49408, 128] token table fixed (cheaper steps on CPU)
        max_length=16,  # shapes captions are at most 9 tokens
        model=dict(vocab_size=49408, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=16, hidden_act="quick_gelu"),
    )

    # Three levels (8x8, 4x4, 2x2 latents): at two, position words were learned late and unreliably
    # (the UNet has no positional input; it must infer where it is from padding), at three reliably.
    c.unet = dict(
        block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3,
        num_attention_heads=2, cross_attention_dim=128, norm_num_groups=16, dropout=0.0,
    )

    c.conditioning = dict(kind="text", caption_dropout=0.1, num_classes=0)  # kind: "text" | "class"

    # process: "discrete" (the schedule below) | "flow" | "edm" | "vdm", with process_kwargs (flow: shift;
    # edm: sigma_min, sigma_max, sigma_data, rho; vdm: gamma_min, gamma_max, learned) and
    # timestep_kwargs (logit_normal: logit_mean, logit_std; lognormal: p_mean, p_std).
    # Rectified flow with SD3's velocity target, unweighted, at logit-normal times: the best of the
    # six processes at a fixed small budget (experiments/results/process.md); configs/base_discrete.py
    # keeps the discrete eps + min-SNR recipe this config had before. The schedule keys below are
    # the discrete process's (unused by flow).
    c.diffusion = dict(
        process="flow", process_kwargs={},
        schedule="scaled_linear", num_timesteps=1000, zero_terminal_snr=False, schedule_kwargs={},
        objective="simple", prediction="velocity", variance="fixed_small",
        weighting="none", min_snr_gamma=5.0, timestep_sampler="logit_normal", timestep_kwargs={},
        preconditioning="none",  # "edm": Karras et al.'s c_skip, c_out, c_in (process "edm", prediction "x0")
    )

    c.sampler = dict(name="dpm_solver++", num_steps=20, eta=0.0, guidance_scale=2.0,
                     guidance_rescale=0.0, spacing="trailing")

    c.optim = dict(lr=1e-3, warmup_steps=100, schedule="cosine", weight_decay=0.0, b1=0.9,
                   b2=0.999, eps=1e-8, grad_clip=1.0, grad_accum=1, ema_decay=0.999,
                   mu_dtype="float32")  # "bfloat16": AdamW's first moment stored in 2 bytes (optax's mu_dtype)

    c.train = dict(
        steps=1600, log_every=50, checkpoint_every=500, sample_every=1000, keep_checkpoints=2,
        max_nonfinite=20, dtype="float32", remat=False,
        cache_latents=True,  # encode the training split once after stage 1 (tables up to 2 GiB; not with data.flip)
        sample_prompts=("a red circle on the left", "a green square at the top",
                        "a blue triangle in the center", "a yellow circle at the bottom",
                        "a magenta square on the right", "a cyan triangle on the left"),
    )

    c.eval = dict(splits=("test", "heldout"), num_samples=256)
    c.mesh = dict(data=-1, fsdp=1, shard_params=False)

    # LoRA fine-tuning (Hu et al. 2021; configs/sd15_lora.py): with enabled=True the UNet is not
    # trained; `base`'s is, frozen, with low-rank adapters (rank, alpha: scale alpha / rank) on the
    # layers peft's target_modules would pick (diffusers' names), and on the frozen pretrained text
    # encoder's when text_encoder=True. Only the adapters train, carry optimiser state and EMA, and
    # are checkpointed; the run's end writes them as diffusers' pytorch_lora_weights.safetensors.
    c.lora = dict(
        enabled=False, base=None,  # base: "diffusers:<path>", the folder whose UNet the adapters adapt
        rank=4, alpha=4.0, dropout=0.0, init="kaiming",  # init: "kaiming" (peft's default) | "gaussian"
        unet_targets=("to_q", "to_k", "to_v", "to_out.0"),
        text_encoder=False, text_encoder_targets=("q_proj", "k_proj", "v_proj", "out_proj"),
    )
    # DreamBooth (Ruiz et al. 2023; configs/sd15_dreambooth.py, training/dreambooth.py): with a
    # class_prompt, the training examples captioned exactly so (the class images the frozen model
    # drew) are the prior-preservation term, their loss weighed by prior_loss_weight.
    c.dreambooth = dict(class_prompt=None, prior_loss_weight=1.0)
    return c
