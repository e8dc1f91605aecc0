"""What should the UNet predict: noise (eps), velocity (v) or the clean latent (x0), with and
without min-SNR loss weighting?

Question: does the parameterisation of the denoiser, and the loss weighting over timesteps,
change what a fixed training budget achieves? Expected: eps and v are close (Salimans & Ho 2022
introduced v for distillation and found it at least as good), x0-prediction with the plain MSE
over-weights the noisiest timesteps' impossible task and is worse; min-SNR-gamma weighting
(Hang et al. 2023, Fig. 1 / Table 1) speeds up convergence for all three, most for x0.

Latent diffusion on `shapes` from configs/base.py: one autoencoder trained once and shared, then
six diffusion runs of 1200 steps (each ~6 minutes on CPU). Metrics: bits per latent dimension
(the bound with all T terms, 64 test examples), prompt accuracy on 256 `test` captions and
`shapes_fid`.

Expected cost on a 2-core CPU: ~4 minutes (autoencoder) + 6 x ~8 minutes.
    python -m ldm_jax.experiments run experiments/prediction.py --root runs/prediction
"""
from ldm_jax.experiments import Sweep, product

BASE = "configs/base.py"


def sweep():
    return Sweep(points=product({"diffusion.prediction": ["eps", "v", "x0"],
                                 "diffusion.weighting": ["none", "min_snr"]}),
                 metrics=["bpd", "prompt_accuracy", "shapes_fid"],
                 common={"train.steps": 1200, "train.sample_every": 100000},
                 evaluate={"splits": ("test",), "num_samples": 256, "bpd_examples": 64},
                 share_autoencoder=True,
                 columns=["bpd/total", "prompt_accuracy/test/ok", "shapes_fid/test/shapes_fid"])
