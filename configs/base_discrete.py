"""configs/base.py with the discrete-time diffusion it had until the process sweep (2026-12): DDPM's
scaled_linear schedule over 1000 steps, eps prediction with min-SNR-5 weighting, uniform
timesteps. Everything else is base.py's.

    python -m ldm_jax.train --config configs/base_discrete.py --workdir runs/base_discrete

The committed sweeps over discrete-time settings (experiments/guidance.py, sampler.py,
schedule.py, prediction.py and process.py's baseline), the pixel-space and Stable Diffusion
configs, the training tests and the benchmarks start from it: their numbers were measured on this
recipe, and it is the one diffusers' training scripts run. Expect 90.2% prompt accuracy on the
shapes test split and 84.4% held out (benchmarks/results/base_discrete_run.json, on an Intel Xeon);
experiments/results/process.md shows why base.py moved to rectified flow.
"""
import pathlib

from ldm_jax.config import load_config


def get_config():
    c = load_config(pathlib.Path(__file__).with_name("base.py"))
    c.diffusion.update(process="discrete", process_kwargs={}, schedule="scaled_linear", num_timesteps=1000,
                       prediction="eps", weighting="min_snr", min_snr_gamma=5.0, timestep_sampler="uniform",
                       timestep_kwargs={}, preconditioning="none")
    return c
