"""Generation prompts are the exact tokens training put before each response."""

import json

import pytest

from sft_jax.data import DataSpec, build_splits, load_tokenizer, view
from sft_jax.data.prompts import prompt_ids


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("gpt2")


@pytest.mark.parametrize("template", ["alpaca", "human_assistant", "chatml"])
def test_prompt_is_the_untrained_prefix_of_training(tok, template, tmp_path):
    row = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
    spec = DataSpec(train="synthetic:add:1", template=template, cache=False)
    got = prompt_ids({"instruction": "Name a colour."}, spec, tok)
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row) + "\n")
    splits = build_splits(DataSpec(train=str(path), template=template, cache=False), tok)
    ((ids, trained),) = view.segments({k: v[0] for k, v in splits.train.dense().items()})
    assert got == ids[: int(trained.argmax())].tolist()


def test_human_assistant_prompt_ends_before_the_space(tok):
    spec = DataSpec(train="x", template="human_assistant", format="prompt_completion")
    ids = prompt_ids({"prompt": "Hi"}, spec, tok)
    assert tok.decode(ids) == "Human: Hi\n\nAssistant:"  # " Hello" is the response's token.


def test_conversations_and_strings(tok):
    spec = DataSpec(train="x", template="chatml")
    history = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                            {"role": "user", "content": "c"}]}  # fmt: skip
    want = "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n" \
           "<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n"  # fmt: skip
    assert tok.decode(prompt_ids(history, spec, tok)) == want
    # A final assistant turn is replaced: its response is what gets generated.
    redo = {"messages": history["messages"] + [{"role": "assistant", "content": "old"}]}
    assert prompt_ids(redo, spec, tok) == prompt_ids(history, spec, tok)
    assert tok.decode(prompt_ids("c", spec, tok)) == (
        "<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n"
    )
