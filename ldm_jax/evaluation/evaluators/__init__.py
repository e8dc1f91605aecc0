"""The metrics, one module each (as big_vision's evaluators): each defines `EVALUATOR`, an
`evaluation.run.Evaluator` (is it available for this run, with the reason when not; compute).
The evaluate command, the sweeps and `runner.evaluate` find them here by name; a new metric is a
new module and one entry below."""
from ldm_jax.evaluation.evaluators import (bpd, clip_score, digit_accuracy, digits_fid, diversity, fid, ode_bpd,
                                           prompt_accuracy, recon, shapes_fid)


EVALUATORS = {m.EVALUATOR.name: m.EVALUATOR for m in (bpd, prompt_accuracy, digit_accuracy, digits_fid, shapes_fid,
                                                      diversity, fid, clip_score, recon, ode_bpd)}
