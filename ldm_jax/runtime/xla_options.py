"""XLA compiler options for the jitted training steps and samplers.

On CPU, XLA (jaxlib 0.10) hands whole fusions, elementwise and reductions included, to the
YNNPACK library by default; each such call has a fixed cost that dominates on the small tensors of
a small model. The options give YNNPACK the individual dots (matmuls) only: convolutions go to
XLA's Eigen kernels and the elementwise work stays in XLA's own fused loops.

Measured on 2-core AMD EPYC machines (benchmarks/README.md, the training-step table):
- Against YNNPACK for the convolutions as well (this module's options until 2026-12-07), the
  benchmark's training step takes 16% (tiny) and 24-30% (small) less time on a CPU without
  AVX-512, where YNNPACK's convolutions were the slowest part of the step
  (results/train_step.json against results/train_step_ynn_convolutions.json).
- The rounding differs from the convolutions' earlier library. So configs/base.py was re-run with
  these options (results/base_run.json): prompt accuracy 94.5% / 94.1% (test / held out) against
  95.3% / 94.5% before, 1-2 captions of 256 and inside either run's 95% interval. Within a run,
  the results are bitwise reproducible, as before.

Other backends get no options.
"""
from __future__ import annotations

import jax

CPU_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type":
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
}


def compiler_options() -> dict | None:
    """The options for `jax.jit(..., compiler_options=...)` on the default backend (None: XLA's defaults)."""
    return dict(CPU_OPTIONS) if jax.default_backend() == "cpu" else None
