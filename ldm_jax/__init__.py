"""ldm_jax: latent diffusion models in JAX/Flax."""
