"""Text -> ids and masks: one tokenizer call whose ids are the tokenizer's own, special
tokens read as at inference, masks from character offsets (straddling tokens train)."""

import numpy as np
import pytest
from tokenizers import processors

from sft_jax.data import encode, load_tokenizer
from sft_jax.data.templates import Rendered


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("gpt2")


TEXTS = [
    Rendered("Q: hi\nA: Hello!<|endoftext|>", ((9, 28),)),
    Rendered("Übersetzt: 中文 🤖<|endoftext|>", ((11, 29),)),
    Rendered("no spans", ()),
]


def test_ids_are_the_tokenizers_own(tok):
    out = encode.encode(TEXTS, tok)
    for r, (ids, mask) in zip(TEXTS, out, strict=True):
        assert ids.dtype == np.int32 and mask.dtype == np.bool_ and ids.shape == mask.shape
        assert ids.tolist() == tok(r.text, add_special_tokens=False)["input_ids"]
    assert out[0][0][-1] == 50256  # The template's EOS text is the EOS token.
    assert not out[2][1].any()


def test_special_tokens_read_even_after_a_split_call(tok):
    tok("a<|endoftext|>", split_special_tokens=True)  # Leaves the backend flag set, maybe.
    ((ids, _),) = encode.encode([TEXTS[0]], tok)
    assert ids[-1] == 50256
    saved = tok.backend_tokenizer.encode_special_tokens
    tok.backend_tokenizer.encode_special_tokens = True
    ((ids, _),) = encode.encode([TEXTS[0]], tok)
    assert ids[-1] == 50256 and tok.backend_tokenizer.encode_special_tokens  # Restored.
    tok.backend_tokenizer.encode_special_tokens = saved


def test_mask_from_offsets_multibyte_and_straddling(tok):
    ((ids, mask),) = encode.encode([TEXTS[1]], tok)
    assert tok.decode(ids[mask]) == "中文 🤖<|endoftext|>"
    # "Assistant:" + " Blue" -> the token " Blue" starts in the template's space: it trains.
    r = Rendered("Assistant: Blue.", ((11, 16),))
    ((ids, mask),) = encode.encode([r], tok)
    assert [tok.decode([i]) for i in ids[mask]] == [" Blue", "."]


def test_bos_prepended_only_where_the_tokenizer_adds_one(tmp_path, tok):
    assert encode.bos_to_prepend(tok) is None  # GPT-2: BOS == EOS, never prepended.
    base = load_tokenizer("gpt2")
    base.add_special_tokens({"bos_token": "<s>"})
    bos = base.convert_tokens_to_ids("<s>")
    base.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    base.save_pretrained(tmp_path)
    with_bos = load_tokenizer(str(tmp_path))
    assert encode.bos_to_prepend(with_bos) == bos
    ((ids, mask),) = encode.encode([TEXTS[0]], with_bos, bos=bos)
    ((plain, plain_mask),) = encode.encode([TEXTS[0]], tok)
    assert ids[0] == bos and not mask[0]
    np.testing.assert_array_equal(ids[1:], plain)
    np.testing.assert_array_equal(mask[1:], plain_mask)


def test_special_token_pattern(tok):
    pattern = encode.special_token_pattern(tok)
    assert pattern.search("a <|endoftext|> b")[0] == "<|endoftext|>"
    assert pattern.search("<|endoftext|") is None
