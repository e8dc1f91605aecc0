"""The model object: `LatentDiffusion` (networks, noise schedule, conditioning, autoencoder
adapter) and where its weights come from. Training, the pipeline and the metrics call it; nothing
else builds context, guides or decodes."""
from ldm_jax.ldm.codecs import Codec, make_codec, to_uint8  # noqa: F401
from ldm_jax.ldm.conditioning import (ClassConditioning, Conditioning, TextConditioning,  # noqa: F401
                                      Unconditional, conditioning_from_config, make_conditioning)
from ldm_jax.ldm.model import LatentDiffusion, process_from_config, schedule_from_config  # noqa: F401
