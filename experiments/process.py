"""Which diffusion process at a small budget: discrete DDPM (eps + min-SNR, v), EDM, rectified flow
(uniform and logit-normal t) and VDM, on the same networks, data, sampler and metrics.

Question: which family gives the best few-step samples and the best likelihood at a fixed small
budget? Expected: SD3 (Esser et al. 2024, sec. 5.1) found rectified flow with logit-normal time
sampling (m = 0, s = 1) best of 61 formulations on sample quality, ahead of EDM and the discrete
eps / v losses, most clearly at few sampling steps; SiT (Ma et al. 2024) likewise found the linear
(flow) interpolant with velocity prediction ahead of the variance-preserving one. VDM's learned
schedule and continuous-time bound (Kingma et al. 2021) are built for likelihood: the best
bits/dim, at some cost in samples.

Latent diffusion on `shapes` from configs/base_discrete.py (configs/base.py when the sweep ran): one
autoencoder trained once and shared, then six diffusion runs of 600 steps per seed, three seeds
(half the other sweeps' 1200 steps, so that the 18 runs fit one session of the 2-core CPU). Every
run samples with DPM-Solver++(2M) (it works in log-SNR, so it runs every process unchanged) at
guidance 2 and 5, 10 and 20 steps. Metrics: prompt accuracy on 256 `test` and 256 `heldout`
captions, `shapes_fid`, and bits per latent dimension through the probability-flow ODE (`ode_bpd`:
the same estimator for every process; 64 test examples). EDM's sigma_data is 1: the latents are
scaled to unit variance.

Expected cost on the 2-core CPU: the shared autoencoder (about 6 minutes), then per run about 4
minutes of training and 3 evaluations (bits/dim is computed at the first and reused: it draws no
samples), about 2 hours in all with --jobs 2.
    python -m ldm_jax.experiments run experiments/process.py --root runs/process --jobs 2
"""
from ldm_jax.experiments import Sweep, product

BASE = "configs/base_discrete.py"

PROCESSES = [
    {"diffusion.process": "discrete"},  # configs/base_discrete.py: eps with min-SNR
    {"diffusion.process": "discrete", "diffusion.prediction": "v", "diffusion.weighting": "none"},
    {"diffusion.process": "edm", "diffusion.process_kwargs": {"sigma_data": 1.0}, "diffusion.prediction": "x0",
     "diffusion.preconditioning": "edm", "diffusion.weighting": "edm", "diffusion.timestep_sampler": "lognormal"},
    {"diffusion.process": "flow", "diffusion.prediction": "velocity", "diffusion.weighting": "none",
     "diffusion.timestep_sampler": "uniform"},
    {"diffusion.process": "flow", "diffusion.prediction": "velocity", "diffusion.weighting": "none",
     "diffusion.timestep_sampler": "logit_normal"},
    {"diffusion.process": "vdm", "diffusion.prediction": "eps", "diffusion.objective": "vlb",
     "diffusion.weighting": "none"},
]


def sweep():
    # Seed-major: every process at seed 0 before any at seed 1.
    points = [dict(p, seed=seed, **{"evaluate.steps": steps})
              for seed in (0, 1, 2) for p in PROCESSES for steps in (5, 10, 20)]
    return Sweep(points=points, metrics=["prompt_accuracy", "shapes_fid", "ode_bpd"],
                 common={"train.steps": 600, "train.sample_every": 100000},
                 evaluate={"splits": ("test", "heldout"), "num_samples": 256, "bpd_examples": 64},
                 share_autoencoder=True,
                 columns=["prompt_accuracy/test/ok", "prompt_accuracy/heldout/ok", "shapes_fid/test/shapes_fid",
                          "ode_bpd/total"])


FINDINGS = """
Not run yet.
"""
