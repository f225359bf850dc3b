"""Instruction rows from files, the Hugging Face hub or the synthetic generator.

Source strings (config keys `data.train`, `data.validation`):

    synthetic:<task>:<n>[:seed=<s>]    generated in memory (see synthetic.py)
    path/to/file.json                  a JSON list of objects
    path/to/file.jsonl                 one JSON object per line
    path/to/*.jsonl                    a glob: every matching file, in sorted order
    path/to/folder                     every *.json and *.jsonl file in it, sorted
    hf:<name>[:<config>][@<split>]     a hub data set, e.g. hf:tatsu-lab/alpaca@train
    <owner>/<name>                     same as hf:<owner>/<name>, when no such local path exists

Files go through `datasets.load_dataset("json", ...)`. Rows are then checked and
normalised by format: `alpaca` rows need string `instruction` and `output`; `input` may
be missing or null (read as ""). Other columns are dropped.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tempfile
from collections.abc import Callable

import datasets

from sft_jax.data import synthetic

Row = dict[str, str]


class RowError(ValueError):
    """A row lacks a field or has one of the wrong type; `field` names it."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"field {field!r} {problem}")
        self.field = field


def _alpaca(row: dict) -> Row:
    out = {}
    for field in ("instruction", "input", "output"):
        value = row.get(field)
        if value is None and field == "input":
            value = ""
        if value is None:
            raise RowError(field, "is missing")
        if not isinstance(value, str):
            raise RowError(field, f"must be a string, got {type(value).__name__} {value!r:.40}")
        out[field] = value
    return out


# Row normalisers by `data.format`; prompt_completion, messages, sharegpt slot in here.
FORMATS: dict[str, Callable[[dict], Row]] = {"alpaca": _alpaca}

_HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")


def parse_hf(source: str) -> tuple[str, str | None, str]:
    """`hf:<name>[:<config>][@<split>]` -> (name, config or None, split)."""
    rest, _, split = source.removeprefix("hf:").partition("@")
    name, _, config = rest.partition(":")
    if not name:
        raise ValueError(f"bad hub source {source!r}; expected hf:<name>[:<config>][@<split>]")
    return name, config or None, split or "train"


def _local_files(source: str) -> list[str]:
    if os.path.isdir(source):
        pattern = [os.path.join(source, "*.json"), os.path.join(source, "*.jsonl")]
        return sorted(f for p in pattern for f in glob.glob(p))
    return sorted(f for f in glob.glob(source) if os.path.isfile(f))


def _locate(files: list[str], index: int) -> str:
    """Where the `index`-th row (0-based, across `files`) sits: file and line or item.

    Error path only: re-reads the files, because `datasets` skips blank lines and keeps
    no file names, so the row index alone would mislead.
    """
    remaining = index
    for path in files:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            items = None
        if isinstance(items, list):
            if remaining < len(items):
                return f"{path}, item {remaining + 1}"
            remaining -= len(items)
            continue
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                if remaining == 0:
                    return f"{path}, line {lineno}"
                remaining -= 1
    return f"row {index + 1}"


def _find_parse_error(files: list[str]) -> str | None:
    """File, line and reason of the first JSON syntax error (error path only)."""
    for path in files:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if text.lstrip().startswith("["):  # One JSON document.
            try:
                json.loads(text)
            except json.JSONDecodeError as e:
                return f"{path}, line {e.lineno}: {e.msg}"
            continue
        for lineno, line in enumerate(text.splitlines(), start=1):
            try:
                if line.strip():
                    json.loads(line)
            except json.JSONDecodeError as e:
                return f"{path}, line {lineno}: {e.msg}"
    return None


def _load_files(files: list[str], source: str, key: str) -> list[dict]:
    # A throwaway cache: we keep the rows in memory, and a persistent Arrow copy of
    # every version of every user file would only pile up.
    with tempfile.TemporaryDirectory(prefix="sft_jax_json_") as cache:
        try:
            ds = datasets.load_dataset("json", data_files=files, split="train", cache_dir=cache)
        except Exception as e:
            cause = e.__cause__ or e
            where = _find_parse_error(files) or f"{type(cause).__name__}: {cause}"
            raise ValueError(f"{key}={source!r}: could not read JSON: {where}") from e
        return ds.to_list()


def _load_hub(source: str, key: str) -> list[dict]:
    name, config, split = parse_hf(source)
    try:
        return datasets.load_dataset(name, config, split=split).to_list()
    except Exception as e:
        raise ValueError(
            f"could not load hub data set {name!r} (config {config}, split {split}) for "
            f"{key}={source!r}: {type(e).__name__}: {e}\nFor a local file, check the path; "
            "for a hub data set write hf:<name>[:<config>][@<split>]."
        ) from e


def read_rows(source: str, key: str = "data.train", format: str = "alpaca") -> list[Row]:
    """Reads and validates the rows of `source`; `key` is the config key, for errors."""
    if format not in FORMATS:
        raise ValueError(f"unknown data.format {format!r}; valid: {', '.join(FORMATS)}")
    files: list[str] = []
    if source.startswith("synthetic:"):
        try:
            raw = synthetic.generate_rows(*synthetic.parse_source(source))
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
    elif source.startswith("hf:"):
        raw = _load_hub(source, key)
    elif files := _local_files(source):
        raw = _load_files(files, source, key)
    elif _HUB_NAME.match(source) and not source.endswith((".json", ".jsonl")):
        raw = _load_hub(source, key)
    else:
        raise ValueError(
            f"{key}={source!r}: no such file (or no file matches the glob). Give a .json or "
            ".jsonl path, a glob, a folder, hf:<name> or synthetic:<task>:<n>."
        )
    if not raw:
        raise ValueError(f"{key}={source!r} holds no rows")
    normalise = FORMATS[format]
    rows = []
    for i, row in enumerate(raw):
        try:
            rows.append(normalise(row))
        except RowError as e:
            where = _locate(files, i) if files else f"row {i + 1}"
            raise ValueError(f"{key}={source!r}: {where}: {e} (data.format={format})") from None
    return rows
