"""The conditioning objects of ldm_jax.ldm: host-side conditions, the null condition, caption
dropout and the context each gives the UNet."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.data.tokenizer import BOS_ID, EOS_ID, make_tokenizer
from ldm_jax.ldm import ClassConditioning, TextConditioning, Unconditional, make_conditioning
from ldm_jax.models.text_encoder import CLIPTextEncoder

ENCODER = CLIPTextEncoder(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          max_position_embeddings=8)


def test_make_conditioning_is_the_one_place_that_reads_the_kind():
    assert isinstance(make_conditioning("text", context_dim=16, text_encoder=ENCODER), TextConditioning)
    assert isinstance(make_conditioning("class", context_dim=16, num_classes=3), ClassConditioning)
    assert isinstance(make_conditioning("none", context_dim=16), Unconditional)
    with pytest.raises(ValueError, match=r"conditioning='label' .*'text', 'class', 'none'"):
        make_conditioning("label", context_dim=16)


def test_text_conditions_null_and_dropout():
    text = make_conditioning("text", context_dim=16, text_encoder=ENCODER)
    assert text.max_length == 8 and text.tokenizer.model_max_length == 8  # the encoder's positions
    cond, uncond = text.conditions(["a red circle", "a blue square"])
    assert cond.shape == uncond.shape == (2, 8)
    np.testing.assert_array_equal(uncond[0], [BOS_ID] + [EOS_ID] * 7)  # "" padded with <|endoftext|>
    np.testing.assert_array_equal(text.null(jnp.asarray(cond)), uncond)
    _, negative = text.conditions(["a red circle"], negative_prompts="blurry")
    assert negative[0, 1] != EOS_ID
    batch = {"ids": jnp.asarray(cond)}
    np.testing.assert_array_equal(text.drop(batch, jax.random.PRNGKey(0), 0.0), cond)
    np.testing.assert_array_equal(text.drop(batch, jax.random.PRNGKey(0), 1.0), uncond)
    with pytest.raises(ValueError, match="prompts must be strings"):
        text.conditions([1, 2])
    with pytest.raises(ValueError, match="2 negative prompts for 1 prompts"):
        text.conditions(["a"], negative_prompts=["b", "c"])
    assert text.of_examples({"caption": ["x", "y", "z"]}, [2, 0]) == ["z", "x"]


def test_text_context_is_the_encoders_last_hidden_states():
    text = TextConditioning(ENCODER, make_tokenizer(8), 8, trainable=True)
    params = text.init_params(jax.random.PRNGKey(0), 16)
    ids = text.conditions(["a red circle"])[0]
    expected = ENCODER.apply({"params": params["text_encoder"]}, ids)[0]
    np.testing.assert_array_equal(text.context(params, ids), expected)
    assert TextConditioning(ENCODER, make_tokenizer(8), 8, trainable=False).init_params(jax.random.PRNGKey(0), 16) == {}


def test_class_conditions_null_dropout_and_context():
    classes = make_conditioning("class", context_dim=4, num_classes=3)
    cond, uncond = classes.conditions([0, 2, 1])
    np.testing.assert_array_equal(uncond, [3, 3, 3])  # the null class is the last row
    params = classes.init_params(jax.random.PRNGKey(0), 4)
    assert params["class_embedder"].shape == (4, 4)
    context = classes.context(params, jnp.asarray(cond))
    np.testing.assert_array_equal(context[:, 0], params["class_embedder"][cond])
    batch = {"label": jnp.asarray(cond)}
    np.testing.assert_array_equal(classes.drop(batch, jax.random.PRNGKey(1), 1.0), [3, 3, 3])
    np.testing.assert_array_equal(classes.drop(batch, jax.random.PRNGKey(1), 0.0), cond)
    assert classes.grid(["a", "b", "c", "d", "e"]) == [0, 1, 2, 0, 1]
    with pytest.raises(ValueError, match=r"class labels \[3\] are outside \[0, 3\)"):
        classes.conditions([3])
    with pytest.raises(ValueError, match="class-conditional"):
        classes.conditions(["a red circle"])


def test_unconditional_has_one_zero_token_and_no_guidance():
    none = make_conditioning("none", context_dim=5)
    cond, uncond = none.conditions(["anything", "twice"])
    np.testing.assert_array_equal(cond, [0, 0])
    assert not none.guided and none.init_params(jax.random.PRNGKey(0), 5) == {}
    context = none.context({}, jnp.asarray(cond))
    assert context.shape == (2, 1, 5) and not np.any(context)
    assert none.drop({"image": jnp.zeros((3, 4, 4, 3))}, jax.random.PRNGKey(0), 0.5).shape == (3,)


def test_a_conditioning_must_implement_the_whole_interface():
    from ldm_jax.ldm import Conditioning

    class Partial(Conditioning):  # no drop, no conditions
        def context(self, params, cond):
            return cond

        def null(self, cond):
            return cond

    with pytest.raises(TypeError, match="abstract"):
        Partial()
