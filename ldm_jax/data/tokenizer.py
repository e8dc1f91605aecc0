"""The CLIP BPE tokenizer, offline: transformers' ``CLIPTokenizer`` (Rust ``tokenizers``
backend) built from the BPE vocabulary shipped in this package (``bpe_simple_vocab_16e6.txt.gz``,
OpenAI CLIP, MIT; see ``LICENSE_CLIP_VOCAB``), so nothing is downloaded.

    tokenizer = make_tokenizer(77)
    ids = tokenize(tokenizer, ["a red circle on the left"])   # int32 [1, 77]
"""
from __future__ import annotations

import functools
import gzip
import importlib.resources
import json
import pathlib
import warnings
from typing import Sequence

import numpy as np

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
BOS_ID = 49406
EOS_ID = 49407
CONTEXT_LENGTH = 77
_NUM_MERGES = 49152 - 256 - 2


@functools.lru_cache(maxsize=None)
def _bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP / GPT-2's reversible byte -> printable unicode character table."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@functools.lru_cache(maxsize=None)
def clip_vocab_and_merges() -> tuple[dict[str, int], tuple[str, ...]]:
    """The CLIP BPE ``(vocab {token: id}, merges ("a b", ...))`` from the shipped vocabulary file.

    Built exactly as OpenAI CLIP's ``SimpleTokenizer``: merges are lines 1..48894 of the file;
    the vocabulary is the 256 byte characters, the same with ``</w>``, every merge joined, then
    ``<|startoftext|>`` and ``<|endoftext|>``.
    """
    data = importlib.resources.files("ldm_jax.data").joinpath(VOCAB_FILE).read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    merges = tuple(lines[1:_NUM_MERGES + 1])
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise RuntimeError(f"{VOCAB_FILE}: built {len(vocab)} tokens, expected {VOCAB_SIZE}")
    return vocab, merges


def make_tokenizer(max_length: int = CONTEXT_LENGTH):
    """transformers ``CLIPTokenizer`` (the fast, ``tokenizers``-backed one) for the CLIP vocabulary.

    Built offline from the vocabulary shipped with ldm_jax. Its pad token is <|endoftext|> (49407),
    as in SD 1.x's tokenizer, and ``model_max_length`` is ``max_length``. transformers 5's
    ``save_pretrained(dir)`` writes ``tokenizer.json``; ``write_vocab_files(dir)`` adds the
    ``vocab.json`` / ``merges.txt`` pair that older readers expect.
    """
    from transformers import CLIPTokenizer  # deferred: importing transformers takes seconds

    vocab, merges = clip_vocab_and_merges()
    pairs = [tuple(m.split()) for m in merges]  # tokenizers' BPE wants (left, right) pairs
    return CLIPTokenizer(vocab=dict(vocab), merges=pairs, model_max_length=max_length)


def write_vocab_files(directory) -> None:
    """Write the CLIP ``vocab.json`` and ``merges.txt`` (the slow-tokenizer files) into ``directory``."""
    vocab, merges = clip_vocab_and_merges()
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n",
                                          encoding="utf-8")


def tokenize(tokenizer, prompts: str | Sequence[str], max_length: int | None = None) -> np.ndarray:
    """Prompts -> ``int32 [B, max_length]`` ids: <|startoftext|> ... <|endoftext|>, then padding.

    ``max_length`` defaults to ``tokenizer.model_max_length`` (77). Padding uses the tokenizer's
    pad token (49407 = <|endoftext|> for ``make_tokenizer`` and SD 1.x folders; SD 2.x folders pad
    with id 0 = "!"). A prompt longer than ``max_length`` is truncated (keeping the final
    <|endoftext|>) with a warning naming how many tokens were dropped; an empty prompt gives
    ``[49406, 49407, pad...]``.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    max_length = int(max_length or tokenizer.model_max_length)
    # Tokenize without truncation first, to know what truncation would drop.
    full = tokenizer(list(prompts), add_special_tokens=True, truncation=False,
                     verbose=False)["input_ids"]
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError("tokenizer has no pad token")
    out = np.full((len(full), max_length), pad_id, dtype=np.int32)
    for i, ids in enumerate(full):
        if len(ids) > max_length:
            dropped = len(ids) - max_length
            msg = (f"prompt {i} is {len(ids)} tokens long; the last {dropped} tokens were dropped "
                   f"to fit max_length={max_length}: {prompts[i][:60]!r}...")
            warnings.warn(msg, stacklevel=2)
            ids = ids[:max_length - 1] + ids[-1:]  # keep the end-of-text token
        out[i, :len(ids)] = ids
    return out
