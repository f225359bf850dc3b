"""Reading raw rows: JSON, JSONL, CSV, Parquet, globs, folders, save_to_disk, synthetic;
where each row came from; bad files named with their line."""

import json

import datasets
import pytest
from etils import epath

from sft_jax.data import sources, synthetic
from sft_jax.data.spec import BadRow
from tests.storage_emulator import gcs_bucket, gcs_emulator  # noqa: F401 (pytest fixtures)

ROWS = [
    {"instruction": "a", "input": "x", "output": "b"},
    {"instruction": "c", "input": "", "output": "d"},
    {"instruction": "e", "input": "", "output": "f"},
]


def _jsonl(path, rows, blank_lines=False):
    sep = "\n\n" if blank_lines else "\n"
    path.write_text(sep.join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return str(path)


def _read(text, **kw):
    src = sources.Source(text, "data.train", **kw)
    return src, list(src.rows())


def test_json_list_and_jsonl_with_places(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(ROWS, indent=1), encoding="utf-8")
    src, rows = _read(str(tmp_path / "a.json"))
    assert rows == ROWS and src.where(1) == f"{tmp_path / 'a.json'}, item 2"
    src, rows = _read(_jsonl(tmp_path / "b.jsonl", ROWS, blank_lines=True))
    assert rows == ROWS
    assert [src.where(i).rsplit(", ", 1)[1] for i in range(3)] == ["line 1", "line 3", "line 5"]
    # A .json file holding JSON Lines is read as such.
    _jsonl(tmp_path / "c.json", ROWS)
    assert _read(str(tmp_path / "c.json"))[1] == ROWS


def test_values_keep_their_json_types(tmp_path):
    # No type coercion across rows (pyarrow would make column types agree).
    raw = [{"instruction": "a", "output": 5}, {"instruction": "b", "output": "x"}]
    assert _read(_jsonl(tmp_path / "t.jsonl", raw))[1] == raw


def test_csv_reads_every_cell_as_text(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('instruction,input,output\nhi,,007\n"multi\nline",x,"a, b"\n', encoding="utf-8")
    src, rows = _read(str(path))
    assert rows == [
        {"instruction": "hi", "input": "", "output": "007"},
        {"instruction": "multi\nline", "input": "x", "output": "a, b"},
    ]
    assert src.where(1) == f"{path}, row 2"


def test_parquet_and_glob_across_formats(tmp_path):
    datasets.Dataset.from_list(ROWS[:2]).to_parquet(str(tmp_path / "p-1.parquet"))
    _jsonl(tmp_path / "p-2.jsonl", ROWS[2:])
    (tmp_path / "notes.txt").write_text("not data", encoding="utf-8")
    src, rows = _read(str(tmp_path / "p-*"))
    assert rows == ROWS
    assert src.where(2) == f"{tmp_path / 'p-2.jsonl'}, line 1"
    # A folder: every data file in it, sorted; other files ignored.
    assert _read(str(tmp_path))[1] == ROWS


def test_glob_with_a_non_data_file_is_refused(tmp_path):
    _jsonl(tmp_path / "x-1.jsonl", ROWS)
    (tmp_path / "x-2.txt").write_text("hi", encoding="utf-8")
    with pytest.raises(ValueError, match=r"x-2\.txt is not \.json, \.jsonl, \.csv or \.parquet"):
        _read(str(tmp_path / "x-*"))


def test_save_to_disk_folders(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "one"))
    src, rows = _read(str(tmp_path / "one"))
    assert rows == ROWS and src.kind == "saved" and src.where(2) == "row 3"
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_list(ROWS), test=datasets.Dataset.from_list(ROWS[:1])
    )
    dd.save_to_disk(str(tmp_path / "dict"))
    assert _read(str(tmp_path / "dict") + "@test")[1] == ROWS[:1]
    with pytest.raises(ValueError, match=r"splits \['test', 'train'\]; name one as .*@<split>"):
        _read(str(tmp_path / "dict"))


def test_synthetic_source():
    assert _read("synthetic:add:7:seed=2")[1] == synthetic.generate_rows("add", 7, 2)
    with pytest.raises(ValueError, match=r"data\.validation: bad synthetic source"):
        sources.Source("synthetic:mix:zero", "data.validation")


def test_missing_file_names_path_and_key(tmp_path):
    path = str(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match=r"data\.validation") as e:
        sources.Source(path, "data.validation")
    assert path in str(e.value) and "no such file" in str(e.value)


def test_malformed_and_non_utf8_lines_become_bad_rows_with_lines(tmp_path):
    path = tmp_path / "bad.jsonl"
    ok = json.dumps(ROWS[0]).encode()
    path.write_bytes(ok + b'\n{"instruction": \n' + ok + b"\n\n" + b'{"output": "caf\xe9"}\n')
    src, rows = _read(str(path))
    assert rows[0] == ROWS[0] and rows[2] == ROWS[0]
    assert isinstance(rows[1], BadRow) and rows[1].reason == "malformed_json"
    assert "not valid JSON" in rows[1].problem and src.where(1) == f"{path}, line 2"
    assert isinstance(rows[3], BadRow) and rows[3].reason == "not_utf8"
    assert "byte 0xe9 at line 5, column 16 is not UTF-8" in rows[3].problem
    assert src.where(3) == f"{path}, line 5"


@pytest.mark.parametrize(
    "name,data,fragment",
    [
        ("broken.json", b'[\n{"a": 1},\n{"a": 2}\n{"a": 3}]', "broken.json, line 4, column 1"),
        ("latin.json", b'[\n{"a": "ok"},\n{"a": "caf\xe9"}]', "byte 0xe9 at line 3, column 11"),
        ("latin.csv", b"instruction,output\nok,fine\ncaf\xe9,x\n", "byte 0xe9 at line 3"),
        ("obj.json", b'[\n{"a": 1}', "obj.json, line 2"),
    ],
)
def test_whole_file_errors_name_file_and_line(tmp_path, name, data, fragment):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ValueError, match=r"data\.train") as e:
        list(sources.Source(str(tmp_path / name), "data.train").rows())
    assert fragment in str(e.value)


@pytest.mark.parametrize("name,text", [("e.jsonl", "\n\n"), ("e.json", "[]"), ("e.csv", "a,b\n")])
def test_empty_file_is_an_error_or_skipped(tmp_path, name, text):
    (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{name} is empty.*data\.on_bad_row=skip"):
        list(sources.Source(str(tmp_path / name), "data.train").rows())
    _jsonl(tmp_path / "z.jsonl", ROWS)  # Sorted after the empty one.
    src, rows = _read(str(tmp_path / "*"), skip_empty=True)
    assert rows == ROWS and src.empty_files == [str(tmp_path / name)]


def test_fingerprint_follows_content(tmp_path):
    path = _jsonl(tmp_path / "f.jsonl", ROWS)
    a = sources.Source(path, "data.train").fingerprint()
    assert a == sources.Source(path, "data.train").fingerprint()
    _jsonl(tmp_path / "f.jsonl", ROWS[:2])
    assert sources.Source(path, "data.train").fingerprint() != a
    assert sources.Source("synthetic:add:3", "k").fingerprint() == "synthetic:synthetic:add:3"


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
    assert sources.Source(source, "data.train").kind == "hub"


@pytest.mark.parametrize("streaming", [False, True])
def test_hub_code_path_on_a_local_folder(tmp_path, monkeypatch, streaming):
    """`hf:` goes through datasets.load_dataset; a local folder exercises it offline."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    folder = tmp_path / "hubish"
    folder.mkdir()
    _jsonl(folder / "train.jsonl", ROWS)
    src, rows = _read(f"hf:{folder}@train", streaming=streaming)
    assert rows == ROWS and src.kind == "hub" and src.where(2) == "row 3"
    fp = src.fingerprint()
    assert fp.startswith("hub:") and (fp == f"hub:hf:{folder}@train") == streaming


def test_files_globs_and_folders_in_a_bucket(gcs_bucket, tmp_path):  # noqa: F811
    """gs:// sources (GCS emulator on loopback): the same rows, places and fingerprint as
    the same files on a local disk; parquet read through `datasets` from the bucket."""
    datasets.Dataset.from_list(ROWS[:2]).to_parquet(str(tmp_path / "p-1.parquet"))
    _jsonl(tmp_path / "p-2.jsonl", ROWS[2:])
    (tmp_path / "notes.txt").write_text("not data", encoding="utf-8")
    for f in tmp_path.iterdir():
        epath.Path(f"{gcs_bucket}/data/{f.name}").write_bytes(f.read_bytes())
    src, rows = _read(f"{gcs_bucket}/data/p-*")
    assert rows == ROWS
    assert src.files == [f"{gcs_bucket}/data/p-1.parquet", f"{gcs_bucket}/data/p-2.jsonl"]
    assert src.where(2) == f"{gcs_bucket}/data/p-2.jsonl, line 1"
    assert src.fingerprint() == sources.Source(str(tmp_path / "p-*"), "data.train").fingerprint()
    assert _read(f"{gcs_bucket}/data")[1] == ROWS  # a folder: its data files, sorted
    assert _read(f"{gcs_bucket}/data/p-2.jsonl")[1] == ROWS[2:]
    with pytest.raises(ValueError, match=r"data\.train='gs://.*/data/q-\*': no such file"):
        _read(f"{gcs_bucket}/data/q-*")


# ---------------------------------------------------------------- mixtures


def test_mixture_string_names_weights_and_synthetic_counts():
    got = sources.parse_mixture("a.jsonl:0.7,hf:org/b:0.3")
    assert [(m.name, m.text, m.weight) for m in got] == [
        ("a", "a.jsonl", 0.7),
        ("b", "hf:org/b", 0.3),
    ]
    # A synthetic source's third part is its row count: a weight is a fourth; none is 1.
    got = sources.parse_mixture("synthetic:mix:200,synthetic:mix:100:seed=2:3,d/x.json:.5")
    assert [(m.name, m.text, m.weight) for m in got] == [
        ("mix", "synthetic:mix:200", 1.0),
        ("mix_2", "synthetic:mix:100:seed=2", 3.0),
        ("x", "d/x.json", 0.5),
    ]
    # One source: the string as it is (a hub config or a count is no weight).
    assert sources.parse_mixture("hf:org/b:main")[0].text == "hf:org/b:main"
    with pytest.raises(ValueError, match=r"data.train='a.jsonl:0,b.jsonl': the weight of "):
        sources.parse_mixture("a.jsonl:0,b.jsonl")
    with pytest.raises(ValueError, match="an empty source between commas"):
        sources.parse_mixture("a.jsonl,")


def test_mixture_list_in_the_config():
    from sft_jax.data import DataSpec

    items = (
        {"source": "q.jsonl", "weight": 3, "format": "alpaca", "fields": "instruction=q"},
        "hf:org/chat@train:1",
    )
    got = sources.mixture(DataSpec(train="", mixture=items))
    assert [(m.name, m.text, m.weight, m.format, m.fields, m.key) for m in got] == [
        ("q", "q.jsonl", 3.0, "alpaca", "instruction=q", "data.mixture[0]"),
        ("chat", "hf:org/chat@train", 1.0, "", None, "data.mixture[1]"),
    ]
    for train, mixture, message in [
        ("a.jsonl", items, r"data.train='a.jsonl' and data.mixture both .* set data.train=''"),
        (
            "",
            ({"source": "a.jsonl", "wieght": 2},),
            r"data.mixture\[0\]: unknown keys \['wieght'\]",
        ),
        ("", ({"source": "a.jsonl", "weight": -1},), r"data.mixture\[0\]: weight -1.0 must be > 0"),
        ("", ("x/a.jsonl", "y/a.jsonl"), r"the name\(s\) \['a'\] appear twice; give each a 'name'"),
        ("", ({"weight": 1},), r"data.mixture\[0\]=.*give a source string, or a dict"),
    ]:
        with pytest.raises(ValueError, match=message):
            sources.mixture(DataSpec(train=train, mixture=mixture))
