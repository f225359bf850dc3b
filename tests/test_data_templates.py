"""Golden tables for every built-in format template: the exact text, which characters are
trained (⟦…⟧), and which GPT-2 tokens are trained; plus user format templates."""

import numpy as np
import pytest

from sft_jax.data import FormatTemplate, encode, formats, load_tokenizer, templates, view


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("gpt2")


ALPACA_ROW = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
CHAT_ROW = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
}
ALPACA = formats.to_messages(ALPACA_ROW, "alpaca")
CHAT = formats.to_messages(CHAT_ROW, "messages")
PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
)
EOT = "<|endoftext|>"

# (template, messages, text with trained characters in ⟦⟧, text with trained GPT-2 tokens in ⟦⟧,
#  the trained tokens). Written out in full, not built from the module's constants.
GOLDEN = [
    (
        "alpaca", ALPACA,
        PREAMBLE_INPUT + "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n"
        "### Response:\n⟦5<|endoftext|>⟧",
        PREAMBLE_INPUT + "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n"
        "### Response:\n⟦5<|endoftext|>⟧",
        ["5", EOT],
    ),
    (
        "alpaca", CHAT,  # A system message replaces the preamble; turns repeat the blocks.
        "Be brief.\n\n### Instruction:\nHi\n\n### Response:\n⟦Hello!<|endoftext|>⟧\n\n"
        "### Instruction:\n2+2?\n\n### Response:\n⟦4<|endoftext|>⟧",
        "Be brief.\n\n### Instruction:\nHi\n\n### Response:\n⟦Hello!<|endoftext|>⟧\n\n"
        "### Instruction:\n2+2?\n\n### Response:\n⟦4<|endoftext|>⟧",
        ["Hello", "!", EOT, "4", EOT],
    ),
    (
        "human_assistant", ALPACA,
        "Human: Add the numbers.\n\n2 and 3\n\nAssistant: ⟦5<|endoftext|>⟧",
        # GPT-2 reads " 5" as one token: it carries a response character, so it trains.
        "Human: Add the numbers.\n\n2 and 3\n\nAssistant:⟦ 5<|endoftext|>⟧",
        [" 5", EOT],
    ),
    (
        "human_assistant", CHAT,
        "Be brief.\n\nHuman: Hi\n\nAssistant: ⟦Hello!<|endoftext|>⟧\n\nHuman: 2+2?\n\n"
        "Assistant: ⟦4<|endoftext|>⟧",
        "Be brief.\n\nHuman: Hi\n\nAssistant:⟦ Hello!<|endoftext|>⟧\n\nHuman: 2+2?\n\n"
        "Assistant:⟦ 4<|endoftext|>⟧",
        [" Hello", "!", EOT, " 4", EOT],
    ),
    (
        "chatml", ALPACA,
        "<|im_start|>user\nAdd the numbers.\n\n2 and 3<|im_end|>\n<|im_start|>assistant\n"
        "⟦5<|im_end|>⟧",
        "<|im_start|>user\nAdd the numbers.\n\n2 and 3<|im_end|>\n<|im_start|>assistant\n"
        "⟦5<|im_end|>⟧",
        # GPT-2 has no <|im_end|> token: its text is trained, piece by piece.
        ["5", "<", "|", "im", "_", "end", "|", ">"],
    ),
    (
        "chatml", CHAT,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n⟦Hello!<|im_end|>⟧\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n⟦4<|im_end|>⟧",
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n⟦Hello!<|im_end|>⟧\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n⟦4<|im_end|>⟧",
        ["Hello", "!"] + ["<", "|", "im", "_", "end", "|", ">"]
        + ["4"] + ["<", "|", "im", "_", "end", "|", ">"],
    ),
    (
        "raw", formats.to_messages({"prompt": "Q: 2+3?\nA:", "completion": " 5"}, "prompt_completion"),  # noqa: E501
        "Q: 2+3?\nA:⟦ 5<|endoftext|>⟧",
        "Q: 2+3?\nA:⟦ 5<|endoftext|>⟧",
        [" 5", EOT],
    ),
    (
        "raw", ALPACA,  # No separator: "3" + "5" tokenize as " 35", which trains (see above).
        "Add the numbers.\n\n2 and 3⟦5<|endoftext|>⟧",
        "Add the numbers.\n\n2 and⟦ 35<|endoftext|>⟧",
        [" 35", EOT],
    ),
]  # fmt: skip


@pytest.mark.parametrize("name,messages,chars,tokens,trained", GOLDEN)
def test_golden_text_and_mask(tok, name, messages, chars, tokens, trained):
    r = templates.render_format(templates.BUILTIN[name], messages, tok.eos_token)
    assert view.mark_text(r.text, r.spans) == chars
    ((ids, mask),) = encode.encode([r], tok)
    assert view.mark_tokens(ids, mask, tok) == tokens
    assert [tok.decode([i]) for i in ids[mask]] == trained
    # The contract: the EOS / end-of-turn text after every response is trained.
    for s, e in r.spans:
        assert r.text[s:e].endswith(("<|endoftext|>", "<|im_end|>"))


def test_alpaca_without_input_is_the_classic_prompt(tok):
    msgs = formats.to_messages({"instruction": "Name a colour.", "output": "Blue."}, "alpaca")
    r = templates.render_format(templates.ALPACA, msgs, EOT)
    assert view.mark_text(r.text, r.spans) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nName a colour.\n\n### Response:\n"
        "⟦Blue.<|endoftext|>⟧"
    )


def test_assistant_turns_last_trains_only_the_last(tok):
    r = templates.render_format(templates.CHATML, CHAT, EOT, assistant_turns="last")
    assert r.text == templates.render_format(templates.CHATML, CHAT, EOT).text
    assert [r.text[s:e] for s, e in r.spans] == ["4<|im_end|>"]


def test_train_on_all_trains_every_token_but_a_prepended_bos(tok):
    r = templates.render_format(templates.ALPACA, ALPACA, EOT)
    ((ids, mask),) = encode.encode([r], tok, "all")
    assert mask.all() and tok.decode(ids) == r.text
    ((ids_b, mask_b),) = encode.encode([r], tok, "all", bos=7)
    assert ids_b[0] == 7 and not mask_b[0] and mask_b[1:].all()


def test_braces_in_data_are_text(tok):
    msgs = formats.to_messages(
        {"instruction": "Fill {x} and {input}", "output": "{eos} {0}"}, "alpaca"
    )
    r = templates.render_format(templates.ALPACA, msgs, EOT)
    assert "### Instruction:\nFill {x} and {input}\n\n" in r.text
    assert [r.text[s:e] for s, e in r.spans] == ["{eos} {0}<|endoftext|>"]


def test_user_format_template_golden(tok):
    vicuna = FormatTemplate(
        system="{content}\n\n",
        user="USER: {content}\n",
        assistant="ASSISTANT: {content}{eos}\n",
        default_system="A chat.",
    )
    vicuna.check()
    msgs = formats.to_messages({"prompt": "Hi", "completion": "Hello!"}, "prompt_completion")
    r = templates.render_format(vicuna, msgs, EOT)
    # Trailing template whitespace after the last trained span is dropped.
    assert view.mark_text(r.text, r.spans) == (
        "A chat.\n\nUSER: Hi\nASSISTANT: ⟦Hello!<|endoftext|>⟧"
    )
    r2 = templates.render_format(vicuna, CHAT, EOT)
    assert view.mark_text(r2.text, r2.spans) == (
        "Be brief.\n\nUSER: Hi\nASSISTANT: ⟦Hello!<|endoftext|>⟧\nUSER: 2+2?\n"
        "ASSISTANT: ⟦4<|endoftext|>⟧"
    )


def test_user_template_with_bos_field(tok):
    t = FormatTemplate(user="{bos}[INST] {content} [/INST]", assistant="{content}{eos}")
    r = templates.render_format(t, ALPACA, "</s>", bos="<s>")
    assert view.mark_text(r.text, r.spans) == (
        "<s>[INST] Add the numbers.\n\n2 and 3 [/INST]⟦5</s>⟧"
    )


def test_eos_trainable_even_when_pad_is_eos(tok):
    tok2 = load_tokenizer("gpt2")
    tok2.pad_token = tok2.eos_token
    assert tok2.pad_token_id == tok2.eos_token_id == 50256
    r = templates.render_format(templates.ALPACA, ALPACA, tok2.eos_token)
    ((ids, mask),) = encode.encode([r], tok2)
    assert ids[-1] == 50256 and mask[-1]
    assert np.count_nonzero(mask) == 2
