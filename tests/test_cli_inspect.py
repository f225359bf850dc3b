"""sft_jax/cli/inspect.py through its console script, sft-jax-inspect: counts, batches
dumped as JSONL (equal to training's), the marked terminal view, the HTML page, and errors
without a traceback."""

import html.parser
import json
import os
import subprocess

import numpy as np
import pytest

from configs import tiny
from sft_jax import config as config_lib
from sft_jax.cli import inspect
from sft_jax.data import batch_at, build_splits, load_tokenizer

ROOT = os.path.join(os.path.dirname(__file__), "..")
TINY = os.path.join(ROOT, "configs", "tiny.py")
ROWS = [
    {"instruction": f"Echo {i}.", "input": "<b>&</b>" * (i % 2), "output": f"Echo {i}!"}
    for i in range(40)
]


def _run(script, *args):
    return subprocess.run(
        [script, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory, console_script):
    tmp = tmp_path_factory.mktemp("inspect")
    data = tmp / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    overrides = [
        f"--config.data.train={data}",
        f"--config.data.cache_dir={tmp / 'cache'}",
        "--config.data.validation=0.1",
    ]
    out = _run(
        console_script("sft-jax-inspect"),
        "--config",
        TINY,
        *overrides,
        "--dump-batches",
        "2",
        "--out",
        str(tmp / "b.jsonl"),
        "--html",
        str(tmp / "d.html"),
        "--show",
        "1",
        "--no-color",
    )
    return out, tmp, overrides


def test_counts_and_last_line_json(run):
    out, _, _ = run
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    train, val = stats["train"], stats["validation"]
    assert train["rows_read"] == 36 and val["rows_read"] == 4
    assert train["examples"] == 36 and train["dropped"] == {}
    assert 0 < train["loss_tokens"] < train["tokens"]
    assert 0 <= train["padding_share"] < 1 and train["segments_per_row"]["max"] >= 2
    assert stats["cache"]["path"] and not stats["cache"]["hit"]
    assert "rows read 36, examples 36, dropped 0" in out.stdout
    # The marked view: trained text in brackets, after its prompt.
    assert "### Response:\n⟦Echo " in out.stdout and "!<|endoftext|>⟧" in out.stdout


def test_dumped_batches_are_the_training_batches(run):
    _, tmp, overrides = run
    lines = (tmp / "b.jsonl").read_text().splitlines()
    assert len(lines) == 2
    c = tiny.get_config()
    c.data.train, c.data.cache_dir = str(tmp / "rows.jsonl"), str(tmp / "cache")
    c.data.validation = "0.1"
    splits = build_splits(config_lib.data_spec(c), load_tokenizer("gpt2"))
    assert splits.cache_hit  # The tool's own build, reused.
    for step, line in enumerate(lines):
        got = json.loads(line)
        assert got["step"] == step
        want = batch_at(splits.train, step, c.train.batch_size, c.seed)
        assert set(got) == {"step", *want}
        for k, v in want.items():
            np.testing.assert_array_equal(np.asarray(got[k], v.dtype), v, err_msg=k)


class _Spans(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.classes, self.text = [], {"tr": "", "ctx": ""}

    def handle_starttag(self, tag, attrs):
        self.classes.append(dict(attrs).get("class") if tag == "span" else None)

    def handle_endtag(self, tag):
        self.classes.pop() if self.classes else None

    def handle_data(self, data):
        if self.classes and self.classes[-1] in self.text:
            self.text[self.classes[-1]] += data


def test_html_page_marks_trained_tokens(run):
    _, tmp, _ = run
    page = (tmp / "d.html").read_text(encoding="utf-8")
    parser = _Spans()
    parser.feed(page)
    # Every trained piece is a response and its EOS; the data's markup stays text.
    trained = parser.text["tr"]
    assert trained.count("<|endoftext|>") >= 8 and "Echo" in trained and "###" not in trained
    assert "### Instruction:" in parser.text["ctx"] and "<b>&</b>" in parser.text["ctx"]
    assert "&lt;b&gt;&amp;&lt;/b&gt;" in page  # Escaped, not markup.


def test_bad_data_is_one_clear_line(tmp_path, console_script):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n" + '{"instruction": "x"}\n', encoding="utf-8")
    out = _run(
        console_script("sft-jax-inspect"),
        "--config",
        TINY,
        f"--config.data.train={bad}",
        "--config.data.cache=False",
    )
    assert out.returncode == 1
    assert f"error: data.train='{bad}': {bad}, line 2: field 'output' is missing" in out.stderr
    assert "Traceback" not in out.stderr


def test_dump_batches_needs_out(capsys):
    assert inspect.main(["--config", TINY, "--dump-batches", "1"]) == 1
    assert "--dump-batches needs --out F.jsonl" in capsys.readouterr().err
