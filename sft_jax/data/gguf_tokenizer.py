"""The tokenizer a GGUF file carries, built from its metadata with `tokenizers` alone.

A GGUF (llama.cpp's format) has no `tokenizer.json`: the vocabulary, merges, token types,
special token ids, BOS/EOS flags and chat template are metadata under llama.cpp's key names.
transformers can read them (`AutoTokenizer.from_pretrained(..., gguf_file=)`), but since 5.25
its GGUF reader imports torch, which is not a runtime dependency of sft_jax. So we read the
metadata with the `gguf` package (numpy only) and build the byte-level BPE ourselves, then
wrap it in `PreTrainedTokenizerFast`: the same object the rest of the code (offsets, chat
templates, `save_pretrained`) already uses.

Only byte-level BPE vocabularies (`tokenizer.ggml.model = gpt2`: SmolLM, Llama 3, Qwen 2/3,
GPT-2 ...) are built; a SentencePiece or other vocabulary is refused with the way out.

How text is split before BPE (`tokenizer.ggml.pre`) follows llama.cpp, which is what the
model's original `tokenizer.json` does. transformers' GGUF reader ignores some of these:
for `smollm` it keeps GPT-2's split, where llama.cpp and SmolLM's own tokenizer.json put
every number character (Unicode's N categories) alone first. The two agree on ASCII digits
(the vocabulary has no digit merges) and differ on others ("²", "١", "½"); we follow the
model (tests/test_gguf_tokenizer.py shows both).
"""

from __future__ import annotations

import os
from typing import Any

import gguf
import transformers
from absl import logging
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

# llama.cpp's token types (gguf.TokenType): CONTROL tokens are special (<|im_end|>);
# USER_DEFINED ones are matched whole but are ordinary text (<think>).
_CONTROL, _USER_DEFINED = 3, 4

# llama.cpp's split regexes by `tokenizer.ggml.pre` (llama-vocab.cpp), for vocabularies
# whose split is not GPT-2's. Each string is one llama.cpp pre-type's expression.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_REGEX_SPLITS = {
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
# Pre-types that are GPT-2's byte-level split as it is.
_GPT2_SPLIT = frozenset({"default", "gpt2", "gpt-2"})


def _pre_tokenizer(pre: str | None, path: str) -> pre_tokenizers.PreTokenizer:
    """How text is cut into words before BPE, as llama.cpp does for this pre-type."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        # llama.cpp isolates every digit (\p{N}) before GPT-2's split, as SmolLM's own
        # tokenizer.json does with Digits(individual_digits=True).
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _REGEX_SPLITS:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_REGEX_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre not in _GPT2_SPLIT and pre is not None:
        logging.warning(
            "%s: tokenizer.ggml.pre=%r is not one sft_jax knows; splitting text as GPT-2 "
            "does, which may differ from the model's own tokenizer. Set model.tokenizer to "
            "the model's Hugging Face tokenizer folder to be sure.",
            path,
            pre,
        )
    return byte_level


def _metadata(path: str) -> dict[str, Any]:
    """The tokenizer's metadata. Read with `gguf` here rather than through `sft_jax.hf`: the
    data package stays below the model and its weights."""
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:  # the reader raises assorted errors on truncated/garbage input
        raise ValueError(f"model.tokenizer: {path} is not a readable GGUF file: {e}") from e

    def field(key: str) -> Any:
        entry = reader.fields.get(key)
        return None if entry is None else entry.contents()

    keys = (
        "model",
        "pre",
        "tokens",
        "token_type",
        "merges",
        "add_bos_token",
        "add_eos_token",
        "bos_token_id",
        "eos_token_id",
        "unknown_token_id",
        "padding_token_id",
    )
    meta = {key: field(f"tokenizer.ggml.{key}") for key in keys}
    meta["chat_template"] = field("tokenizer.chat_template")
    return meta


def _special_token(meta: dict[str, Any], key: str) -> str | None:
    index = meta[key]
    return None if index is None else meta["tokens"][index]


def load_gguf_tokenizer(path: str) -> transformers.PreTrainedTokenizerFast:
    """The fast tokenizer stored in the GGUF file at `path` (a local file)."""
    meta = _metadata(path)
    if meta["model"] != "gpt2":
        raise ValueError(
            f"model.tokenizer: {path} holds a {meta['model']!r} tokenizer; sft_jax builds only "
            "byte-level BPE ('gpt2') tokenizers from GGUF files. Set model.tokenizer to the "
            "model's Hugging Face tokenizer folder (tokenizer.json) instead."
        )
    tokens = meta["tokens"]
    if not tokens or not meta["merges"]:
        raise ValueError(f"model.tokenizer: {path} has no tokenizer.ggml.tokens or .merges")
    types = meta["token_type"] or [1] * len(tokens)
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = [tuple(merge.split(" ", 1)) for merge in meta["merges"]]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = _pre_tokenizer(meta["pre"], path)
    backend.decoder = decoders.ByteLevel()
    # A control token outside the byte alphabet is a llama.cpp mislabel of a plain token
    # written in raw text; adding it would split text the model never saw split.
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())  # GPT-2's 256 byte characters
    control = [
        AddedToken(token, normalized=False, special=True)
        for token, kind in zip(tokens, types, strict=True)
        if kind == _CONTROL and set(token) <= alphabet
    ]
    user_defined = [
        AddedToken(token, normalized=False, special=False)
        for token, kind in zip(tokens, types, strict=True)
        if kind == _USER_DEFINED
    ]
    backend.add_special_tokens(control)
    backend.add_tokens(user_defined)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        name_or_path=os.path.basename(path),
        bos_token=_special_token(meta, "bos_token_id"),
        eos_token=_special_token(meta, "eos_token_id"),
        unk_token=_special_token(meta, "unknown_token_id"),
        pad_token=_special_token(meta, "padding_token_id"),
        add_bos_token=bool(meta["add_bos_token"]),
        add_eos_token=bool(meta["add_eos_token"]),
        chat_template=meta["chat_template"],
    )
