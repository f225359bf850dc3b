"""Templates: golden tables for every built-in format template (the exact text, which
characters are trained (⟦…⟧), and which GPT-2 tokens are trained) and user format
templates; then the assistant spans of stock chat templates, found by rendering and
diffing: SmolLM2's own ChatML template (from its GGUF file), Llama 3's and Qwen 2.5's stock
templates; generation markers; templates that cannot work. Golden masks, token by token.
Then the new families' published templates (tests/data/templates): Qwen3's, which rewrites
history (conversations split per assistant turn), and Gemma 2's and 3's, with a system turn.
Then tools and reasoning: golden tables under Qwen 2.5's and Qwen3's stock templates and
chatml, with data.train_reasoning on and off."""

import copy
import json
import pathlib

import numpy as np
import pytest

from sft_jax.data import (
    DataSpec,
    FormatTemplate,
    build_splits,
    examples,
    formats,
    load_tokenizer,
    templates,
    view,
)
from sft_jax.data.examples import encode
from sft_jax.data.spec import CODES, RowError
from sft_jax.data.templates import JinjaTemplate


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
        "alpaca",
        ALPACA,
        PREAMBLE_INPUT + "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n"
        "### Response:\n⟦5<|endoftext|>⟧",
        PREAMBLE_INPUT + "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n"
        "### Response:\n⟦5<|endoftext|>⟧",
        ["5", EOT],
    ),
    (
        "alpaca",
        CHAT,  # A system message replaces the preamble; turns repeat the blocks.
        "Be brief.\n\n### Instruction:\nHi\n\n### Response:\n⟦Hello!<|endoftext|>⟧\n\n"
        "### Instruction:\n2+2?\n\n### Response:\n⟦4<|endoftext|>⟧",
        "Be brief.\n\n### Instruction:\nHi\n\n### Response:\n⟦Hello!<|endoftext|>⟧\n\n"
        "### Instruction:\n2+2?\n\n### Response:\n⟦4<|endoftext|>⟧",
        ["Hello", "!", EOT, "4", EOT],
    ),
    (
        "human_assistant",
        ALPACA,
        "Human: Add the numbers.\n\n2 and 3\n\nAssistant: ⟦5<|endoftext|>⟧",
        # GPT-2 reads " 5" as one token: it carries a response character, so it trains.
        "Human: Add the numbers.\n\n2 and 3\n\nAssistant:⟦ 5<|endoftext|>⟧",
        [" 5", EOT],
    ),
    (
        "human_assistant",
        CHAT,
        "Be brief.\n\nHuman: Hi\n\nAssistant: ⟦Hello!<|endoftext|>⟧\n\nHuman: 2+2?\n\n"
        "Assistant: ⟦4<|endoftext|>⟧",
        "Be brief.\n\nHuman: Hi\n\nAssistant:⟦ Hello!<|endoftext|>⟧\n\nHuman: 2+2?\n\n"
        "Assistant:⟦ 4<|endoftext|>⟧",
        [" Hello", "!", EOT, " 4", EOT],
    ),
    (
        "chatml",
        ALPACA,
        "<|im_start|>user\nAdd the numbers.\n\n2 and 3<|im_end|>\n<|im_start|>assistant\n"
        "⟦5<|im_end|>⟧",
        "<|im_start|>user\nAdd the numbers.\n\n2 and 3<|im_end|>\n<|im_start|>assistant\n"
        "⟦5<|im_end|>⟧",
        # GPT-2 has no <|im_end|> token: its text is trained, piece by piece.
        ["5", "<", "|", "im", "_", "end", "|", ">"],
    ),
    (
        "chatml",
        CHAT,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n⟦Hello!<|im_end|>⟧\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n⟦4<|im_end|>⟧",
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n⟦Hello!<|im_end|>⟧\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n⟦4<|im_end|>⟧",
        ["Hello", "!"]
        + ["<", "|", "im", "_", "end", "|", ">"]
        + ["4"]
        + ["<", "|", "im", "_", "end", "|", ">"],
    ),
    (
        "raw",
        formats.to_messages({"prompt": "Q: 2+3?\nA:", "completion": " 5"}, "prompt_completion"),  # noqa: E501
        "Q: 2+3?\nA:⟦ 5<|endoftext|>⟧",
        "Q: 2+3?\nA:⟦ 5<|endoftext|>⟧",
        [" 5", EOT],
    ),
    (
        "raw",
        ALPACA,  # No separator: "3" + "5" tokenize as " 35", which trains (see above).
        "Add the numbers.\n\n2 and 3⟦5<|endoftext|>⟧",
        "Add the numbers.\n\n2 and⟦ 35<|endoftext|>⟧",
        [" 35", EOT],
    ),
]


@pytest.mark.parametrize("name,messages,chars,tokens,trained", GOLDEN)
def test_golden_text_and_mask(tok, name, messages, chars, tokens, trained):
    r = templates.render_format(templates.BUILTIN[name], messages, tok.eos_token)
    assert view.mark_text(r.text, r.spans) == chars
    ((ids, mask),) = encode([r], tok)
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
    ((ids, mask),) = encode([r], tok, "all")
    assert mask.all() and tok.decode(ids) == r.text
    ((ids_b, mask_b),) = encode([r], tok, "all", bos=7)
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
    ((ids, mask),) = encode([r], tok2)
    assert ids[-1] == 50256 and mask[-1]
    assert np.count_nonzero(mask) == 2


# ---------------------------------------------------------------- Jinja chat templates

# Stock templates, verbatim (Meta-Llama-3-8B-Instruct; Qwen2.5-*-Instruct, in tests/data).
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN25 = (pathlib.Path(__file__).parent / "data" / "templates" / "qwen2.5.jinja").read_text(
    encoding="utf-8"
)

MULTI = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]
NO_SYSTEM = MULTI[1:3]


@pytest.fixture(scope="module")
def smol():
    return load_tokenizer("asset:smollm2-135m-instruct-gguf")


@pytest.fixture(scope="module")
def llama3():
    """GPT-2's vocabulary plus Llama 3's special tokens, with Llama 3's stock template."""
    tok = copy.deepcopy(load_tokenizer("gpt2"))
    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.bos_token, tok.eos_token = "<|begin_of_text|>", "<|eot_id|>"
    tok.chat_template = LLAMA3
    return tok


@pytest.fixture(scope="module")
def qwen(smol):
    tok = copy.deepcopy(smol)  # Has <|im_start|> and <|im_end|>, as Qwen's tokenizer does.
    tok.chat_template = QWEN25
    return tok


def _encoder(tok, **kw):
    spec = DataSpec(train="x", template="tokenizer", format="messages", cache=False, **kw)
    return examples.make_encoder(spec, tok, templates.resolve_template(spec, tok), "messages")


def _masked(tok, messages, **kw):
    enc = _encoder(tok, **kw)
    r = enc.render(enc.messages({"messages": messages}))
    ((ids, mask),) = encode([r], tok, enc.train_on, enc.bos)
    return r, ids, mask


def test_smollm2_stock_template_multi_turn_with_system(smol):
    r, ids, mask = _masked(smol, MULTI)
    # The text is exactly what the tokenizer's own apply_chat_template renders.
    assert r.text == smol.apply_chat_template(MULTI, tokenize=False)
    assert ids.tolist() == smol.apply_chat_template(MULTI, tokenize=True, return_dict=False)
    assert view.mark_tokens(ids, mask, smol) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n⟦Hello!<|im_end|>⟧\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n⟦4<|im_end|>⟧\n"
    )
    im_end = smol.convert_tokens_to_ids("<|im_end|>")
    assert [smol.decode([i]) for i in ids[mask]] == ["Hello", "!", "<|im_end|>", "4", "<|im_end|>"]
    # Every <|im_end|> that closes an assistant turn trains; those of other turns do not.
    ends = np.flatnonzero(ids == im_end)
    assert mask[ends].tolist() == [False, False, True, False, True]


def test_smollm2_default_system_and_last_turn_only(smol):
    r, ids, mask = _masked(smol, NO_SYSTEM)
    assert r.text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert view.mark_tokens(ids, mask, smol).endswith(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n⟦Hello!<|im_end|>⟧\n"
    )
    _, ids, mask = _masked(smol, MULTI, assistant_turns="last")
    assert [smol.decode([i]) for i in ids[mask]] == ["4", "<|im_end|>"]


def test_builtin_chatml_on_smollm2_matches_its_stock_template(smol):
    """With a system message the built-in chatml gives the stock text (but the final
    newline, which trains nothing) and the same trained tokens."""
    spec = DataSpec(train="x", template="chatml", format="messages", cache=False)
    enc = examples.make_encoder(spec, smol, templates.resolve_template(spec, smol), "messages")
    r = enc.render(enc.messages({"messages": MULTI}))
    assert r.text + "\n" == smol.apply_chat_template(MULTI, tokenize=False)
    ((ids, mask),) = encode([r], smol)
    _, stock_ids, stock_mask = _masked(smol, MULTI)
    np.testing.assert_array_equal(ids, stock_ids[:-1])
    np.testing.assert_array_equal(mask, stock_mask[:-1])


def test_llama3_stock_template(llama3):
    r, ids, mask = _masked(llama3, MULTI)
    assert r.text == llama3.apply_chat_template(MULTI, tokenize=False)
    assert view.mark_tokens(ids, mask, llama3) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n⟦Hello!<|eot_id|>⟧"
        "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n⟦4<|eot_id|>⟧"
    )
    # The template writes the BOS itself; nothing is prepended twice.
    assert ids[0] == llama3.bos_token_id and ids.tolist().count(llama3.bos_token_id) == 1


def test_llama3_trims_content_and_spans_follow(llama3):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  padded  \n"}]
    r, ids, mask = _masked(llama3, msgs)
    assert [r.text[s:e] for s, e in r.spans] == ["padded<|eot_id|>"]


def test_qwen25_stock_template(qwen):
    r, ids, mask = _masked(qwen, NO_SYSTEM)
    assert r.text == qwen.apply_chat_template(NO_SYSTEM, tokenize=False)
    assert view.mark_tokens(ids, mask, qwen) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
        "assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        "⟦Hello!<|im_end|>⟧\n"
    )
    _, ids, mask = _masked(qwen, MULTI)
    assert [qwen.decode([i]) for i in ids[mask]] == ["Hello", "!", "<|im_end|>", "4", "<|im_end|>"]


def test_generation_markers_are_used_when_present(smol):
    marked = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}"
        "{% endgeneration %}{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}"
        "{% endfor %}"
    )  # No add_generation_prompt branch: the markers alone say where responses are.
    t = JinjaTemplate(marked, "test template", {})
    assert t.markers
    r = t.render(_encoder(smol).messages({"messages": MULTI}))
    assert [r.text[s:e] for s, e in r.spans] == ["Hello!<|im_end|>", "4<|im_end|>"]
    # A turn the row says not to train: its generation block is left out.
    untrained = [*MULTI[:2], {**MULTI[2], "train": 0}, *MULTI[3:]]
    r = t.render(_encoder(smol).messages({"messages": untrained}))
    assert [r.text[s:e] for s, e in r.spans] == ["4<|im_end|>"]


def test_template_that_rewrites_history_is_split_or_refused(smol):
    # Like reasoning templates that drop earlier turns' thoughts: not prefix-stable.
    unstable = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
        "{{ '<|im_start|>assistant\n(earlier)<|im_end|>\n' }}{% else %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    t = JinjaTemplate(unstable, "the unstable template", {})
    msgs = _encoder(smol).messages({"messages": MULTI})
    with pytest.raises(RowError, match="not prefix-stable.*split_turns=auto.*generation") as e:
        t.render(msgs)  # As one example (data.split_turns=never).
    assert e.value.reason == "template_error"
    t.render(msgs[:3])  # A single turn is fine.
    first, second = t.render_examples(msgs)  # Split, each turn as the template renders a last one.
    assert view.mark_text(first.text, first.spans).endswith("assistant\n⟦Hello!<|im_end|>⟧\n")
    assert view.mark_text(second.text, second.spans) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n(earlier)<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n⟦4<|im_end|>⟧\n"
    )
    # A template whose generation prompt is not how it renders the turn: split cannot help.
    mismatched = unstable.replace(
        "'<|im_start|>assistant\n' }}{% endif %}", "'<|im_start|>model\n' }}{% endif %}"
    )
    with pytest.raises(RowError, match="split_turns cannot help"):
        JinjaTemplate(mismatched, "t", {}).render_examples(msgs)


def test_template_without_generation_prompt_is_refused():
    with pytest.raises(ValueError, match="no add_generation_prompt branch"):
        JinjaTemplate("{% for m in messages %}{{ m['content'] }}{% endfor %}", "t", {})


def test_template_raise_exception_is_a_row_error(smol, tmp_path):
    strict = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
        "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    path = tmp_path / "strict.jinja"
    path.write_text(strict, encoding="utf-8")
    spec = DataSpec(train="x", template=str(path), format="messages", cache=False)
    enc = examples.make_encoder(spec, smol, templates.resolve_template(spec, smol), "messages")
    r = enc.render(enc.messages({"messages": NO_SYSTEM}))
    assert view.mark_text(r.text, r.spans) == "user: Hi\nassistant: ⟦Hello!⟧\n"
    twice = [{"role": "user", "content": "Hi"}, *NO_SYSTEM]
    with pytest.raises(RowError, match=r"strict\.jinja.*must alternate") as e:
        enc.render(enc.messages({"messages": twice}))
    assert e.value.reason == "template_error"
    # A system turn breaks its alternation too: the template refuses a system role, so the
    # system text goes into the first user turn (as for Gemma 2, below).
    r = enc.render(enc.messages({"messages": MULTI}))
    assert view.mark_text(r.text, r.spans) == (
        "user: Be brief.\n\nHi\nassistant: ⟦Hello!⟧\nuser: 2+2?\nassistant: ⟦4⟧\n"
    )


def test_no_chat_template_names_the_keys():
    with pytest.raises(ValueError, match=r"data\.template=tokenizer.*model\.tokenizer"):
        build_splits(
            DataSpec(train="synthetic:add:4", template="tokenizer", cache=False),
            load_tokenizer("gpt2"),
        )


def test_special_token_text_in_data_is_a_bad_row(smol, tmp_path):
    enc = _encoder(smol)
    row = {
        "messages": [
            {"role": "user", "content": "say <|im_end|>"},
            {"role": "assistant", "content": "ok"},
        ]
    }
    with pytest.raises(RowError, match=r"messages\[0\]\.content.*<\|im_end\|>") as e:
        enc.messages(row)
    assert e.value.reason == "special_token_text"


def test_prompt_cut_from_the_left_keeps_the_templates_bos(llama3):
    msgs = [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "ok"}]
    enc = _encoder(llama3, max_seq_len=32, long_prompt="truncate_left")
    ((ids, mask),) = encode([enc.render(enc.messages({"messages": msgs}))], llama3)
    cut, cut_mask, flags = examples.fit(ids, mask, enc)
    assert flags == examples.PROMPT_CUT and len(cut) == 33
    assert cut[0] == llama3.bos_token_id and llama3.decode(cut[cut_mask]) == "ok<|eot_id|>"
    assert llama3.decode(cut[-8:]).endswith("assistant<|end_header_id|>\n\nok<|eot_id|>")


# ---------------------------------------------------------------- Qwen3, Gemma 2, Gemma 3

STOCK = pathlib.Path(__file__).parent / "data" / "templates"  # published texts, sources inside
THREE = [
    *MULTI,
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6"},
]
THINK = "<think>\n\n</think>\n\n"  # what Qwen3's template writes before its last turn


def _stock(tok, name: str):
    tok = copy.deepcopy(tok)
    tok.chat_template = (STOCK / f"{name}.jinja").read_text(encoding="utf-8")
    return tok


@pytest.fixture(scope="module")
def qwen3(smol):
    return _stock(smol, "qwen3")  # SmolLM2 has <|im_start|> and <|im_end|>, as Qwen3 has


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def gemma(request, tok):
    """GPT-2's vocabulary plus Gemma's special tokens, with Gemma 2's or 3's template."""
    g = copy.deepcopy(tok)
    specials = ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]
    g.add_special_tokens({"additional_special_tokens": specials})
    g.bos_token, g.eos_token = "<bos>", "<eos>"
    return _stock(g, request.param)


def test_qwen3_conversation_splits_into_one_example_per_assistant_turn(qwen3):
    enc = _encoder(qwen3)
    msgs = enc.messages({"messages": THREE})
    with pytest.raises(RowError, match="not prefix-stable.*data.split_turns"):
        enc.render(msgs)  # as one example: the last turn has a think block, earlier ones not
    got = enc.render_examples(msgs)
    answers = ["Hello!", "4", "6"]
    assert len(got) == 3
    for r, end, answer in zip(got, (3, 5, 7), answers, strict=True):
        # The template's own text of the conversation up to the turn; before the one trained
        # span, exactly the prompt the model gets for that turn at inference.
        assert r.text == qwen3.apply_chat_template(THREE[:end], tokenize=False)
        ((start, stop),) = r.spans
        prompt = qwen3.apply_chat_template(
            THREE[: end - 1], tokenize=False, add_generation_prompt=True
        )
        assert r.text[:start] == prompt
        assert r.text[start:stop] == THINK + answer + "<|im_end|>"
    ids_masks = encode(got, qwen3)
    # Each turn trained once, in its own example: its think block, its answer, its end.
    trained = [qwen3.decode(ids[mask]) for ids, mask in ids_masks]
    assert trained == [THINK + a + "<|im_end|>" for a in answers]
    ids, mask = ids_masks[-1]
    assert view.mark_tokens(ids, mask, qwen3) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n"
        "<|im_start|>assistant\n⟦<think>\n\n</think>\n\n6<|im_end|>⟧\n"
    )


def test_qwen3_single_turn_is_one_example(qwen3):
    enc = _encoder(qwen3)
    (r,) = enc.render_examples(enc.messages({"messages": MULTI[:3]}))
    assert r.text == qwen3.apply_chat_template(MULTI[:3], tokenize=False)
    assert [r.text[s:e] for s, e in r.spans] == [THINK + "Hello!<|im_end|>"]


def test_split_turns_options_and_row_flags(qwen3):
    row = {"messages": THREE}
    chunk = examples.encode_chunk([row, {"messages": MULTI[:3]}], _encoder(qwen3))
    assert chunk.status.tolist() == [0, 0]
    assert chunk.examples_per_row.tolist() == [3, 1]
    assert chunk.example_rows().tolist() == [0, 0, 0, 1]
    assert chunk.flags.tolist() == [examples.SPLIT_TURNS, 0]
    # never: today's error, naming the option; last: only the last turn's example.
    never = examples.encode_chunk([row], _encoder(qwen3, split_turns="never"))
    assert never.status.tolist() == [CODES["template_error"]]
    assert "data.split_turns" in never.problems[0]
    (last,) = _encoder(qwen3, assistant_turns="last").render_examples(_encoder(qwen3).messages(row))
    assert last.text == qwen3.apply_chat_template(THREE, tokenize=False)
    assert [last.text[s:e] for s, e in last.spans] == [THINK + "6<|im_end|>"]
    # train_on=all: the template's text of the whole conversation, once, every token trained
    # (split, the earlier turns would train again in each later example).
    every = examples.encode_chunk([row], _encoder(qwen3, train_on="all"))
    assert every.examples_per_row.tolist() == [1] and every.trainable.all()
    want = qwen3.apply_chat_template(THREE, return_dict=False)
    assert every.ids.tolist() == want


def test_split_turns_always_on_a_builtin_template(tok):
    spec = DataSpec(
        train="x", template="chatml", format="messages", cache=False, split_turns="always"
    )
    enc = examples.make_encoder(spec, tok, templates.resolve_template(spec, tok), "messages")
    msgs = enc.messages({"messages": MULTI})
    whole = enc.render(msgs)
    got = enc.render_examples(msgs)
    # Each example is a prefix of the whole conversation's text, with one turn trained:
    # together they train what the whole conversation trains, once each.
    assert [r.spans for r in got] == [(s,) for s in whole.spans]
    assert all(whole.text.startswith(r.text) for r in got)


def test_qwen3_generation_prompt_is_the_templates(qwen3):
    spec = DataSpec(train="x", template="tokenizer", format="messages", cache=False)
    ids = examples.prompt_ids({"messages": THREE[:-1]}, spec, qwen3)
    want = qwen3.apply_chat_template(THREE[:-1], add_generation_prompt=True, return_dict=False)
    assert ids == want


def test_build_counts_split_rows(qwen3, tmp_path):
    long = [
        *MULTI,
        {"role": "user", "content": "word " * 40},
        {"role": "assistant", "content": "ok"},
    ]
    path = tmp_path / "chat.jsonl"
    rows = [{"messages": THREE}, {"messages": MULTI[:3]}, {"messages": long}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    # The third row's last prompt alone is over max_seq_len: that turn is dropped, its
    # first two stay (the third row is kept, counted as missing turns).
    spec = DataSpec(
        train=str(path),
        validation="",
        template="tokenizer",
        format="messages",
        cache=False,
        max_seq_len=80,
    )
    stats = build_splits(spec, qwen3).stats["train"]
    assert stats["rows_read"] == 3 and stats["dropped"] == {}
    assert stats["examples"] == 3 + 1 + 2
    assert (stats["split_rows"], stats["split_examples"]) == (2, 5)
    assert stats["split_rows_missing_turns"] == 1


def test_gemma_system_turn(gemma):
    # Gemma 2's template refuses a system message; its text goes into the first user turn as
    # Gemma 3's template puts it there itself: the same text and masks from both.
    enc = _encoder(gemma)
    assert enc.template.folds_system == ("System role not supported" in gemma.chat_template)
    if enc.template.folds_system:
        with pytest.raises(Exception, match="System role not supported"):
            gemma.apply_chat_template(MULTI, tokenize=False)
    else:
        assert enc.render(enc.messages({"messages": MULTI})).text == (
            gemma.apply_chat_template(MULTI, tokenize=False)
        )
    r, ids, mask = _masked(gemma, MULTI)
    golden = (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
        "⟦Hello!<end_of_turn>⟧\n<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n"
        "⟦4<end_of_turn>⟧\n"
    )
    assert view.mark_text(r.text, r.spans) == golden
    assert view.mark_tokens(ids, mask, gemma) == golden
    # Without a system turn, the template's own text.
    r, _, _ = _masked(gemma, MULTI[1:])
    assert r.text == gemma.apply_chat_template(MULTI[1:], tokenize=False)


# ---------------------------------------------------------------- tools and reasoning

ADD = {"type": "function", "function": {"name": "add", "parameters": {}}}
TOOL_ROW = {
    "tools": [ADD],
    "messages": [
        {"role": "user", "content": "2+2?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'}}
            ],
        },
        {"role": "tool", "name": "add", "content": "4"},
        {"role": "assistant", "content": "It is 4."},
    ],
}
# The tools block of Qwen3's system turn (Qwen 2.5's doubles the braces of its example).
TOOLS_SYSTEM = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are "
    "provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "add", "parameters": {}}}\n</tools>\n\nFor each '
    "function call, return a json object with function name and arguments within <tool_call>"
    "</tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
)
QWEN_SYSTEM = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
)
TOOL_TURNS = (
    "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    '⟦<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 2}}\n</tool_call><|im_end|>⟧\n'
    "<|im_start|>user\n<tool_response>\n4\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    "⟦It is 4.<|im_end|>⟧"
)
# (template, examples: the text with trained characters in ⟦⟧). Qwen3 rewrites the call turn
# once a later turn follows (no think block), so its conversation is split per turn.
TOOL_GOLDEN = [
    (
        "qwen2.5",
        [
            QWEN_SYSTEM
            + "\n\n"
            + TOOLS_SYSTEM.replace('{"name": <', '{{"name": <').replace("-object>}", "-object>}}")
            + TOOL_TURNS
            + "\n"
        ],
    ),
    (
        "qwen3",
        [
            "<|im_start|>system\n" + TOOLS_SYSTEM + "<|im_start|>user\n2+2?<|im_end|>\n"
            "<|im_start|>assistant\n⟦<think>\n\n</think>\n\n<tool_call>\n"
            '{"name": "add", "arguments": {"a": 2, "b": 2}}\n</tool_call><|im_end|>⟧\n',
            "<|im_start|>system\n" + TOOLS_SYSTEM + "<|im_start|>user\n2+2?<|im_end|>\n"
            '<|im_start|>assistant\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 2}}\n'
            "</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n4\n</tool_response>"
            "<|im_end|>\n<|im_start|>assistant\n⟦<think>\n\n</think>\n\nIt is 4.<|im_end|>⟧\n",
        ],
    ),
    ("chatml", ["<|im_start|>system\n" + TOOLS_SYSTEM + TOOL_TURNS]),
]


def _tok_for(name, smol):
    if name == "chatml":
        return smol, "chatml"
    tok = copy.deepcopy(smol)
    tok.chat_template = (STOCK / f"{name}.jinja").read_text(encoding="utf-8")
    return tok, "tokenizer"


def _examples(tok, template, row, **kw):
    spec = DataSpec(train="x", template=template, format="messages", cache=False, **kw)
    enc = examples.make_encoder(spec, tok, templates.resolve_template(spec, tok), "messages")
    msgs, tools = enc.conversation(row)
    return enc, msgs, tools, enc.render_examples(msgs, tools)


@pytest.mark.parametrize("name,golden", TOOL_GOLDEN)
def test_tool_calling_golden(smol, name, golden):
    tok, template = _tok_for(name, smol)
    enc, msgs, tools, got = _examples(tok, template, TOOL_ROW)
    assert [view.mark_text(r.text, r.spans) for r in got] == golden
    # Tokens: exactly the marked characters train (<|im_end|> is one token), and no tool
    # result, user turn or tools block.
    for r, (ids, mask) in zip(got, encode(got, tok), strict=True):
        assert tok.decode(ids[mask]) == "".join(r.text[s:e] for s, e in r.spans)
    assert enc.unrendered(msgs, tools, got) == 0
    if template == "tokenizer":  # The stock template's own text, tools= included.
        dicts = [m.as_dict() for m in msgs]
        for r, end in zip(got, [4] if len(got) == 1 else [2, 4], strict=True):
            assert r.text == tok.apply_chat_template(dicts[:end], tools=[ADD], tokenize=False)


def test_chatml_tool_calls_with_system_content_and_two_results(smol):
    """The Hermes/Qwen details: the system text before the tools block, a call after the
    content on its own line, two results in one user turn."""
    row = {
        "tools": [ADD],
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Sums?"},
            {
                "role": "assistant",
                "content": "Calling.",
                "tool_calls": [
                    {"name": "add", "arguments": {"a": 1}},
                    {"name": "add", "arguments": {"a": 2}},
                ],
            },
            {"role": "tool", "content": "1"},
            {"role": "tool", "content": "2"},
            {"role": "assistant", "content": "1 and 2."},
        ],
    }
    _, _, _, (r,) = _examples(smol, "chatml", row)
    assert view.mark_text(r.text, r.spans) == (
        "<|im_start|>system\nBe brief.\n\n" + TOOLS_SYSTEM + "<|im_start|>user\nSums?<|im_end|>\n"
        '<|im_start|>assistant\n⟦Calling.\n<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n'
        '</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 2}}\n</tool_call>'
        "<|im_end|>⟧\n<|im_start|>user\n<tool_response>\n1\n</tool_response>\n<tool_response>\n2"
        "\n</tool_response><|im_end|>\n<|im_start|>assistant\n⟦1 and 2.<|im_end|>⟧"
    )
    # Qwen 2.5's stock template writes the same, but for the braces of its example.
    qwen25, _ = _tok_for("qwen2.5", smol)
    dicts = [m.as_dict() for m in formats.to_messages(row, "messages")]
    stock = qwen25.apply_chat_template(dicts, tools=[ADD], tokenize=False)
    example = '{"name": <function-name>, "arguments": <args-json-object>}'
    assert stock.replace("{" + example + "}", example) == r.text + "\n"


@pytest.mark.parametrize("template", ["alpaca", "human_assistant"])
def test_templates_without_tools_refuse_tool_rows(tok, template):
    spec = DataSpec(train="x", template=template, format="messages", cache=False)
    enc = examples.make_encoder(spec, tok, templates.resolve_template(spec, tok), "messages")
    tools_only = {"tools": [ADD], "messages": MULTI}
    chunk = examples.encode_chunk([tools_only, {**TOOL_ROW, "tools": None}], enc)
    assert chunk.status.tolist() == [CODES["template_error"]] * 2
    assert (
        f"data.template={template} cannot express tools: use data.template=chatml"
        in (chunk.problems[0])
    )
    assert "a tool call or result (messages[1].content)" in chunk.problems[1]


REASONING = {
    "messages": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "reasoning_content": "Two and two.", "content": "4"},
    ]
}
THOUGHT = "<think>\nTwo and two.\n</think>\n\n"
# (template, train_reasoning, the text with trained characters in ⟦⟧)
REASONING_GOLDEN = [
    (
        "qwen3",
        True,
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n⟦" + THOUGHT + "4<|im_end|>⟧\n",
    ),
    (
        "qwen3",
        False,
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n" + THOUGHT + "⟦4<|im_end|>⟧\n",
    ),
    (
        "chatml",
        True,
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n⟦" + THOUGHT + "4<|im_end|>⟧",
    ),
    (
        "chatml",
        False,
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n" + THOUGHT + "⟦4<|im_end|>⟧",
    ),
    # Qwen 2.5 has no place for reasoning: left out, and flagged (a counted warning).
    (
        "qwen2.5",
        True,
        QWEN_SYSTEM + "<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n⟦4<|im_end|>⟧\n",
    ),
]


@pytest.mark.parametrize("name,train_reasoning,golden", REASONING_GOLDEN)
def test_reasoning_golden(smol, name, train_reasoning, golden):
    tok, template = _tok_for(name, smol)
    enc, msgs, tools, (r,) = _examples(tok, template, REASONING, train_reasoning=train_reasoning)
    assert view.mark_text(r.text, r.spans) == golden
    ((ids, mask, reasoning),) = examples.encode_marked([r], tok)
    assert tok.decode(ids[mask]) == "".join(r.text[s:e] for s, e in r.spans)
    dropped = name == "qwen2.5"
    assert enc.unrendered(msgs, tools, [r]) == examples.REASONING_UNRENDERED * dropped
    assert tok.decode(ids[reasoning]) == ("" if dropped else THOUGHT)
    if template == "tokenizer":
        assert r.text == tok.apply_chat_template([m.as_dict() for m in msgs], tokenize=False)


def test_think_in_content_and_multi_turn_reasoning_split_under_qwen3(qwen3):
    """<think> written in the content reaches Qwen3's template as reasoning; earlier turns'
    reasoning is dropped by the template, so the conversation splits, each example the
    inference prompt of its turn then that turn, its thoughts in it."""
    row = {
        "messages": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>\nTwo and two.\n</think>\n\n4"},
            {"role": "user", "content": "3+3?"},
            {"role": "assistant", "reasoning_content": "Three and three.", "content": "6"},
        ]
    }
    enc, msgs, _, got = _examples(qwen3, "tokenizer", row, train_reasoning=False)
    dicts = [m.as_dict() for m in msgs]
    assert len(got) == 2
    for r, end, thought, answer in zip(
        got, (2, 4), ("Two and two.", "Three and three."), ("4", "6"), strict=True
    ):
        prompt = qwen3.apply_chat_template(
            dicts[: end - 1], add_generation_prompt=True, tokenize=False
        )
        assert r.text == qwen3.apply_chat_template(dicts[:end], tokenize=False)
        assert r.text.startswith(prompt + f"<think>\n{thought}\n</think>\n\n")
        assert [r.text[s:e] for s, e in r.spans] == [answer + "<|im_end|>"]  # thoughts masked
    chunk = examples.encode_chunk([row], enc)
    assert qwen3.decode(chunk.ids[chunk.trainable]) == "4<|im_end|>6<|im_end|>"
    marked = examples.encode_marked(got, qwen3)
    assert [qwen3.decode(ids[r]) for ids, _, r in marked] == [
        "<think>\nTwo and two.\n</think>\n\n",
        "<think>\nThree and three.\n</think>\n\n",
    ]
    assert chunk.reasoning_tokens.tolist() == [sum(int(r.sum()) for _, _, r in marked)]


def test_llama_factory_tool_file_trains_the_calls_and_answers_under_qwen3(qwen3, tmp_path):
    """End to end, from a file in LLaMA-Factory's ShareGPT tool shape to the batch: what
    trains is each assistant turn (its call or its answer, with Qwen3's think block and
    <|im_end|>), never the system, tools block, user turn or tool result."""
    row = {
        "system": "Be brief.",
        "tools": json.dumps([ADD["function"]]),
        "conversations": [
            {"from": "human", "value": "2+2?"},
            {"from": "function_call", "value": '{"name": "add", "arguments": {"a": 2, "b": 2}}'},
            {"from": "observation", "value": "4"},
            {"from": "gpt", "value": "It is 4."},
        ],
    }
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    spec = DataSpec(train=str(path), validation="", template="tokenizer", cache=False)
    splits = build_splits(spec, qwen3)
    dense = splits.train.dense()
    rows = [{k: v[i] for k, v in dense.items()} for i in range(len(dense["tokens"]))]
    trained = sorted(qwen3.decode(ids[mask]) for r in rows for ids, mask in view.segments(r))
    assert trained == [
        '<think>\n\n</think>\n\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 2}}\n'
        "</tool_call><|im_end|>",
        "<think>\n\n</think>\n\nIt is 4.<|im_end|>",
    ]
    assert splits.stats["train"]["split_rows"] == 1
