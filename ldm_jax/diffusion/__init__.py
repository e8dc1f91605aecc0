"""The diffusion math as pure, jittable functions: no Flax, no I/O."""
from ldm_jax.diffusion import gaussian, likelihood, losses, samplers, schedules  # noqa: F401
