"""XLA compiler options for the jitted training steps and samplers.

On CPU, XLA (jaxlib 0.10) hands whole fusions, elementwise and reductions included, to the
YNNPACK library; each such call has a fixed cost that dominates on the small tensors of a small
model. Restricting the library to individual convolutions and dots, and leaving the rest to XLA's
own fused loops, measured on configs/base.py's steps on a 2-core CPU (median, interleaved in one
process): LDM step 295 -> 268 ms, autoencoder step 184 -> 159 ms. Other backends get no options.
"""
from __future__ import annotations

import jax

CPU_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type":
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
}


def compiler_options() -> dict | None:
    """The options for `jax.jit(..., compiler_options=...)` on the default backend (None: XLA's defaults)."""
    return dict(CPU_OPTIONS) if jax.default_backend() == "cpu" else None
