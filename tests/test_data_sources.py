"""Reading rows: JSON, JSONL, globs, folders, synthetic; errors that point at the bad row."""

import json

import pytest

from sft_jax.data import sources, synthetic

ROWS = [
    {"instruction": "a", "input": "x", "output": "b"},
    {"instruction": "c", "input": "", "output": "d"},
    {"instruction": "e", "input": "", "output": "f"},
]


def _jsonl(path, rows, blank_lines=False):
    sep = "\n\n" if blank_lines else "\n"
    path.write_text(sep.join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return str(path)


def test_json_list_and_jsonl(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(ROWS), encoding="utf-8")
    assert sources.read_rows(str(tmp_path / "a.json")) == ROWS
    assert sources.read_rows(_jsonl(tmp_path / "b.jsonl", ROWS, blank_lines=True)) == ROWS


def test_input_optional_and_extra_columns_dropped(tmp_path):
    raw = [
        {"instruction": "a", "output": "b", "id": 7},
        {"instruction": "c", "input": None, "output": "d", "id": 8},
    ]
    got = sources.read_rows(_jsonl(tmp_path / "x.jsonl", raw))
    assert got == [
        {"instruction": "a", "input": "", "output": "b"},
        {"instruction": "c", "input": "", "output": "d"},
    ]


def test_glob_and_folder_read_files_in_sorted_order(tmp_path):
    _jsonl(tmp_path / "part-2.jsonl", ROWS[2:])
    _jsonl(tmp_path / "part-1.jsonl", ROWS[:2])
    (tmp_path / "notes.txt").write_text("not data", encoding="utf-8")
    assert sources.read_rows(str(tmp_path / "part-*.jsonl")) == ROWS
    assert sources.read_rows(str(tmp_path)) == ROWS


def test_synthetic_source():
    got = sources.read_rows("synthetic:add:7:seed=2")
    assert got == synthetic.generate_rows("add", 7, 2)


def test_missing_file_names_path_and_key(tmp_path):
    path = str(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match=r"data\.validation") as e:
        sources.read_rows(path, "data.validation")
    assert path in str(e.value)
    with pytest.raises(ValueError, match="no such file"):
        sources.read_rows(str(tmp_path / "*.json"))


OK = json.dumps(ROWS[0])

# (file name, file text, fragments the error message must hold)
BAD = [
    # Row 3 lacks "output"; the blank lines make it line 5 of the file.
    (
        "a.jsonl",
        f'{OK}\n\n{OK}\n\n{{"instruction": "x"}}\n{OK}\n',
        ["a.jsonl, line 5", "'output'", "missing"],
    ),
    (
        "b.jsonl",
        f'{OK}\n{{"instruction": "q", "output": 5}}\n',
        ["b.jsonl, line 2", "'output'", "must be a string"],
    ),
    (
        "c.jsonl",
        '{"instruction": ["q"], "output": "a"}\n',
        ["c.jsonl, line 1", "'instruction'", "string"],
    ),
    (
        "d.jsonl",
        '{"instruction": "q", "input": 3, "output": "a"}\n',
        ["d.jsonl, line 1", "'input'"],
    ),
    ("e.json", f'[{OK}, {{"output": "o"}}]', ["e.json, item 2", "'instruction'", "missing"]),
]


@pytest.mark.parametrize("name,text,fragments", BAD)
def test_bad_row_message_points_at_row_and_field(tmp_path, name, text, fragments):
    (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(ValueError) as e:
        sources.read_rows(str(tmp_path / name), "data.validation")
    for fragment in [*fragments, "data.validation"]:
        assert fragment in str(e.value)


def test_bad_row_in_second_file_of_a_glob(tmp_path):
    _jsonl(tmp_path / "m-1.jsonl", ROWS)
    _jsonl(tmp_path / "m-2.jsonl", [ROWS[0], {"output": "o"}])
    with pytest.raises(ValueError, match=r"m-\*\.jsonl.*m-2\.jsonl, line 2: field 'instruction'"):
        sources.read_rows(str(tmp_path / "m-*.jsonl"))


@pytest.mark.parametrize(
    "name,text,where",  # JSON reports the line where it noticed: the missing comma's next.
    [
        ("broken.jsonl", f'{OK}\n\n{{"instruction": \n{OK}\n', "broken.jsonl, line 3"),
        ("broken.json", f"[\n{OK},\n{OK}\n{OK}]", "broken.json, line 4"),
    ],
)
def test_unparseable_json_names_file_and_line(tmp_path, name, text, where):
    (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=r"data\.train") as e:
        sources.read_rows(str(tmp_path / name))
    assert where in str(e.value)


def test_bad_synthetic_source_names_the_key():
    with pytest.raises(ValueError, match=r"data\.validation: bad synthetic source"):
        sources.read_rows("synthetic:mix:zero", "data.validation")


def test_unknown_format():
    with pytest.raises(ValueError, match=r"data\.format.*alpaca"):
        sources.read_rows("synthetic:add:3", format="messages")


@pytest.mark.parametrize(
    "source,want",
    [
        ("hf:tatsu-lab/alpaca", ("tatsu-lab/alpaca", None, "train")),
        ("hf:tatsu-lab/alpaca@train[:1%]", ("tatsu-lab/alpaca", None, "train[:1%]")),
        ("hf:org/set:en@validation", ("org/set", "en", "validation")),
        ("org/set:en", ("org/set", "en", "train")),
    ],
)
def test_parse_hf(source, want):
    assert sources.parse_hf(source) == want
