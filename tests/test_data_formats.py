"""Row shapes -> conversations: each format, field renames, detection, and the row errors;
tool calls (OpenAI and LLaMA-Factory shapes), reasoning, content parts, the fields files
carry (system, tools, history, per-message train flags) and their errors."""

import json

import pytest

from sft_jax.data.formats import Message, detect, to_messages, tools
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
    for row in (
        {"instruction": "a", "output": "b"},
        {"instruction": "a", "input": None, "output": "b"},
        {"instruction": "a", "input": "  ", "output": "b"},
    ):
        assert to_messages(row, "alpaca")[0].input == ""
    msgs = to_messages({"system": "Be kind.", "instruction": "a", "output": "b"}, "alpaca")
    assert _roles(msgs) == [("system", "Be kind."), ("user", "a"), ("assistant", "b")]


def test_prompt_completion_strings_and_conversational():
    assert _roles(to_messages({"prompt": "Q", "completion": "A"}, "prompt_completion")) == [
        ("user", "Q"),
        ("assistant", "A"),
    ]
    row = {
        "prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
        "completion": [{"role": "assistant", "content": "A"}],
    }
    assert _roles(to_messages(row, "prompt_completion")) == [
        ("system", "S"),
        ("user", "Q"),
        ("assistant", "A"),
    ]


def test_messages_multi_turn():
    row = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"},
        ]
    }
    msgs = to_messages(row, "messages")
    assert _roles(msgs) == [
        ("system", "S"),
        ("user", "a"),
        ("assistant", "b"),
        ("user", "c"),
        ("assistant", "d"),
    ]
    assert msgs[4].field == "messages[4].content"
    # An empty system message is dropped, not an error.
    row["messages"][0]["content"] = ""
    assert to_messages(row, "messages")[0].role == "user"


def test_sharegpt():
    row = {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "a"},
            {"from": "gpt", "value": "b"},
        ]
    }
    assert _roles(to_messages(row, "sharegpt")) == [
        ("system", "S"),
        ("user", "a"),
        ("assistant", "b"),
    ]


def test_field_renames_and_role_aliases():
    fields = Fields.parse("instruction=question, output=answer")
    msgs = to_messages({"question": "q", "answer": "a"}, "alpaca", fields)
    assert _roles(msgs) == [("user", "q"), ("assistant", "a")]
    assert msgs[1].field == "answer"
    fields = Fields.parse("messages=dialog,role=speaker,content=text,role.assistant=bot|model")
    turns = [("user", "hi"), ("bot", "yo"), ("user", "?"), ("model", "!")]
    row = {"dialog": [{"speaker": s, "text": t} for s, t in turns]}
    assert [m.role for m in to_messages(row, "messages", fields)] == [
        "user",
        "assistant",
        "user",
        "assistant",
    ]


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
    (
        {"instrucion": "a", "output": "b"},
        "alpaca",
        "missing_field",
        "instruction",
        "the row has 'instrucion'; if that is it, set data.fields=instruction=instrucion",
    ),
    ({"instruction": "a", "output": 5}, "alpaca", "not_a_string", "output", "got int 5"),
    ({"instruction": ["a"], "output": "b"}, "alpaca", "not_a_string", "instruction", "list"),
    ({"instruction": "a", "input": 3, "output": "b"}, "alpaca", "not_a_string", "input", "int"),
    ({"instruction": "  ", "output": "b"}, "alpaca", "empty_field", "instruction", "is empty"),
    ({"instruction": "a", "output": ""}, "alpaca", "empty_field", "output", "is empty"),
    ({"prompt": "a", "completion": None}, "prompt_completion", "missing_field", "completion", ""),
    (
        {
            "prompt": [{"role": "user", "content": "a"}],
            "completion": [{"role": "user", "content": "b"}],
        },
        "prompt_completion",
        "bad_messages",
        "completion",
        "assistant",
    ),
    ({"messages": "hi"}, "messages", "bad_messages", "messages", "must be a list"),
    ({"messages": []}, "messages", "bad_messages", "messages", "empty list"),
    ({"messages": ["hi"]}, "messages", "bad_messages", "messages[0]", "must be an object"),
    (
        {"messages": [{"role": "human", "content": "a"}]},
        "messages",
        "unknown_role",
        "messages[0].role",
        "'human'; known: assistant, system, tool, user",
    ),
    (
        {"messages": [{"content": "a"}]},
        "messages",
        "missing_field",
        "messages[0].role",
        "is missing",
    ),
    (
        {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
        "messages",
        "not_a_string",
        "messages[0].content[0]",
        "without a string 'text'",
    ),
    (
        {"messages": [{"role": "user", "content": 5}]},
        "messages",
        "not_a_string",
        "messages[0].content",
        "a list of text parts, got int",
    ),
    (
        {"messages": [{"role": "user", "content": "a"}]},
        "messages",
        "no_assistant_turn",
        "messages",
        "no assistant turn",
    ),
    (
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]},
        "messages",
        "empty_field",
        "messages[1].content",
        "is empty",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "system", "content": "s"},
                {"role": "assistant", "content": "b"},
            ]
        },
        "messages",
        "bad_messages",
        "messages[1]",
        "only the first",
    ),
    (
        {"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]},
        "sharegpt",
        "unknown_role",
        "conversations[1].from",
        "'bot'; known: function_call, gpt, human, observation, system, tool",
    ),
    ({"conversation": []}, "sharegpt", "missing_field", "conversations", "'conversation'"),
    (["not", "a", "dict"], "alpaca", "not_an_object", "", "is a list"),
]


@pytest.mark.parametrize("row,fmt,reason,field,fragment", BAD)
def test_row_errors_name_reason_and_field(row, fmt, reason, field, fragment):
    with pytest.raises(RowError) as e:
        to_messages(row, fmt)
    assert e.value.reason == reason
    assert e.value.field == field
    assert fragment in str(e.value)


# ---------------------------------------------------------------- tools, reasoning, parts, fields

WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {}}}
CALL = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}


def test_openai_tool_calls_and_tool_results():
    row = {
        "tools": json.dumps([WEATHER]),  # A JSON string, as many files hold it.
        "messages": [
            {"role": "user", "content": "Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                    },
                ],
            },
            {"role": "tool", "name": "weather", "tool_call_id": "c1", "content": {"temp": 18}},
            {"role": "assistant", "content": "18 C."},
        ],
    }
    msgs = to_messages(row, "messages")
    assert tools(row) == (WEATHER,)
    assert msgs[1] == Message(
        "assistant", "", field="messages[1].content", tool_calls=({"id": "c1", **CALL},)
    )
    assert msgs[2].as_dict() == {
        "role": "tool",
        "content": '{"temp": 18}',
        "name": "weather",
        "tool_call_id": "c1",
    }
    assert to_messages(row, "messages")[3].as_dict() == {"role": "assistant", "content": "18 C."}


def test_sharegpt_function_call_observation_system_and_tools():
    """LLaMA-Factory's ShareGPT tool shape: the call as a JSON string, the result as an
    observation, a system and a tools field beside the conversation."""
    row = {
        "system": "Be brief.",
        "tools": json.dumps([WEATHER["function"]]),  # Bare {name, parameters}: as given.
        "conversations": [
            {"from": "human", "value": "Paris?"},
            {
                "from": "function_call",
                "value": '{"name": "weather", "arguments": {"city": "Paris"}}',
            },
            {"from": "observation", "value": "18 C"},
            {"from": "gpt", "value": "18 C."},
        ],
    }
    msgs = to_messages(row, "sharegpt")
    assert [m.role for m in msgs] == ["system", "user", "assistant", "tool", "assistant"]
    assert msgs[0].content == "Be brief." and msgs[2].tool_calls == (CALL,)
    assert tools(row) == (WEATHER["function"],)
    # Observations as user turns instead: a role alias.
    fields = Fields.parse("role.user=observation")
    assert to_messages(row, "sharegpt", fields)[3].role == "user"


def test_content_parts_reasoning_and_train_flags():
    row = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "Add "}, {"type": "text", "value": "2+2"}],
            },
            {"role": "assistant", "content": "4", "reasoning_content": "2+2=4", "train": False},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "6", "weight": 1},
            {"role": "user", "content": "And 4+4?"},
            {"role": "assistant", "content": "8", "loss_weight": 0.0},
        ]
    }
    msgs = to_messages(row, "messages")
    assert msgs[0].content == "Add 2+2"
    assert msgs[1].reasoning == "2+2=4" and msgs[1].as_dict()["reasoning_content"] == "2+2=4"
    assert [m.train for m in msgs[1::2]] == [False, True, False]


def test_alpaca_history_is_untrained_context():
    row = {"instruction": "And 3+3?", "output": "6", "history": [["2+2?", "4"], ["1+1?", "2"]]}
    msgs = to_messages(row, "alpaca")
    assert _roles(msgs) == [
        ("user", "2+2?"),
        ("assistant", "4"),
        ("user", "1+1?"),
        ("assistant", "2"),
        ("user", "And 3+3?"),
        ("assistant", "6"),
    ]
    assert [m.train for m in msgs] == [False] * 4 + [True, True]
    assert msgs[1].field == "history[0][1]"


# (row, format, reason, field named, fragment of the problem)
BAD_NEW = [
    (
        {"messages": [{"role": "user", "content": [{"type": "image", "url": "x.png"}]}]},
        "messages",
        "non_text_content",
        "messages[0].content[0]",
        "is a 'image' part",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "a"},
                {
                    "role": "assistant",
                    "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}],
                },
            ]
        },
        "messages",
        "bad_tools",
        "messages[1].tool_calls[0].arguments",
        "not valid JSON",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]},
            ]
        },
        "messages",
        "bad_tools",
        "messages[1].tool_calls[0]",
        "not a tool call",
    ),
    (
        {
            "conversations": [
                {"from": "human", "value": "a"},
                {"from": "function_call", "value": "[1, 2]"},
            ]
        },
        "sharegpt",
        "bad_tools",
        "conversations[1].value[0]",
        "not a tool call",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b", "train": 0.5},
            ]
        },
        "messages",
        "bad_messages",
        "messages[1].train",
        "trained (1, true) or not (0, false)",
    ),
    (
        {
            "system": "s",
            "conversations": [{"from": "system", "value": "t"}, {"from": "gpt", "value": "b"}],
        },
        "sharegpt",
        "bad_messages",
        "system",
        "has a system message too",
    ),
    (
        {"instruction": "a", "output": "b", "history": [["q"]]},
        "alpaca",
        "bad_messages",
        "history[0]",
        "pair of strings",
    ),
]


@pytest.mark.parametrize("row,fmt,reason,field,fragment", BAD_NEW)
def test_new_field_errors_name_reason_and_field(row, fmt, reason, field, fragment):
    test_row_errors_name_reason_and_field(row, fmt, reason, field, fragment)


def test_bad_tools_field():
    with pytest.raises(RowError, match="not a list of function definitions") as e:
        tools({"tools": '{"description": "no name"}'})
    assert (e.value.reason, e.value.field) == ("bad_tools", "tools")
