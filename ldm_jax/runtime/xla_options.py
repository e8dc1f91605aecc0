"""XLA compiler options for the jitted training steps and samplers.

On CPU, XLA (jaxlib 0.10) hands whole fusions, elementwise and reductions included, to the
YNNPACK library; each such call has a fixed cost that dominates on the small tensors of a small
model. Restricting the library to individual convolutions and dots, and leaving the rest to XLA's
own fused loops, made configs/base.py's LDM and autoencoder steps faster on a 2-core CPU (an
interleaved A/B in one process; its timings were not kept: `benchmarks/train_step.py` measures
the step as it is now). Giving YNNPACK the dots only (convolutions to XLA's Eigen kernels) was
faster again but is not adopted: its different rounding moved configs/base.py's fixed-step
prompt accuracy down by several points, so adopting it means re-tuning the base config's steps
and measuring again.
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
