"""CLIPTextEncoder parity with transformers' CLIPTextModel, its size, and the offline tokenizer."""
import functools
import html
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import regex

from ldm_jax.interop.clip_weights import (text_encoder_kwargs_from_config,
                                          text_encoder_params_from_state_dict)
from ldm_jax.models import text_encoder as te

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, max_position_embeddings=16)


def _torch_model(**overrides):
    torch.manual_seed(0)
    overrides = {"eos_token_id": 98, "bos_token_id": 97, "pad_token_id": 1, **overrides}
    config = transformers.CLIPTextConfig(**TINY, **overrides)
    model = transformers.CLIPTextModel(config).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine params and biases (init gives 1 and 0)
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _ids(eos):
    # Two prompts of different lengths, eos then padding (pad = eos, as SD 1.x), and a third whose
    # padding id (0) is lower than eos.
    rows = [[1, 5, 7, 9, eos] + [eos] * 7, [1, 40, eos] + [eos] * 9, [1, 3, 3, 8, 60, 2, eos] + [0] * 5]
    return np.array(rows, np.int32)


@pytest.mark.parametrize("hidden_act,eos", [("quick_gelu", 98), ("gelu", 98), ("quick_gelu", 2)])
def test_parity_with_transformers(hidden_act, eos):
    model = _torch_model(hidden_act=hidden_act, eos_token_id=eos)
    ids = _ids(eos)
    if eos == 2:  # legacy rule: pooled at argmax(ids); make the eos the highest id in each row
        ids = np.where(ids == 2, 97, ids)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids).long(), output_hidden_states=True)
    kwargs = text_encoder_kwargs_from_config(model.config.to_dict())
    assert kwargs["hidden_act"] == hidden_act and kwargs["eos_token_id"] == eos
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    params = text_encoder_params_from_state_dict(sd, kwargs)
    module = te.CLIPTextEncoder(**kwargs)

    hidden, pooled = module.apply({"params": params}, ids)
    errs = {}
    for name, ours, ref in [("last_hidden_state", hidden, out.last_hidden_state),
                            ("pooled", pooled, out.pooler_output)]:
        ref = ref.numpy()
        errs[name] = float(np.abs(np.asarray(ours) - ref).max())
        assert errs[name] <= 1e-4 * max(1.0, np.abs(ref).max()), (name, errs[name])
    # clip_skip=1: diffusers' recipe, final_layer_norm(hidden_states[-2]).
    skip_hidden, skip_pooled = module.apply({"params": params}, ids, clip_skip=1)
    with torch.no_grad():
        ref_skip = model.final_layer_norm(out.hidden_states[-2]).numpy()
    errs["clip_skip=1"] = float(np.abs(np.asarray(skip_hidden) - ref_skip).max())
    assert errs["clip_skip=1"] <= 1e-4 * max(1.0, np.abs(ref_skip).max())
    np.testing.assert_array_equal(np.asarray(skip_pooled), np.asarray(pooled))
    raw, _ = module.apply({"params": params}, ids, clip_skip=1, final_layer_norm=False)
    np.testing.assert_allclose(np.asarray(raw), out.hidden_states[-2].numpy(), atol=1e-4)
    print(f"\n{hidden_act} eos={eos}: max abs err " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))


def test_attention_mask_matches_transformers():
    model = _torch_model()
    ids = _ids(98)
    mask = (np.arange(12)[None] < np.array([[5], [3], [7]])).astype(np.int32)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids).long(),
                    attention_mask=torch.from_numpy(mask).long()).last_hidden_state.numpy()
    kwargs = text_encoder_kwargs_from_config(model.config.to_dict())
    params = text_encoder_params_from_state_dict(
        {k: v.numpy() for k, v in model.state_dict().items()}, kwargs)
    hidden, _ = te.CLIPTextEncoder(**kwargs).apply({"params": params}, ids, mask)
    np.testing.assert_allclose(np.asarray(hidden), ref, atol=1e-4)
    unmasked, _ = te.CLIPTextEncoder(**kwargs).apply({"params": params}, ids)
    assert np.abs(np.asarray(unmasked) - ref).max() > 1e-3  # the mask did change something


def test_vit_l14_param_count():
    module = te.CLIPTextEncoder(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                num_hidden_layers=12, num_attention_heads=12,
                                max_position_embeddings=77)
    shapes = jax.eval_shape(lambda i: module.init(jax.random.PRNGKey(0), i),
                            jax.ShapeDtypeStruct((1, 77), jnp.int32))
    count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
    assert count == 123_060_480


def test_random_init_is_trainable():
    module = te.CLIPTextEncoder(**TINY, eos_token_id=98)
    ids = _ids(98)
    params = module.init(jax.random.PRNGKey(0), ids)["params"]
    assert params["embeddings"]["token_embedding"]["embedding"].shape == (99, 32)
    assert set(params["encoder"]) == {"layers_0", "layers_1", "layers_2"}
    grads = jax.grad(lambda p: module.apply({"params": p}, ids)[1].sum())(params)
    g = grads["encoder"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0


# ---------------------------------------------------------------------------------------------
# Tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return te.make_tokenizer()


class _ReferenceBPE:
    """OpenAI CLIP's SimpleTokenizer (MIT), trimmed: an independent pure-Python BPE to compare
    against (no ftfy here; the prompts below are plain ASCII, where ftfy is the identity)."""

    def __init__(self):
        vocab, merges = te.clip_vocab_and_merges()
        self.encoder = vocab
        self.byte_encoder = te._bytes_to_unicode()
        self.bpe_ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
        self.pat = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
                                 r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)

    @functools.lru_cache(maxsize=None)
    def bpe(self, token):
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:])}
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            new, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    new.append(word[i] + word[i + 1])
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = tuple(new)
        return word

    def encode(self, text):
        text = " ".join(html.unescape(html.unescape(text)).split()).strip().lower()
        ids = [te.BOS_ID]
        for token in regex.findall(self.pat, text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids += [self.encoder[t] for t in self.bpe(token)]
        return ids + [te.EOS_ID]


PROMPTS = ["a photo of a cat", "A red CIRCLE on the left, 3 blue squares!",
           "an astronaut riding a horse on mars, 4k, trending on artstation",
           "it's the dog's   toy (don't)", "naïve café über", ""]


def test_known_ids(tokenizer):
    ids = te.tokenize(tokenizer, ["a photo of a cat", ""])
    assert ids.dtype == np.int32 and ids.shape == (2, 77)
    np.testing.assert_array_equal(ids[0, :7], [49406, 320, 1125, 539, 320, 2368, 49407])
    assert (ids[0, 7:] == 49407).all()  # padded with <|endoftext|>
    np.testing.assert_array_equal(ids[1], [49406] + [49407] * 76)
    assert len(te.clip_vocab_and_merges()[0]) == 49408


def test_matches_reference_bpe_and_vocab_files(tokenizer, tmp_path):
    reference = _ReferenceBPE()
    te.write_vocab_files(tmp_path)
    # transformers 5 reads a folder holding only vocab.json + merges.txt (the SD 1.x layout).
    from_files = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "vocab.json").read_text())["cat</w>"] == 2368
    ours = te.tokenize(tokenizer, PROMPTS)
    for row, prompt in zip(ours, PROMPTS):
        ref = reference.encode(prompt)
        n = len(ref)
        assert row[:n].tolist() == ref, prompt
        assert (row[n:] == te.EOS_ID).all()
        assert from_files(prompt)["input_ids"] == ref, prompt


def test_truncation_warns_and_keeps_eos(tokenizer):
    long_prompt = " ".join(["cat"] * 100)  # 102 tokens with bos/eos
    with pytest.warns(UserWarning, match="last 25 tokens were dropped"):
        ids = te.tokenize(tokenizer, [long_prompt, "a cat"])
    assert ids.shape == (2, 77)
    assert ids[0, 0] == 49406 and ids[0, -1] == 49407 and (ids[0, 1:-1] == 2368).all()
    np.testing.assert_array_equal(ids[1, :4], [49406, 320, 2368, 49407])
