"""Text-to-image on the built-in `emoji` set: OpenMoji's colour emoji (CC BY-SA 4.0) at 32x32,
captioned with their Unicode names ("red apple", "cat face").

    python -m ldm_jax.train --config configs/emoji.py --workdir runs/emoji

The base recipe (a 32x32x3 -> 8x8x4 KL autoencoder, then a text-conditional UNet on its latents
with a from-scratch text encoder) on the 1,317 training emoji (146 held out as `test`). The
longest name is 18 tokens, so the text encoder reads 20. With one image per caption this is a
memorisation-and-composition test: expect training captions to come back recognisably and
unseen names to borrow colours and parts from related words. Samples go to runs/emoji/samples/
and TensorBoard (runs/emoji). The models and steps are base's (the text context is 20 tokens, not 16).
"""
import pathlib

from ldm_jax.config import load_config


def get_config():
    c = load_config(pathlib.Path(__file__).with_name("base.py"))
    c.data.name = "emoji"
    c.text_encoder.max_length = 20
    c.text_encoder.model.max_position_embeddings = 20
    c.train.sample_prompts = ("red apple", "grinning face", "cat face", "rocket", "sun with face",
                              "slice of pizza")
    c.eval.splits = ("test",)  # emoji has train and test only
    return c
