"""Raw rows from files, the Hugging Face hub, saved data sets or the synthetic generator.

Source strings (config keys `data.train`, `data.validation`):

    synthetic:<task>:<n>[:seed=<s>]    generated in memory (see synthetic.py)
    path/to/file.json                  a JSON list of objects (or JSON Lines)
    path/to/file.jsonl                 one JSON object per line
    path/to/file.csv | file.parquet    a table with a header / a schema
    path/to/*.jsonl                    a glob: every matching file, in sorted order
    path/to/folder                     every .json/.jsonl/.csv/.parquet file in it, sorted
    path/to/saved[@<split>]            a folder written by `datasets` `save_to_disk`
    gs://bucket/path/*.jsonl           any of the paths above in a bucket (gs://, s3://)
    hf:<name>[:<config>][@<split>]     a hub data set, e.g. hf:tatsu-lab/alpaca@train
    <owner>/<name>                     same as hf:<owner>/<name>, when no such local path exists

A mixture (`data.train` only) names several sources with weights, comma-separated:

    a.jsonl:0.7,hf:org/b:0.3           70% of the training examples from a, 30% from b
    synthetic:mix:500:1,rows.csv:2     weights need not sum to 1 (a third, two thirds)

or lists them in `data.mixture`, each with its own format and fields (`MixSource`).
`mixture(spec)` gives the sources of either form; build.py resamples their examples to
the weights.

Rows are read one at a time, never all held at once: JSON Lines line by line, CSV and
Parquet through `datasets` streaming, hub and saved data sets from their memory-mapped
Arrow files (or streamed, `data.streaming=True`). JSON and JSON Lines are parsed here
rather than by `datasets` because its pyarrow reader coerces types across rows, forgets
line numbers and fails a whole file for one bad line or byte; here a bad line becomes a
`BadRow` with its line number, which `data.on_bad_row` can skip. Each row's place
(file and line, item or row) is recorded so errors can name it.
"""

from __future__ import annotations

import array
import csv
import dataclasses
import glob
import hashlib
import io
import json
import os
import re
from collections.abc import Iterator

import datasets
from etils import epath

from sft_jax import paths
from sft_jax.data import synthetic
from sft_jax.data.spec import BadRow

DATA_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
_HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+(:[\w.-]+)?(@\S+)?$")
_SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclasses.dataclass(frozen=True)
class MixSource:
    """One source of a mixture: its source string, share weight and options."""

    name: str  # For stats and eval_loss/<name>: letters, digits, _ and - only.
    text: str  # A source string, as data.train takes it.
    weight: float = 1.0
    format: str = ""  # "" = data.format
    fields: str | None = None  # None = data.fields
    key: str = "data.train"  # The config key to name in messages.


_WEIGHT = re.compile(r"^(?P<text>.+):(?P<weight>\d+(?:\.\d*)?(?:e-?\d+)?|\.\d+)$")
_MIX_KEYS = ("source", "weight", "name", "format", "fields")


def _split_weight(item: str) -> tuple[str, float | None]:
    """`source:weight` -> (source, weight); (item, None) without a weight. A synthetic
    source's third part is its row count, so its weight is a fourth (or later) part."""
    m = _WEIGHT.match(item)
    if not m or (item.startswith("synthetic:") and m["text"].count(":") < 2):
        return item, None
    return m["text"], float(m["weight"])


def source_name(text: str) -> str:
    """A short name for a source string: the file's or data set's name without extension."""
    text = text.removeprefix("hf:").split("@")[0]
    if text.startswith("synthetic:"):
        base = text.split(":")[1]
    else:
        base = text.rstrip("/").split("/")[-1].split(":")[0]
        for ext in DATA_EXTENSIONS:
            base = base.removesuffix(ext)
    return re.sub(r"[^\w-]+", "_", base).strip("_") or "source"


def _unique(names: list[str]) -> list[str]:
    out: list[str] = []
    for n in names:
        k, name = 2, n
        while name in out:
            name, k = f"{n}_{k}", k + 1
        out.append(name)
    return out


def parse_mixture(text: str, key: str = "data.train") -> list[MixSource]:
    """`a.jsonl:0.7,hf:org/b:0.3` -> its sources (one, weight 1, if no comma). Weights
    left out are 1."""
    items = [i.strip() for i in text.split(",")]
    if len(items) == 1:
        return [MixSource(source_name(text), text, key=key)]
    if not all(items):
        raise ValueError(f"{key}={text!r}: an empty source between commas")
    parsed = [_split_weight(i) for i in items]
    for (_, w), item in zip(parsed, items, strict=True):
        if w is not None and w <= 0:
            raise ValueError(f"{key}={text!r}: the weight of {item!r} must be > 0")
    names = _unique([source_name(t) for t, _ in parsed])
    return [
        MixSource(n, t, 1.0 if w is None else w, key=key)
        for n, (t, w) in zip(names, parsed, strict=True)
    ]


def _mixture_item(i: int, item) -> MixSource:
    key = f"data.mixture[{i}]"
    if hasattr(item, "to_dict"):  # An ml_collections.ConfigDict.
        item = item.to_dict()
    if isinstance(item, str):
        text, weight = _split_weight(item)
        return MixSource(source_name(text), text, 1.0 if weight is None else weight, key=key)
    if not isinstance(item, dict) or not isinstance(item.get("source"), str):
        raise ValueError(
            f"{key}={item!r}: give a source string, or a dict with 'source' and optionally "
            f"{', '.join(repr(k) for k in _MIX_KEYS[1:])}"
        )
    unknown = set(item) - set(_MIX_KEYS)
    if unknown:
        raise ValueError(f"{key}: unknown keys {sorted(unknown)}; valid: {', '.join(_MIX_KEYS)}")
    try:
        weight = float(item.get("weight", 1.0))
    except (TypeError, ValueError):
        raise ValueError(f"{key}: weight {item['weight']!r} is not a number") from None
    if weight <= 0:
        raise ValueError(f"{key}: weight {weight} must be > 0")
    name = item.get("name") or source_name(item["source"])
    if not re.fullmatch(r"[\w-]+", name):
        raise ValueError(f"{key}: name {name!r} may hold only letters, digits, _ and -")
    fields = item.get("fields")
    return MixSource(name, item["source"], weight, item.get("format", ""), fields, key)


def mixture(spec) -> list[MixSource]:
    """The training sources of a DataSpec: `data.mixture` if set, else `data.train` (one
    source, or several with weights)."""
    if not spec.mixture:
        return parse_mixture(spec.train)
    if spec.train:
        raise ValueError(
            f"data.train={spec.train!r} and data.mixture both name the training data; set "
            "data.train='' to train on data.mixture"
        )
    items = [_mixture_item(i, item) for i, item in enumerate(spec.mixture)]
    names = [m.name for m in items]
    if len(set(names)) < len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"data.mixture: the name(s) {dup} appear twice; give each a 'name'")
    return items


def parse_hf(source: str) -> tuple[str, str | None, str]:
    """`hf:<name>[:<config>][@<split>]` -> (name, config or None, split)."""
    rest, _, split = source.removeprefix("hf:").partition("@")
    name, _, config = rest.partition(":")
    if not name:
        raise ValueError(f"bad hub source {source!r}; expected hf:<name>[:<config>][@<split>]")
    return name, config or None, split or "train"


def _local_files(source: str) -> list[str]:
    if paths.is_remote(source):
        return _remote_files(source)
    if os.path.isdir(source):
        found = [f for ext in DATA_EXTENSIONS for f in glob.glob(os.path.join(source, "*" + ext))]
        return sorted(found)
    return sorted(f for f in glob.glob(source) if os.path.isfile(f))


def _remote_files(source: str) -> list[str]:
    """`_local_files` for a bucket URL: a file, a folder's data files, or a glob (`*`, `?`,
    `[…]` in the last parts), through epath."""
    parts = source.split("/")
    fixed = next((i for i, p in enumerate(parts) if glob.has_magic(p)), len(parts))
    base = epath.Path("/".join(parts[:fixed]))
    if fixed < len(parts):
        found = base.glob("/".join(parts[fixed:]))
    elif base.is_dir():
        found = (f for f in base.iterdir() if f.name.endswith(DATA_EXTENSIONS))
    else:
        found = [base] if base.exists() else []
    return sorted(str(f) for f in found if not f.is_dir())


def _is_dir(path: str) -> bool:
    return epath.Path(path).is_dir() if paths.is_remote(path) else os.path.isdir(path)


def _saved_dataset(source: str) -> tuple[str, str | None] | None:
    """(folder, split) if `source` names a `save_to_disk` folder, optionally `@split`."""
    path, _, split = source.partition("@") if not _is_dir(source) else (source, "", "")
    if _is_dir(path) and any(epath.Path(path, m).exists() for m in _SAVED_MARKERS):
        return path, split or None
    return None


def _open(path: str):
    """A data file (local or in a bucket), opened for reading bytes."""
    return epath.Path(path).open("rb")


def _line_of(data: bytes, offset: int) -> tuple[int, int]:
    """1-based (line, column) of a byte offset."""
    line_start = data.rfind(b"\n", 0, offset) + 1
    return data.count(b"\n", 0, offset) + 1, offset - line_start + 1


_BOM = b"\xef\xbb\xbf"  # What spreadsheet programs and Windows editors put first.
# A JSON escape of half a UTF-16 surrogate pair: the only way a lone surrogate gets into a row.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_TOO_DEEP = (
    "nests arrays or objects deeper than Python's JSON reader allows (about 1000 levels); "
    "flatten the data"
)


def lone_surrogate(value, path: str = "") -> str:
    """Where in a parsed JSON value a lone surrogate sits (`field 'a[2].b' holds …`), or "".

    JSON can escape half of a UTF-16 pair (an emoji cut in two: "\\ud83d"); Python reads
    it as a string that is not text and no tokenizer takes."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            where = f"field {path!r} " if path else ""
            escape = value[e.start].encode("unicode_escape").decode()
            return (
                f"{where}holds a lone surrogate escape '{escape}' (half of a UTF-16 pair, e.g. "
                "an emoji cut in two), which is not text"
            )
        return ""
    if isinstance(value, dict):
        items = ((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
    elif isinstance(value, list):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return ""
    return next((p for k, v in items if (p := lone_surrogate(v, k))), "")


def _parsed_row(raw: bytes, value) -> object:
    """A parsed JSON row, or a BadRow if it holds a lone surrogate (checked only when the
    raw text escapes one: cheap for the rows that do not)."""
    if _SURROGATE_ESCAPE.search(raw) and (problem := lone_surrogate(value)):
        return BadRow("lone_surrogate", problem)
    return value


def _deep_line(data: bytes, limit: int = 900) -> int:
    """The line where JSON brackets (outside strings) first nest `limit` deep; 0 if never."""
    depth, in_string, escaped, line = 0, False, False, 1
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # "
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in b"[{":
            depth += 1
            if depth >= limit:
                return line
        elif byte in b"]}":
            depth -= 1
        if byte == 0x0A:
            line += 1
    return 0


def _one_object_problem(data: bytes, path: str) -> str:
    """What to say when a .json/.jsonl file is one (pretty-printed) JSON object; "" if it
    is not one."""
    try:
        value = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return ""
    if not isinstance(value, dict):
        return ""
    lists = [k for k, v in value.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
    shown = ", ".join(repr(k) for k in list(value)[:8]) + (", …" if len(value) > 8 else "")
    fix = "give a JSON list of row objects, or JSON Lines (one object per line)"
    if lists:
        k = lists[0]
        select = f".{k}" if k.isidentifier() else f'.["{k}"]'
        fix = (
            f"its key {k!r} holds a list of {len(value[k])} objects, which may be the rows: "
            f"write them out as JSON Lines, e.g. jq -c '{select}[]' {path} > rows.jsonl"
        )
    return f"line 1: the file holds one JSON object (keys {shown}), not a list of rows; {fix}"


def _utf8_problem(data: bytes, e: UnicodeDecodeError, base_line: int = 0) -> str:
    line, col = _line_of(data, e.start)
    return (
        f"byte 0x{data[e.start]:02x} at line {line + base_line}, column {col} is not UTF-8; "
        "re-encode the file as UTF-8"
    )


def _json_line(raw: bytes, lineno: int):
    """One line of JSON Lines -> its value, or a BadRow saying what is wrong with it."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadRow("not_utf8", _utf8_problem(raw, e, lineno - 1))
    try:
        return _parsed_row(raw, json.loads(line))
    except json.JSONDecodeError as e:
        return BadRow("malformed_json", f"is not valid JSON: {e.msg} at column {e.colno}")
    except RecursionError:
        return BadRow("malformed_json", _TOO_DEEP)


class Source:
    """One source string opened for reading. `rows()` yields raw rows (dicts, or `BadRow`);
    `where(i)` names the file and line of the i-th row read."""

    def __init__(self, text: str, key: str, streaming: bool = False, skip_empty: bool = False):
        self.text, self.key, self.streaming, self.skip_empty = text, key, streaming, skip_empty
        self.files: list[str] = []
        self.empty_files: list[str] = []
        self._dataset = None
        self._file_of = array.array("i")  # per row: index into self.files (-1: none)
        self._place = array.array("q")  # per row: line, item or row number (1-based)
        self._units: list[str] = []  # per file: "line", "item" or "row"
        if text.startswith("synthetic:"):
            self.kind = "synthetic"
            try:
                self._synthetic = synthetic.parse_source(text)
            except ValueError as e:
                raise ValueError(f"{key}: {e}") from None
        elif text.startswith("hf:"):
            self.kind, self._hub = "hub", parse_hf(text)
        elif saved := _saved_dataset(text):
            self.kind, self._saved = "saved", saved
        elif files := _local_files(text):
            self.kind, self.files = "files", files
            for f in files:
                if not f.endswith(DATA_EXTENSIONS):
                    raise ValueError(
                        f"{key}={text!r}: {f} is not .json, .jsonl, .csv or .parquet; narrow "
                        "the glob or convert the file"
                    )
        elif _HUB_NAME.match(text) and not text.endswith(DATA_EXTENSIONS):
            self.kind, self._hub = "hub", parse_hf(text)
        else:
            raise ValueError(
                f"{key}={text!r}: no such file (or no file matches the glob). Give a .json, "
                ".jsonl, .csv or .parquet path, a glob, a folder, a save_to_disk folder, "
                "hf:<name>[@<split>] or synthetic:<task>:<n>."
            )

    # ---- where rows came from

    def where(self, index: int) -> str:
        """`file, line N` (or `item N`, `row N`) of the index-th row read, for messages."""
        if index < len(self._file_of) and self._file_of[index] >= 0:
            f = self._file_of[index]
            return f"{self.files[f]}, {self._units[f]} {self._place[index]}"
        return f"row {index + 1}"

    def _note(self, file_index: int, place: int) -> None:
        self._file_of.append(file_index)
        self._place.append(place)

    # ---- identity, for the cache key

    def fingerprint(self) -> str:
        """Changes when the rows could: file contents, a data set's fingerprint, the string."""
        if self.kind == "files":
            h = hashlib.blake2b(digest_size=16)
            for path in self.files:
                h.update(os.path.basename(path).encode() + b"\0")
                with _open(path) as f:
                    while block := f.read(1 << 20):
                        h.update(block)
            return "files:" + h.hexdigest()
        if self.kind in ("hub", "saved") and not (self.kind == "hub" and self.streaming):
            return f"{self.kind}:{self._open_dataset()._fingerprint}"
        return f"{self.kind}:{self.text}"  # synthetic, or a hub stream (no fingerprint).

    # ---- reading

    def rows(self) -> Iterator:
        """Every row, in order; records where each came from."""
        self._file_of, self._place = array.array("i"), array.array("q")
        if self.kind == "synthetic":
            for i, row in enumerate(synthetic.generate_rows(*self._synthetic)):
                self._note(-1, i + 1)
                yield row
            return
        if self.kind in ("hub", "saved"):
            yield from self._dataset_rows(self._open_dataset(), -1)
            return
        self._units = []
        for i, path in enumerate(self.files):
            n_before = len(self._file_of)
            if path.endswith((".jsonl", ".json")):
                yield from self._json_rows(path, i)
            else:
                self._units.append("row")
                yield from self._dataset_rows(self._open_table(path), i)
            if len(self._file_of) == n_before:
                if not self.skip_empty:
                    raise ValueError(
                        f"{self.key}={self.text!r}: {path} is empty (no rows). Remove it, fix "
                        "the path or glob, or set data.on_bad_row=skip to pass over empty files"
                    )
                self.empty_files.append(path)

    def _json_rows(self, path: str, file_index: int) -> Iterator:
        with _open(path) as f:
            head = f.read(4096).removeprefix(_BOM).lstrip()
        if head.startswith(b"["):
            self._units.append("item")
            yield from self._json_list(path, file_index)
            return
        if head.startswith(b"{"):
            self._refuse_one_object(path, head)
        self._units.append("line")
        with _open(path) as f:
            for lineno, raw in enumerate(f, start=1):
                if lineno == 1:
                    raw = raw.removeprefix(_BOM)
                if not raw.strip():
                    continue
                self._note(file_index, lineno)
                yield _json_line(raw, lineno)

    def _refuse_one_object(self, path: str, head: bytes) -> None:
        """Raises if the file is one pretty-printed JSON object (a first line that breaks
        off mid-object: `{`), not JSON Lines."""
        first = head.split(b"\n", 1)[0].strip()
        try:
            json.loads(first)
            return  # A whole object on line 1: JSON Lines.
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            if isinstance(e, json.JSONDecodeError) and e.pos < len(first):
                return  # Broken inside the line: a bad line of JSON Lines, reported as such.
        with _open(path) as f:
            problem = _one_object_problem(f.read(), path)
        if problem:
            raise ValueError(f"{self.key}={self.text!r}: {path}, {problem}")

    def _json_list(self, path: str, file_index: int) -> Iterator:
        with _open(path) as f:
            data = f.read()
        try:
            items = json.loads(data.decode("utf-8-sig"))
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{self.key}={self.text!r}: {path}: {_utf8_problem(data, e)}"
            ) from None
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{self.key}={self.text!r}: could not read JSON: {path}, line {e.lineno}, "
                f"column {e.colno}: {e.msg}"
            ) from None
        except RecursionError:
            raise ValueError(
                f"{self.key}={self.text!r}: could not read JSON: {path}, line "
                f"{_deep_line(data)}: {_TOO_DEEP}"
            ) from None
        if not isinstance(items, list):
            kind = type(items).__name__
            raise ValueError(f"{self.key}={self.text!r}: {path} holds a JSON {kind}, not a list")
        surrogates = bool(_SURROGATE_ESCAPE.search(data))
        del data
        for i, item in enumerate(items, start=1):
            self._note(file_index, i)
            problem = lone_surrogate(item) if surrogates else ""
            yield BadRow("lone_surrogate", problem) if problem else item

    def _open_table(self, path: str):
        # Streaming: rows come from the file in batches, never as one Arrow copy.
        try:
            if path.endswith(".csv"):
                # utf-8-sig: a leading BOM (spreadsheet programs write one) is not part of
                # the first column's name.
                with io.TextIOWrapper(_open(path), encoding="utf-8-sig", newline="") as f:
                    header = next(csv.reader(f), [])
                # Every column as text: "007" stays "007", empty cells stay "".
                features = datasets.Features({c: datasets.Value("string") for c in header})
                return datasets.load_dataset(
                    "csv",
                    data_files=[path],
                    split="train",
                    streaming=True,
                    features=features,
                    keep_default_na=False,
                    encoding="utf-8-sig",
                )
            return datasets.load_dataset(
                "parquet", data_files=[path], split="train", streaming=True
            )
        except UnicodeDecodeError as e:
            with _open(path) as f:
                data = f.read()
            raise ValueError(
                f"{self.key}={self.text!r}: {path}: {_utf8_problem(data, e)}"
            ) from None

    def _open_dataset(self):
        if self._dataset is not None:
            return self._dataset
        if self.kind == "saved":
            path, split = self._saved
            try:
                ds = datasets.load_from_disk(path)
            except Exception as e:
                raise ValueError(f"{self.key}={self.text!r}: could not load {path}: {e}") from e
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(
                        f"{self.key}={self.text!r}: {path} holds the splits {sorted(ds)}; name "
                        f"one as {path}@<split>"
                    )
                ds = ds[split]
        else:
            name, config, split = self._hub
            try:
                ds = datasets.load_dataset(name, config, split=split, streaming=self.streaming)
            except Exception as e:
                raise ValueError(
                    f"could not load hub data set {name!r} (config {config}, split {split}) for "
                    f"{self.key}={self.text!r}: {type(e).__name__}: {e}\nFor a local file, check "
                    "the path; for a hub data set write hf:<name>[:<config>][@<split>]."
                ) from e
        self._dataset = ds
        return ds

    def _dataset_rows(self, ds, file_index: int) -> Iterator:
        try:
            if isinstance(ds, datasets.Dataset):  # Memory-mapped: read in batches.
                rows = (
                    dict(zip(batch, values, strict=True))
                    for batch in ds.iter(batch_size=1024)
                    for values in zip(*batch.values(), strict=True)
                )
            else:
                rows = iter(ds)
            for i, row in enumerate(rows, start=1):
                self._note(file_index, i)
                yield row
        except UnicodeDecodeError as e:
            path = self.files[file_index] if file_index >= 0 else self.text
            with _open(path) as f:
                data = f.read()
            raise ValueError(
                f"{self.key}={self.text!r}: {path}: {_utf8_problem(data, e)}"
            ) from None
