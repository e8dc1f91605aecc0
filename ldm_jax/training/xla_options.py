"""XLA compiler options for the jitted training steps and samplers.

On CPU, XLA (jaxlib 0.10) hands whole fusions, elementwise and reductions included, to the
YNNPACK library; each such call has a fixed cost that dominates on the small tensors of a small
model. Restricting the library to individual convolutions and dots, and leaving the rest to XLA's
own fused loops, measured on configs/base.py's steps on a 2-core CPU (median, interleaved in one
process): LDM step 295 -> 268 ms, autoencoder step 184 -> 159 ms. Giving YNNPACK the dots only (convolutions to XLA's Eigen kernels) is faster again (A/B: LDM step
250 -> 231 ms, autoencoder step 142 -> 125 ms, benchmarks/train_step.py's small UNet step
459 -> 401 ms) but not adopted yet: its different rounding moved configs/base.py's fixed-step
result from 90.6% to 86.7% test prompt accuracy, so adopting it means re-tuning the base
config's steps and measuring again.
Other backends get no options.
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
