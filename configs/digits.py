"""Text-to-image on the built-in `digits` set: scikit-learn's 8x8 handwritten digits, upscaled to
32x32 and captioned "a handwritten digit seven".

    python -m ldm_jax.train --config configs/digits.py --workdir runs/digits

The base recipe (a 32x32x3 -> 8x8x4 KL autoencoder, then a text-conditional UNet on its latents
with a from-scratch text encoder) on 1,497 training digits; samples of the ten captions are
written to runs/digits/samples/ and TensorBoard (runs/digits). Captions are at most 6 tokens, so
the text encoder reads 8. Expect: each digit drawn as asked, white on black. The model sizes and
steps are configs/base.py's, so the run takes about that config's time on the same machine
(benchmarks/results/base_run.json), less the shapes checker's evaluations, which digits skips.
"""
import pathlib

from ldm_jax.config import load_config

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def get_config():
    c = load_config(pathlib.Path(__file__).with_name("base.py"))
    c.data.name = "digits"
    c.text_encoder.max_length = 8
    c.text_encoder.model.max_position_embeddings = 8
    c.train.sample_prompts = tuple(f"a handwritten digit {w}" for w in NUMBER_WORDS)
    c.eval.splits = ("test",)  # digits has train and test only
    return c
