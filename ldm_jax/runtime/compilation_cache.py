"""JAX's persistent compilation cache, shared by every command: a second run does not recompile."""
from __future__ import annotations

import os

import jax


def enable_compilation_cache(path: str | None = None) -> None:
    """Cache compiled programs in `path` (default: $LDM_JAX_COMPILATION_CACHE, else
    ~/.cache/ldm_jax/jax_cache)."""
    path = path or os.environ.get("LDM_JAX_COMPILATION_CACHE", os.path.expanduser("~/.cache/ldm_jax/jax_cache"))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
