"""Runtime helpers shared by training and inference: the device mesh and array layouts
(`sharding`), the compiler options (`xla_options`) and JAX's persistent compilation cache
(`compilation_cache`). They import nothing else of ldm_jax."""
