"""Row shapes -> conversations: each format, field renames, detection, and the row errors."""

import pytest

from sft_jax.data.formats import Message, detect, to_messages
from sft_jax.data.spec import Fields, RowError


def _roles(msgs):
    return [(m.role, m.content) for m in msgs]


def test_alpaca():
    msgs = to_messages({"instruction": "Add.", "input": "2 3", "output": "5", "id": 7}, "alpaca")
    assert msgs == [
        Message("user", "Add.", input="2 3", field="instruction"),
        Message("assistant", "5", field="output"),
    ]
    assert msgs[0].text() == "Add.\n\n2 3"
    # input missing, null or blank: no input; an optional system field becomes a system turn.
    for row in ({"instruction": "a", "output": "b"}, {"instruction": "a", "input": None,
                "output": "b"}, {"instruction": "a", "input": "  ", "output": "b"}):  # fmt: skip
        assert to_messages(row, "alpaca")[0].input == ""
    msgs = to_messages({"system": "Be kind.", "instruction": "a", "output": "b"}, "alpaca")
    assert _roles(msgs) == [("system", "Be kind."), ("user", "a"), ("assistant", "b")]


def test_prompt_completion_strings_and_conversational():
    assert _roles(to_messages({"prompt": "Q", "completion": "A"}, "prompt_completion")) == [
        ("user", "Q"), ("assistant", "A"),
    ]  # fmt: skip
    row = {
        "prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
        "completion": [{"role": "assistant", "content": "A"}],
    }
    assert _roles(to_messages(row, "prompt_completion")) == [
        ("system", "S"), ("user", "Q"), ("assistant", "A"),
    ]  # fmt: skip


def test_messages_multi_turn():
    row = {"messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]}  # fmt: skip
    msgs = to_messages(row, "messages")
    assert _roles(msgs) == [("system", "S"), ("user", "a"), ("assistant", "b"),
                            ("user", "c"), ("assistant", "d")]  # fmt: skip
    assert msgs[4].field == "messages[4].content"
    # An empty system message is dropped, not an error.
    row["messages"][0]["content"] = ""
    assert to_messages(row, "messages")[0].role == "user"


def test_sharegpt():
    row = {"conversations": [
        {"from": "system", "value": "S"}, {"from": "human", "value": "a"},
        {"from": "gpt", "value": "b"},
    ]}  # fmt: skip
    assert _roles(to_messages(row, "sharegpt")) == [("system", "S"), ("user", "a"),
                                                    ("assistant", "b")]  # fmt: skip


def test_field_renames_and_role_aliases():
    fields = Fields.parse("instruction=question, output=answer")
    msgs = to_messages({"question": "q", "answer": "a"}, "alpaca", fields)
    assert _roles(msgs) == [("user", "q"), ("assistant", "a")]
    assert msgs[1].field == "answer"
    fields = Fields.parse("messages=dialog,role=speaker,content=text,role.assistant=bot|model")
    turns = [("user", "hi"), ("bot", "yo"), ("user", "?"), ("model", "!")]
    row = {"dialog": [{"speaker": s, "text": t} for s, t in turns]}
    assert [m.role for m in to_messages(row, "messages", fields)] == [
        "user", "assistant", "user", "assistant",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "row,fmt",
    [
        ({"messages": []}, "messages"),
        ({"conversations": []}, "sharegpt"),
        ({"instruction": "", "input": "", "output": ""}, "alpaca"),
        ({"prompt": "", "completion": ""}, "prompt_completion"),
    ],
)
def test_detect(row, fmt):
    assert detect(row, Fields()) == fmt


def test_detect_with_renamed_fields_and_failure():
    assert detect({"q": 1, "a": 2}, Fields.parse("instruction=q,output=a")) == "alpaca"
    with pytest.raises(
        ValueError, match=r"data\.format=auto.*\['answer', 'question'\].*data\.fields"
    ):
        detect({"question": "q", "answer": "a"}, Fields())


# (row, format, reason, field named, fragment of the problem)
BAD = [
    ({"instruction": "a"}, "alpaca", "missing_field", "output", "is missing"),
    ({"instrucion": "a", "output": "b"}, "alpaca", "missing_field", "instruction",
     "the row has 'instrucion'; if that is it, set data.fields=instruction=instrucion"),
    ({"instruction": "a", "output": 5}, "alpaca", "not_a_string", "output", "got int 5"),
    ({"instruction": ["a"], "output": "b"}, "alpaca", "not_a_string", "instruction", "list"),
    ({"instruction": "a", "input": 3, "output": "b"}, "alpaca", "not_a_string", "input", "int"),
    ({"instruction": "  ", "output": "b"}, "alpaca", "empty_field", "instruction", "is empty"),
    ({"instruction": "a", "output": ""}, "alpaca", "empty_field", "output", "is empty"),
    ({"prompt": "a", "completion": None}, "prompt_completion", "missing_field", "completion", ""),
    ({"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "user",
      "content": "b"}]}, "prompt_completion", "bad_messages", "completion", "assistant"),
    ({"messages": "hi"}, "messages", "bad_messages", "messages", "must be a list"),
    ({"messages": []}, "messages", "bad_messages", "messages", "empty list"),
    ({"messages": ["hi"]}, "messages", "bad_messages", "messages[0]", "must be an object"),
    ({"messages": [{"role": "human", "content": "a"}]}, "messages", "unknown_role",
     "messages[0].role", "'human'; known: assistant, system, tool, user"),
    ({"messages": [{"content": "a"}]}, "messages", "missing_field", "messages[0].role",
     "is missing"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages",
     "not_a_string", "messages[0].content[0]", "without a string 'text'"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages",
     "not_a_string", "messages[0].content", "a list of text parts, got int"),
    ({"messages": [{"role": "user", "content": "a"}]}, "messages", "no_assistant_turn",
     "messages", "no assistant turn"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]},
     "messages", "empty_field", "messages[1].content", "is empty"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "b"}]}, "messages", "bad_messages",
     "messages[1]", "only the first"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]},
     "sharegpt", "unknown_role", "conversations[1].from",
     "'bot'; known: function_call, gpt, human, observation, system, tool"),
    ({"conversation": []}, "sharegpt", "missing_field", "conversations", "'conversation'"),
    (["not", "a", "dict"], "alpaca", "not_an_object", "", "is a list"),
]  # fmt: skip


@pytest.mark.parametrize("row,fmt,reason,field,fragment", BAD)
def test_row_errors_name_reason_and_field(row, fmt, reason, field, fragment):
    with pytest.raises(RowError) as e:
        to_messages(row, fmt)
    assert e.value.reason == reason
    assert e.value.field == field
    assert fragment in str(e.value)
