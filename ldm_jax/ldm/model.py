"""`LatentDiffusion`: the one definition of the model that training, the pipeline and every metric
call — the networks, the noise schedule, the conditioning and the autoencoder adapter, with pure,
jittable functions for the training loss, the (guided) model function the samplers call,
sampling, encoding, decoding and the variational bound.

    model = LatentDiffusion.from_config(config)
    params = {**model.init_params(rng), "autoencoder": ae_params, "scale": 0.18215}  # + a frozen text encoder
    terms = model.loss_terms(params, z0, cond, t, noise)          # the step's objective (LossTerms)
    z = model.sample(params, cond, model.conditioning.null(cond), rng, sampler="ddim", num_steps=50,
                     guidance=7.5)
    images = model.decode(params, z)                              # [-1, 1] floats

`params` is one dict: {"unet", the conditioning's own ("text_encoder" or "class_embedder"),
"autoencoder", "scale"}; training merges its trainable and frozen parts into it. Latents are
scaled (`scale` times the autoencoder's), as LDM's `scale_factor`.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from ldm_jax import config as config_lib
from ldm_jax.diffusion import gaussian, likelihood, losses, processes, samplers, schedules, sd_schedulers
from ldm_jax.ldm.codecs import Codec, make_codec, to_uint8
from ldm_jax.ldm.conditioning import Conditioning, TextConditioning, conditioning_from_config
from ldm_jax.models.unet import UNet


def schedule_from_config(d) -> schedules.NoiseSchedule:
    """The `diffusion` group's noise schedule."""
    return schedules.make_schedule(d.schedule, d.num_timesteps, zero_terminal_snr=d.zero_terminal_snr,
                                   **dict(d.get("schedule_kwargs", {})))


def _apply_unet(unet: UNet, unet_params, extra, x_t, t, context):
    """The UNet on x_t; `extra` (an inpainting UNet's [mask, masked-image latents]) is appended to
    its channels (x_t may hold [uncond; cond], twice extra's batch)."""
    if extra is not None:
        x_t = jnp.concatenate([x_t, jnp.tile(extra, (x_t.shape[0] // extra.shape[0], 1, 1, 1))], -1)
    return unet.apply({"params": unet_params}, x_t, t, context)


def process_from_config(d) -> processes.Process | None:
    """The `diffusion` group's continuous process, or None for the discrete schedule."""
    name = d.get("process", "discrete")
    if name == "discrete":
        return None
    return processes.make_process(name, **dict(d.get("process_kwargs", {})))


def _denoise(unet: UNet, preconditioning: str, proc, unet_params, extra, x_t, t, context, train=False, rngs=None):
    """The UNet as a model of a continuous process: it sees the process's network time
    (`proc.network_time`: SD3's 1000 t, EDM's ln(sigma)/4) and, with EDM's preconditioning, c_in x_t,
    its output F becoming D = c_skip x_t + c_out F (Karras et al. 2022, eq. 7; an x0 prediction)."""
    if extra is not None:
        extra = jnp.tile(extra, (x_t.shape[0] // extra.shape[0], 1, 1, 1))
    t_net = proc.network_time(t)
    if preconditioning == "edm":
        alpha, sigma = proc.alpha_sigma(t)
        c_skip, c_out, c_in = (gaussian.broadcast_to_rank(c, x_t) for c in proc.preconditioning(sigma / alpha))
        x_in = c_in * x_t
    else:
        x_in = x_t
    if extra is not None:
        x_in = jnp.concatenate([x_in, extra], -1)
    out = unet.apply({"params": unet_params}, x_in, t_net, context, train=train, rngs=rngs or {})
    if preconditioning == "edm":
        return c_skip * x_t + c_out * out.astype(jnp.float32)
    return out


def _float_time(model_fn, x_t, t):
    return model_fn(x_t, t.astype(jnp.float32))


def _with_context(unet_fn, context, x_t, t):
    return unet_fn(x_t, t, context)


@dataclasses.dataclass(frozen=True, eq=False)
class LatentDiffusion:
    """See the module docstring. Build it with `from_config`, `ldm.sources.from_workdir` or
    `ldm.sources.from_diffusers_dir`; change the schedule with `dataclasses.replace`."""

    unet: UNet
    autoencoder: object  # the linen module (AutoencoderKL, VQAutoencoder or IdentityAutoencoder)
    conditioning: Conditioning
    schedule: schedules.NoiseSchedule
    image_size: int
    prediction: str = "eps"
    variance: str = "fixed_small"
    objective: str = "simple"
    weighting: str = "none"
    min_snr_gamma: float = 5.0
    process: processes.Process | None = None  # a continuous process (flow, edm, vdm); None: `schedule`
    preconditioning: str = "none"  # "edm": Karras et al.'s c_skip, c_out, c_in around the UNet

    @classmethod
    def from_config(cls, config) -> "LatentDiffusion":
        """The model a training config describes (validated first by `config.validate`)."""
        unet = UNet(**config_lib.unet_kwargs(config))
        unet.validate()
        d = config.diffusion
        return cls(unet=unet, autoencoder=config_lib.make_autoencoder(config.autoencoder, config.data.image_size),
                   conditioning=conditioning_from_config(config, unet.cross_attention_dim),
                   schedule=schedule_from_config(d), image_size=int(config.data.image_size),
                   prediction=d.prediction, variance=d.variance, objective=d.objective, weighting=d.weighting,
                   min_snr_gamma=d.min_snr_gamma, process=process_from_config(d),
                   preconditioning=d.get("preconditioning", "none"))

    # ------------------------------------------------------------------------------- parts

    @functools.cached_property
    def codec(self) -> Codec:
        """The autoencoder adapter (KL, VQ or identity)."""
        return make_codec(self.autoencoder)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(h, w, c) of the latents of `image_size` images."""
        return self.codec.latent_size(self.image_size)

    @property
    def text_encoder(self):
        return self.conditioning.encoder if isinstance(self.conditioning, TextConditioning) else None

    @property
    def train_text_encoder(self) -> bool:
        return isinstance(self.conditioning, TextConditioning) and self.conditioning.trainable

    @property
    def decoder(self) -> str:
        """The t = 0 term of the bound: discretized (8-bit pixels) in pixel space, else continuous."""
        return "discretized" if self.codec.is_identity else "continuous"

    @property
    def continuous(self) -> bool:
        """Whether the model runs a continuous process (else the discrete `schedule`)."""
        return self.process is not None and self.process.continuous

    def process_of(self, params) -> processes.Process:
        """The process with its learned parameters (VDM's gamma, params["process"]) bound; the
        discrete schedule as a process for a discrete model."""
        if self.process is None:
            return processes.DiscreteProcess(self.schedule)
        if isinstance(self.process, processes.VDMProcess) and self.process.learned:
            return self.process.bind(params["process"])
        return self.process

    @functools.cached_property
    def loss_fn(self):
        """loss_fn(model_fn, z0, t, noise) -> LossTerms of the configured objective (discrete), or
        loss_fn(model_fn, proc, z0, t, noise) (a continuous process)."""
        if self.continuous:
            return losses.make_process_loss_fn(
                self.process, objective=self.objective, prediction=self.prediction, weighting=self.weighting,
                min_snr_gamma=self.min_snr_gamma, sigma_data=getattr(self.process, "sigma_data", 0.5),
                decoder=self.decoder)
        return losses.make_loss_fn(self.schedule, objective=self.objective, prediction=self.prediction,
                                   variance=self.variance, weighting=self.weighting,
                                   min_snr_gamma=self.min_snr_gamma, decoder=self.decoder)

    def init_params(self, rng) -> dict:
        """Fresh trainable parameters: {"unet", and the conditioning's own if it learns any}."""
        keys = jax.random.split(rng, 3)  # the UNet's, the text encoder's, the class embedder's
        h, w, c = self.latent_shape
        context = jnp.zeros((1, self.conditioning.context_length, self.unet.cross_attention_dim), jnp.float32)
        params = {"unet": self.unet.init(keys[0], jnp.zeros((1, h, w, c)), jnp.zeros((1,)), context)["params"]}
        params.update(self.conditioning.init_params(keys[self.conditioning.rng_stream], self.unet.cross_attention_dim))
        if isinstance(self.process, processes.VDMProcess) and self.process.learned:
            params["process"] = self.process.init_params(jax.random.fold_in(rng, 3))
        return params

    # ------------------------------------------------------------------------------- latents

    def encode(self, params, images):
        """Images [B, H, W, 3] in [-1, 1] -> scaled latents (the posterior's mode)."""
        return self.codec.encode_mode(params["autoencoder"], images) * params["scale"]

    def decode(self, params, z):
        """Scaled latents -> images, float32 in about [-1, 1]."""
        return self.codec.decode(params["autoencoder"], z / params["scale"])

    def decode_uint8(self, params, z):
        return to_uint8(self.decode(params, z))

    def training_latents(self, params, batch, rng):
        """z0 of a training batch, scaled and without gradient: a posterior sample of its images,
        or of its rows of the precomputed latent table (batch["latents"], `codec.moments`)."""
        if "latents" in batch:
            z = self.codec.sample_moments(batch["latents"], rng)
        else:
            z = self.codec.encode_sample(params["autoencoder"], batch["image"], rng)
        return jax.lax.stop_gradient(z * params["scale"])

    # ------------------------------------------------------------------------------- denoiser

    def context(self, params, cond):
        """cond (token ids [B, L] or labels [B]) -> the UNet's context [B, L, D]."""
        return self.conditioning.context(params, cond)

    def unet_fn(self, params, extra=None) -> Partial:
        """unet_fn(x_t, t, context) with the parameters (and `extra` channels) as traced leaves; for a
        continuous process t is the process's time (see `_denoise`)."""
        if self.continuous:
            return Partial(functools.partial(_denoise, self.unet, self.preconditioning), self.process_of(params),
                           params["unet"], extra)
        return Partial(functools.partial(_apply_unet, self.unet), params["unet"], extra)

    def model_fn(self, params, context, extra=None) -> Partial:
        """model_fn(x_t, t) for a fixed context [B, L, D], unguided (the bound, the loss)."""
        return Partial(_with_context, self.unet_fn(params, extra), context)

    def guided_model(self, params, cond, uncond, guidance, rescale=0.0, extra=None) -> Partial:
        """The model function the samplers call: classifier-free guidance between `cond` and
        `uncond` (one batched UNet call per step); unguided for an unconditional model."""
        if not self.conditioning.guided:
            return self.model_fn(params, self.context(params, cond), extra)
        return samplers.classifier_free_guidance(self.unet_fn(params, extra), self.context(params, cond),
                                                 self.context(params, uncond), guidance, rescale)

    def loss_terms(self, params, z0, cond, t, noise, dropout_rng=None) -> losses.LossTerms:
        """The training objective's terms for latents z0 at timesteps t (per example). With
        `dropout_rng` the UNet runs in training mode (dropout)."""
        context = self.context(params, cond)
        train = dropout_rng is not None
        rngs = {"dropout": dropout_rng} if train else {}

        if self.continuous:
            proc = self.process_of(params)

            def process_model_fn(x, tt):
                return _denoise(self.unet, self.preconditioning, proc, params["unet"], None, x, tt, context,
                                train=train, rngs=rngs)

            return self.loss_fn(process_model_fn, proc, z0, t, noise)

        def model_fn(x, tt):
            return self.unet.apply({"params": params["unet"]}, x, tt, context, train=train, rngs=rngs)

        return self.loss_fn(model_fn, z0, t, noise)

    # ------------------------------------------------------------------------------- sampling

    def sample(self, params, cond, uncond, rng, *, sampler: str, num_steps: int, guidance=1.0, rescale=0.0,
               eta=0.0, shape=None, extra=None, **kwargs):
        """Scaled latents z_0 [B, h, w, c] from `samplers.sample` with the guided model. `rng`: one
        key for the batch, or one per example ([B, 2]); `shape` defaults to the batch of cond at
        `image_size`. Other keyword arguments (spacing, steps_offset, x_T, start_step, after_step,
        return_trajectory) go to `samplers.sample`. `sampler` may be a diffusers scheduler
        (`sd_schedulers.Scheduler`): its loop then runs exactly as diffusers runs it, x_T in its
        space (`sd_schedulers.start_state`), the prediction type the scheduler's."""
        shape = shape or (cond.shape[0], *self.latent_shape)
        model = self.guided_model(params, cond, uncond, guidance, rescale, extra)
        if isinstance(sampler, sd_schedulers.Scheduler):
            for key in ("spacing", "steps_offset"):
                kwargs.pop(key, None)  # the scheduler's own
            return sd_schedulers.sample(model, sampler, shape, rng, num_steps, eta=eta, **kwargs)
        if self.continuous:
            kwargs.pop("spacing", None)  # discrete timesteps only; a process has its own grid
            return samplers.sample(model, self.process_of(params), shape, rng, sampler=sampler, num_steps=num_steps,
                                   prediction=self.prediction, eta=eta, clip_x0=self.codec.clip_x0, **kwargs)
        return samplers.sample(model, self.schedule, shape, rng, sampler=sampler, num_steps=num_steps,
                               prediction=self.prediction, eta=eta, variance=self.variance,
                               clip_x0=self.codec.clip_x0, **kwargs)

    def noised(self, params, z0, noise, num_steps: int, start_step: int):
        """z0 noised to where step `start_step` of a num_steps grid starts (SDEdit's x_t for a
        continuous process: alpha z0 + sigma noise at proc.time_grid(num_steps)[start_step]; the
        clean z0 when start_step = num_steps)."""
        proc = self.process_of(params)
        t = jnp.float32(proc.time_grid(int(num_steps))[start_step])
        alpha, sigma = proc.alpha_sigma(t)
        return alpha * z0 + sigma * noise

    # ------------------------------------------------------------------------------- likelihood

    def bound(self, params, x0, context, rng) -> dict:
        """The full variational bound of x0 (scaled latents, or pixels in [-1, 1] for a pixel
        model) given its context (`context(params, cond)`: each example's own condition),
        unguided, in bits per dimension (`likelihood.bits_per_dim`). A VDM model's is its
        continuous-time bound (`vdm_bound`); flow and EDM have none (`ode_bound` is their likelihood)."""
        if self.continuous:
            if self.process.name != "vdm":
                raise ValueError(f"a {self.process.name!r} process has no variational bound; its likelihood is "
                                 "the probability-flow ODE's (ode_bound, the ode_bpd metric)")
            return self.vdm_bound(params, x0, context, rng)
        return likelihood.bits_per_dim(self.model_fn(params, context), self.schedule, x0, rng,
                                       prediction=self.prediction, variance=self.variance, decoder=self.decoder,
                                       clip_x0=self.codec.clip_x0)

    def ode_bound(self, params, x0, context, rng, *, num_steps: int = 100, num_probes: int = 4) -> dict:
        """The exact log-likelihood of x0 through the probability-flow ODE (`likelihood.ode_log_likelihood`,
        Hutchinson's divergence with `num_probes` probes), unguided, for every process (the discrete
        schedule's at fractional timesteps): dict of per-example [B] `total` (bits per dimension,
        continuous density: per latent dimension, or per pixel dimension of [-1, 1] data without
        dequantisation) and `ci95` (the half-width of its estimator's 95% interval)."""
        proc = self.process_of(params)
        model_fn = self.model_fn(params, context)
        if not self.continuous:  # the discrete network takes float timesteps as they are
            model_fn = Partial(_float_time, model_fn)
        ll, half = likelihood.ode_log_likelihood(model_fn, proc, x0, rng, prediction=self.prediction,
                                                 num_steps=num_steps, divergence="hutchinson",
                                                 num_probes=num_probes, return_interval=True)
        to_bits = 1.0 / (math.prod(x0.shape[1:]) * math.log(2.0))
        return {"total": -ll * to_bits, "ci95": half * to_bits}

    def vdm_bound(self, params, x0, context, rng, num_times: int = 200) -> dict:
        """VDM's continuous-time bound of x0 in bits per dimension (Kingma et al. 2021, eq. 17),
        its diffusion integral over t in [0, 1] estimated at `num_times` stratified times (one per
        interval [k, k+1)/num_times, each with its own noise), per example [B]: total, prior,
        decoder (the reconstruction term) and diffusion, and terms [B, num_times] (the diffusion
        integrand's estimates, bits/dim)."""
        proc = self.process_of(params)
        model_fn = self.model_fn(params, context)
        x0 = jnp.asarray(x0, jnp.float32)
        batch = x0.shape[0]
        to_bits = 1.0 / (math.prod(x0.shape[1:]) * math.log(2.0))

        def term(_, k):
            key = jax.random.fold_in(rng, k)
            u = jax.random.uniform(jax.random.fold_in(key, 0), (batch,))
            t = (k + u) / num_times
            noise = jax.random.normal(jax.random.fold_in(key, 1), x0.shape, jnp.float32)
            alpha, sigma, d_alpha, d_sigma = proc.alpha_sigma_derivatives(t)
            x_t = gaussian.broadcast_to_rank(alpha, x0) * x0 + gaussian.broadcast_to_rank(sigma, x0) * noise
            parts = losses.vdm_bound_terms(proc, self.prediction, model_fn(x_t, t), x0, x_t, t, noise, alpha, sigma,
                                           d_alpha, d_sigma, self.decoder)
            return None, parts

        _, parts = jax.lax.scan(term, None, jnp.arange(num_times))
        diffusion = jnp.mean(parts["diffusion"], axis=0) * to_bits
        prior, decoder = parts["prior"][0] * to_bits, jnp.mean(parts["recon"], axis=0) * to_bits
        return dict(total=prior + decoder + diffusion, prior=prior, decoder=decoder, diffusion=diffusion,
                    terms=parts["diffusion"].T * to_bits)
