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
Run on the 2-core CPU (an AMD EPYC) with --jobs 2, for part of the time beside a configs/base.py
run and the test suite; about 2 hours. Three seeds per point: the table gives mean ± std over
seeds, and a ranking below is called only where the mean ± std intervals do not overlap. The
sweep ran when configs/base.py was today's configs/base_discrete.py (experiment.json records the
path it had), so its `discrete` point is that recipe: eps with min-SNR-5. The autoencoder is
shared; bits/dim is per latent dimension (lower is better), through the ODE for every process.

Samples (prompt accuracy at 20 steps, test / heldout):
- Rectified flow is best: 88.0 ± 3.4 / 88.9 ± 0.8 % with logit-normal times and 87.8 ± 1.2 /
  85.0 ± 2.2 % with uniform times. Both are ahead of discrete v-prediction (80.1 ± 1.6 / 72.4 ±
  2.8 %), and the gaps are outside the intervals at 5, 10 and 20 steps. On test, logit-normal and
  uniform times tie. On the held-out combinations, logit-normal is ahead at 10 and 20 steps
  (88.5 and 88.9 against 84.2 and 85.0; at 5 steps the intervals touch). That is SD3's ranking
  (Esser et al. 2024, sec. 5.1: rectified flow with logit-normal sampling best), seen here on the
  compositions the model never saw.
- Shapes FID ranks differently: discrete v 8.7 ± 0.4, flow logit-normal 9.5 ± 0.9 (a tie) and
  flow uniform 10.7 ± 0.9 (behind v). FID on shapes scores the look of shapes and colours, not
  whether the caption's combination was drawn. So SiT's finding (Ma et al. 2024: the linear
  interpolant with velocity ahead of the variance-preserving one) holds here for prompt
  accuracy, but not for FID against flow with uniform times.
- Few steps: flow and v lose nothing in prompt accuracy from 20 to 5 steps (all within the
  intervals). Their FID worsens by 1-2.6 at 5 steps.
- At 600 steps, three settings do not yet draw the prompt:
  - **eps with min-SNR** (the old default): 6.8 % test, FID 105-290. It reached 51 % at 1200 steps
    (experiments/results/prediction.md) and 90.2 % at 1600.
  - **EDM at its published training distribution** (log-normal sigma, P_mean -1.2 and P_std 1.2,
    x0-prediction with its preconditioning): 13.8 ± 3.3 %, FID 41 ± 9. With sigma_data = 1, 84 %
    of its training sigmas lie below sigma_data, so the high-noise steps that decide the layout
    are rarely trained. EDM tuned P_mean for sigma_data = 0.5 pixels.
  - **VDM trained on its bound alone**: 2.3 %, FID 870-1020. Its learned log-SNR is +4.3 at t =
    0.5, so half its time is spent at low noise. Its samples' latents have std 1.5 against the
    data's 1.0, the same with DPM-Solver++ 20, DDIM 50 and Heun 20 (checked on seed 1's run): the
    model does this, not a sampler.

Likelihood (ode_bpd, bits per latent dimension):
- EDM is best: -2.600 ± 0.006. Its training mass at low noise is exactly what the likelihood
  integrates.
- Then flow with uniform times (-2.362 ± 0.001) ties with VDM (-2.315 ± 0.053).
- Then flow with logit-normal times (-2.070 ± 0.008): the logit-normal puts little weight near t =
  0, and the likelihood pays for it.
- Last, discrete v (-1.815 ± 0.020) and eps (-1.458 ± 0.038).
- VDM is built for likelihood (Kingma et al. 2021), but at this budget it does not beat EDM or
  flow with uniform times.
- So no one process wins both samples and likelihood here: the time distribution decides which
  noise levels get learned, as SD3's and EDM's analyses say.

configs/base.py now trains rectified flow with velocity prediction and logit-normal times: at its
1600 steps it reaches 95.3 % test and 94.5 % held out (benchmarks/results/base_run.json), against
90.2 % and 84.4 % for the old recipe.
"""
