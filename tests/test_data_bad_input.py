"""Bad input end to end: each case stops the build with a message naming the source, file,
line and field and saying what to do, or with data.on_bad_row=skip is counted by reason.
Never a bare traceback from inside a library, never a silently empty mask."""

import json
import re

import pytest

from sft_jax.data import DataSpec, build_splits, load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("gpt2")


GOOD = {"instruction": "Say hi.", "input": "", "output": "Hi."}
CHAT = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}


def _file(tmp_path, name, lines):
    """A file of 20 good rows with `lines` (bytes) as lines 3, 4, ...; returns its path."""
    good = [json.dumps(GOOD).encode()] * 20
    (tmp_path / name).write_bytes(b"\n".join(good[:2] + list(lines) + good[2:]) + b"\n")
    return str(tmp_path / name)


def _build(path, **kw):
    spec = DataSpec(train=path, cache=False, num_workers=0, max_seq_len=64, **kw)
    return build_splits(spec, load_tokenizer("gpt2"))


# (line written at line 3, reason, fragments the error message must hold)
CASES = [
    (b'{"instruction": "x", "output": ', "malformed_json", ["not valid JSON", "fix the JSON"]),
    (b'{"instruction": "x"}', "missing_field", ["field 'output' is missing"]),
    (b'{"instruction": null, "output": "y"}', "missing_field", ["field 'instruction' is null"]),
    (
        b'{"instrucion": "x", "output": "y"}',
        "missing_field",
        ["field 'instruction' is missing", "data.fields=instruction=instrucion"],
    ),
    (
        b'{"instruction": "x", "output": 42}',
        "not_a_string",
        ["field 'output' must be a string, got int 42"],
    ),
    (b'{"instruction": "", "output": "y"}', "empty_field", ["field 'instruction' is empty"]),
    (b'{"instruction": "x", "output": "  "}', "empty_field", ["field 'output' is empty"]),
    (
        b'{"instruction": "caf\xe9", "output": "y"}',
        "not_utf8",
        ["byte 0xe9 at line 3, column 21 is not UTF-8", "re-encode"],
    ),
    (b'["instruction", "output"]', "not_an_object", ["is a list, not an object"]),
    (
        b'{"instruction": "x <|endoftext|>", "output": "y"}',
        "special_token_text",
        ["field 'instruction' holds the special token text '<|endoftext|>'"],
    ),
    # Half an emoji's UTF-16 pair: Python reads it, no tokenizer takes it.
    (
        b'{"instruction": "cut \\ud83d", "output": "y"}',
        "lone_surrogate",
        ["field 'instruction' holds a lone surrogate escape '\\ud83d'", "fix the escape"],
    ),
    (
        b'{"instruction": ' + b"[" * 5000 + b"]" * 5000 + b', "output": "y"}',
        "malformed_json",
        ["nests arrays or objects deeper than Python's JSON reader allows"],
    ),
]


@pytest.mark.parametrize("line,reason,fragments", CASES)
def test_bad_row_stops_with_place_field_and_fix(tmp_path, line, reason, fragments):
    path = _file(tmp_path, "rows.jsonl", [line])
    with pytest.raises(ValueError) as e:
        _build(path, format="alpaca")
    msg = str(e.value)
    for fragment in [
        f"data.train='{path}'",
        f"{path}, line 3",
        f"reason {reason}",
        "data.on_bad_row=skip",
        *fragments,
    ]:
        assert fragment in msg, (fragment, msg)
    assert "Traceback" not in msg


@pytest.mark.parametrize("line,reason,fragments", CASES)
def test_bad_row_skipped_and_counted(tmp_path, line, reason, fragments):
    path = _file(tmp_path, "rows.jsonl", [line])
    splits = _build(path, format="alpaca", on_bad_row="skip")
    stats = splits.stats["train"]
    assert stats["rows_read"] == 21 and stats["examples"] == 20
    assert stats["dropped"] == {reason: 1}
    assert stats["problems"][0].startswith(f"{path}, line 3: ")


CHAT_CASES = [
    (
        {"messages": [{"role": "human", "content": "a"}, {"role": "assistant", "content": "b"}]},
        "unknown_role",
        "field 'messages[0].role' is 'human'; known: assistant, system, ",
    ),
    (
        {"messages": [{"role": "user", "content": "a"}]},
        "no_assistant_turn",
        "field 'messages' has no assistant turn",
    ),
    (
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}]},
        "not_a_string",
        "field 'messages[1].content' must be a string",
    ),
]


@pytest.mark.parametrize("row,reason,fragment", CHAT_CASES)
def test_bad_conversations(tmp_path, row, reason, fragment):
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [CHAT] * 10 + [row] + [CHAT] * 10))
    with pytest.raises(
        ValueError,
        match="chat.jsonl, line 11: "
        + fragment.replace("[", r"\[").replace("]", r"\]").replace("?", r"\?"),
    ):
        _build(str(path), template="chatml")
    stats = _build(str(path), template="chatml", on_bad_row="skip").stats["train"]
    assert stats["dropped"] == {reason: 1} and stats["examples"] == 20


def test_bad_row_in_a_json_list_names_the_item(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([GOOD, GOOD, {"output": "o"}]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"rows\.json, item 3: field 'instruction' is missing"):
        _build(str(path))


def test_bad_row_in_second_file_of_a_glob(tmp_path):
    (tmp_path / "m-1.jsonl").write_text(json.dumps(GOOD) + "\n")
    (tmp_path / "m-2.jsonl").write_text(json.dumps(GOOD) + "\n" + json.dumps({"output": "o"}))
    with pytest.raises(ValueError, match=r"m-\*\.jsonl.*m-2\.jsonl, line 2: field 'instruction'"):
        _build(str(tmp_path / "m-*.jsonl"))


def test_bad_row_in_validation_source_names_that_key(tmp_path):
    train = _file(tmp_path, "t.jsonl", [])
    val = _file(tmp_path, "v.jsonl", [b'{"instruction": "x"}'])
    with pytest.raises(ValueError, match=r"data\.validation=.*v\.jsonl, line 3: field 'output'"):
        _build(train, validation=val)


def test_csv_bad_row_names_the_row(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("instruction,output\nhi,there\n,empty instruction\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"d\.csv, row 2: field 'instruction' is empty"):
        _build(str(path))


def test_empty_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"empty\.jsonl is empty \(no rows\)"):
        _build(str(tmp_path / "empty.jsonl"))
    _file(tmp_path, "full.jsonl", [])
    splits = _build(str(tmp_path / "*.jsonl"), on_bad_row="skip")
    assert splits.stats["train"]["empty_files"] == [str(tmp_path / "empty.jsonl")]


def test_every_row_dropped(tmp_path):
    path = tmp_path / "all_bad.jsonl"
    path.write_text("\n".join(json.dumps({"instruction": "x", "output": ""}) for _ in range(5)))
    with pytest.raises(
        ValueError,
        match=r"all 5 rows of data.train=.* were dropped: empty_field\. "
        r"First: .*all_bad\.jsonl, line 1: field 'output' is empty\. .*give the "
        r"field some text",
    ):
        _build(str(path), on_bad_row="skip", max_drop_fraction=1.0)


def test_dropped_share_above_the_limit(tmp_path):
    # 4 of 24 rows = 16.7% > 10%; the example shown is of the most common reason, not line 3's.
    bad = [b"{"] + [b'{"instruction": "x"}'] * 3
    path = _file(tmp_path, "rows.jsonl", bad)
    with pytest.raises(ValueError) as e:
        _build(path, on_bad_row="skip")
    msg = str(e.value)
    for fragment in [
        "4 of 24 train rows of data.train=",
        "were dropped (16.7%",
        "data.max_drop_fraction=0.1",
        "'missing_field': 3",
        f"Most are missing_field, e.g. {path}, line 4: field 'output'",
        "Raise data.max_drop_fraction",
    ]:
        assert fragment in msg, (fragment, msg)
    assert _build(path, on_bad_row="skip", max_drop_fraction=0.2).stats["train"]["examples"] == 20


def test_no_silently_empty_mask(tmp_path):
    # A response that vanishes into the prompt's token: the row is dropped and counted.
    rows = [GOOD] * 20 + [{"instruction": "x " * 80, "output": "y"}]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    stats = _build(str(path)).stats["train"]
    assert stats["dropped"] == {"prompt_too_long": 1}
    assert all(s > 0 for s in [stats["loss_tokens"], stats["examples"]])


# ---------------------------------------------------------------- files as people save them

BOM = b"\xef\xbb\xbf"  # What spreadsheet programs and Windows editors write first.


@pytest.mark.parametrize(
    "name,body",
    [
        ("rows.csv", b"instruction,input,output\n" + b"Say hi.,,Hi.\n" * 20),
        ("rows.jsonl", b"\n".join([json.dumps(GOOD).encode()] * 20)),
        ("rows.json", json.dumps([GOOD] * 20, indent=1).encode()),  # A list, not JSON Lines.
    ],
)
def test_utf8_bom_is_read(tmp_path, name, body):
    path = tmp_path / name
    path.write_bytes(BOM + body)
    stats = _build(str(path), format="alpaca").stats["train"]
    assert stats["rows_read"] == 20 and stats["examples"] == 20 and stats["dropped"] == {}


def test_lone_surrogate_in_a_json_list_names_the_item(tmp_path):
    path = tmp_path / "rows.json"
    items = [json.dumps(GOOD)] * 20 + ['{"instruction": "x", "output": "\\udc00 y"}']
    path.write_text("[" + ",\n".join(items) + "]")
    expected = "rows.json, item 21: field 'output' holds a lone surrogate escape '\\udc00'"
    with pytest.raises(ValueError, match=re.escape(expected)):
        _build(str(path))
    assert _build(str(path), on_bad_row="skip").stats["train"]["dropped"] == {"lone_surrogate": 1}
    # A whole pair is an emoji: read as one.
    path.write_text(json.dumps([GOOD] * 20 + [{"instruction": "\U0001f600", "output": "y"}]))
    assert _build(str(path)).stats["train"]["examples"] == 21


def test_deeply_nested_json_list_names_the_line(tmp_path):
    path = tmp_path / "deep.json"
    deep = '{"instruction": ' + "[" * 5000 + "]" * 5000 + ', "output": "y"}'
    path.write_text("[\n" + json.dumps(GOOD) + ",\n" + deep + "\n]")
    with pytest.raises(ValueError, match=r"deep\.json, line 3: nests arrays or objects deeper"):
        _build(str(path))


def test_pretty_printed_object_says_which_key_holds_the_rows(tmp_path):
    path = tmp_path / "export.json"
    path.write_text(json.dumps({"version": 2, "examples": [GOOD] * 20}, indent=2))
    with pytest.raises(ValueError) as e:
        _build(str(path))
    msg = str(e.value)
    for fragment in [
        f"{path}, line 1: the file holds one JSON object (keys 'version', 'examples'), not a "
        "list of rows",
        "its key 'examples' holds a list of 20 objects",
        f"jq -c '.examples[]' {path} > rows.jsonl",
    ]:
        assert fragment in msg, (fragment, msg)


def test_every_row_too_long_names_the_file_not_the_held_out_split(tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text("\n".join([json.dumps({"instruction": "x " * 80, "output": "y"})] * 5))
    with pytest.raises(ValueError) as e:
        _build(str(path), validation="0.05")  # The default: 0 of 5 rows would be held out.
    msg = str(e.value)
    for fragment in [
        f"all 5 rows of data.train='{path}' were dropped: prompt_too_long.",
        f"First: {path}, line 1: 113 tokens",
        "data.long_prompt=truncate_left",
    ]:
        assert fragment in msg, (fragment, msg)
