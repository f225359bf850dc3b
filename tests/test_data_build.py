"""build_splits end to end on real tokenization: every format and template trains exactly
the responses, splits never overlap, length policy, the cache, determinism, workers. Worker
processes give the in-process result, in order; if they cannot start, the build carries on
in this process instead of hanging."""

import collections
import dataclasses
import json
import logging
import os

import ml_collections
import numpy as np
import pytest

from configs import default as default_config
from sft_jax import config as config_lib
from sft_jax.data import (
    DataSpec,
    FormatTemplate,
    batch_at,
    build,
    build_splits,
    examples,
    formats,
    load_tokenizer,
    num_batches_per_epoch,
    packing,
    pipeline,
    templates,
    view,
)
from sft_jax.data.examples import encode
from tests.storage_emulator import gcs_bucket, gcs_emulator  # noqa: F401 (pytest fixtures)

EOS = 50256
DEMO = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "alpaca_en_demo.json")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("gpt2")


def _examples_in(rows):
    """Multiset of the examples in packed rows, each as its full id sequence t0..tn."""
    out = collections.Counter()
    for ids, _ in _segments(rows):
        out[tuple(ids.tolist())] += 1
    return out


def _segments(rows):
    dense = rows.dense()
    for r in range(len(rows)):
        yield from view.segments({k: v[r] for k, v in dense.items()})


def _tokenized(rows, tok, template=templates.ALPACA):
    msgs = [formats.to_messages(r, "alpaca") for r in rows]
    ex = encode([templates.render_format(template, m, tok.eos_token) for m in msgs], tok)
    return collections.Counter(tuple(ids.tolist()) for ids, _ in ex)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _unique_rows(n, long_every=0):
    rows = [
        {"instruction": f"Echo number {i}.", "input": "", "output": f"{i} is the number."}
        for i in range(n)
    ]
    for i in range(0, n, long_every) if long_every else ():
        rows[i]["output"] = " ".join(["word"] * 200)  # ~200 tokens.
    return rows


def _spec(**kw):
    return DataSpec(**{"cache": False, "num_workers": 0, **kw})


def test_build_splits_end_to_end(tok):
    spec = _spec(train="synthetic:mix:300", max_seq_len=128)
    splits = build_splits(spec, tok)
    train = splits.train
    assert splits.validation is None and set(splits.stats) == {"train"}
    dense = train.dense()
    assert {k: v.dtype for k, v in dense.items()} == packing.FIELDS
    assert all(v.shape == (len(train), 128) for v in dense.values())
    from sft_jax.data import synthetic

    want = _tokenized(synthetic.generate_rows("mix", 300), tok)
    assert _examples_in(train) == want  # Exactly the source rows' examples, each once.
    stats = splits.stats["train"]
    assert stats["format"] == "alpaca"  # format=auto detected it.
    assert stats["rows_read"] == stats["examples"] == 300 and stats["dropped"] == {}
    assert stats["tokens"] == sum(len(ids) - 1 for ids in want.elements())
    assert stats["loss_tokens"] == int(dense["loss_mask"].sum()) > 300
    assert stats["rows"] == len(train) < 300
    assert stats["packing_efficiency"] == packing.packing_efficiency(dense)
    assert stats["responses_without_end_token"] == 0
    # Every example ends with a trainable EOS target.
    ends = np.flatnonzero((dense["targets"] == EOS).ravel())
    assert len(ends) == 300 and (dense["loss_mask"].ravel()[ends] == 1).all()


# Turns start with the row number after the previous turn's punctuation, so even the raw
# template (no separators) has token boundaries there; see test_data_templates for a merge.
CONVERSATION = [("Hi there", "Hello!"), ("What is 2+2?", "4, of course.")]
FORMAT_ROWS = {
    "alpaca": [
        {"instruction": f"Say {i}.", "input": "x" * (i % 2), "output": f"Said {i}."}
        for i in range(6)
    ],
    "prompt_completion": [{"prompt": f"Say {i}.", "completion": f"Said {i}."} for i in range(6)],
    "messages": [
        {
            "messages": [{"role": "system", "content": f"System {i}."}]
            + [
                {"role": r, "content": f"{i}: {t}"}
                for u, a in CONVERSATION
                for r, t in (("user", u), ("assistant", a))
            ]
        }
        for i in range(6)
    ],
    "sharegpt": [
        {
            "conversations": [
                {"from": r, "value": f"{i}: {t}"}
                for u, a in CONVERSATION
                for r, t in (("human", u), ("gpt", a))
            ]
        }
        for i in range(6)
    ],
}


def _responses(fmt, row):
    if fmt == "alpaca":
        return [row["output"]]
    if fmt == "prompt_completion":
        return [row["completion"]]
    if fmt == "messages":
        return [m["content"] for m in row["messages"] if m["role"] == "assistant"]
    return [m["value"] for m in row["conversations"] if m["from"] == "gpt"]


@pytest.mark.parametrize("fmt", list(FORMAT_ROWS))
@pytest.mark.parametrize("template", ["alpaca", "human_assistant", "chatml", "raw"])
def test_loss_sees_exactly_the_responses(tok, tmp_path, fmt, template):
    rows = FORMAT_ROWS[fmt]
    path = _write_jsonl(tmp_path / f"{fmt}.jsonl", rows)
    splits = build_splits(_spec(train=path, template=template, max_seq_len=256), tok)
    assert splits.stats["train"]["format"] == fmt and splits.stats["train"]["examples"] == 6
    end = "<|im_end|>" if template == "chatml" else "<|endoftext|>"
    want = sorted(tuple(f"{r}{end}" for r in _responses(fmt, row)) for row in rows)
    got = []
    for ids, trained in _segments(splits.train):
        # Trained runs, minus the template's space a straddling token may carry.
        runs = view.runs(ids, trained, tok)
        got.append(tuple(t.lstrip(" ") for t, tr in runs if tr))
    assert sorted(got) == want


def test_validation_fraction_is_disjoint_from_train(tok, tmp_path):
    rows = _unique_rows(200)
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    splits = build_splits(_spec(train=path, validation="0.1", max_seq_len=64), tok)
    train, val = _examples_in(splits.train), _examples_in(splits.validation)
    assert sum(val.values()) == 20 and sum(train.values()) == 180
    assert not set(train) & set(val)
    assert train + val == _tokenized(rows, tok)
    assert splits.stats["validation"]["rows_read"] == 20
    assert splits.stats["train"]["rows_read"] == 180
    # held_out_mask (public, for tools that need the raw held-out rows) is that split.
    mask = build.held_out_mask(200, 0.1, seed=0)
    assert val == _tokenized([r for r, h in zip(rows, mask, strict=True) if h], tok)
    # The split is seeded: another seed holds out other rows.
    other = build_splits(_spec(train=path, validation="0.1", max_seq_len=64, seed=1), tok)
    assert _examples_in(other.validation) != val


@pytest.mark.parametrize("validation", ["", "0", "0.0"])
def test_no_validation(tok, validation):
    splits = build_splits(_spec(train="synthetic:add:20", validation=validation), tok)
    assert splits.validation is None and set(splits.stats) == {"train"}


def test_validation_from_its_own_source(tok, tmp_path):
    train = _write_jsonl(tmp_path / "t.jsonl", _unique_rows(30))
    val_rows = [{"instruction": "Other.", "input": "x", "output": "y"}] * 3
    val = _write_jsonl(tmp_path / "v.jsonl", val_rows)
    splits = build_splits(_spec(train=train, validation=val, max_seq_len=64), tok)
    assert _examples_in(splits.validation) == _tokenized(val_rows, tok)
    assert splits.stats["train"]["rows_read"] == 30


def test_long_responses_are_cut_and_counted(tok, tmp_path, caplog):
    rows = _unique_rows(12, long_every=4)  # 3 long rows.
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        splits = build_splits(_spec(train=path, max_seq_len=64), tok)
    stats = splits.stats["train"]
    assert stats["responses_truncated"] == 3 and stats["dropped"] == {}
    full = _tokenized(rows, tok)
    assert _examples_in(splits.train) == collections.Counter({k[:65]: n for k, n in full.items()})
    # A cut example fills its row and ends without an EOS target.
    assert sum(1 for ids in _examples_in(splits.train) if len(ids) == 65 and ids[-1] != EOS) == 3
    assert "3 responses cut at data.max_seq_len=64" in caplog.text and "lost its EOS" in caplog.text


def test_too_long_drop_and_error(tok, tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", _unique_rows(12, long_every=4))
    splits = build_splits(
        _spec(train=path, max_seq_len=64, too_long="drop", max_drop_fraction=0.5), tok
    )
    assert splits.stats["train"]["dropped"] == {"too_long": 3}
    assert splits.stats["train"]["examples"] == 9
    with pytest.raises(
        ValueError,
        match=r"d\.jsonl, line 1: the example has \d+ tokens.*"
        r"data\.max_seq_len.*data\.too_long=truncate",
    ):
        build_splits(_spec(train=path, max_seq_len=64, too_long="error"), tok)


def test_long_prompt_drop_or_cut_from_the_left(tok, tmp_path):
    rows = _unique_rows(10)
    rows[0]["instruction"] = " ".join(["long"] * 100)
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    splits = build_splits(_spec(train=path, max_seq_len=64, max_drop_fraction=0.2), tok)
    assert splits.stats["train"]["dropped"] == {"prompt_too_long": 1}
    cut = build_splits(_spec(train=path, max_seq_len=64, long_prompt="truncate_left"), tok)
    assert cut.stats["train"]["prompts_truncated"] == 1 and cut.stats["train"]["examples"] == 10
    longest = max(_examples_in(cut.train), key=len)
    assert len(longest) == 65 and tok.decode(longest).endswith(
        " long\n\n### Response:\n0 is the number.<|endoftext|>"
    )


@pytest.mark.parametrize(
    "change,key",
    [
        ({"format": "csv"}, "data.format"),
        ({"template": "vicuna"}, "data.template"),
        ({"train_on": "prompt"}, "data.train_on"),
        ({"assistant_turns": "first"}, "data.assistant_turns"),
        ({"too_long": "skip"}, "data.too_long"),
        ({"long_prompt": "cut"}, "data.long_prompt"),
        ({"on_bad_row": "ignore"}, "data.on_bad_row"),
        ({"max_segments": -1}, "data.max_segments"),
        ({"pad_multiple": 0}, "data.pad_multiple"),
        ({"max_drop_fraction": 2.0}, "data.max_drop_fraction"),
        ({"fields": "x"}, "data.fields"),
        ({"validation": "1.5"}, "data.validation"),
        ({"validation": "0.001"}, "data.validation"),
        ({"validation": "nope.jsonl"}, "data.validation"),
        ({"train": "nope.jsonl"}, "data.train"),
        (
            {"template": "format", "template_format": FormatTemplate(assistant="x")},
            "data.template_format.assistant",
        ),
    ],
)
def test_config_errors_name_the_key(tok, change, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_splits(_spec(**{"train": "synthetic:add:20", **change}), tok)


def test_data_spec_from_the_config():
    c = default_config.get_config()
    c.data.template = "format"
    c.data.template_format.user = "Q: {content}\n"
    spec = config_lib.data_spec(c)
    assert spec.template_format.user == "Q: {content}\n" and spec.seed == c.seed
    assert spec.max_segments == 64 and spec.on_bad_row == "error" and spec.format == "auto"
    c.data.nope = 1
    with pytest.raises(ValueError, match=r"unknown data keys \['nope'\]"):
        config_lib.data_spec(c)
    c = ml_collections.ConfigDict(default_config.get_config())
    c.data.template_format.nope = "x"
    with pytest.raises(ValueError, match=r"data\.template_format.*nope"):
        config_lib.data_spec(c)


# ---------------------------------------------------------------- cache and determinism


def _arrays(rows):
    return {k: np.asarray(getattr(rows, k)) for k in ("ids", "trainable", "starts", "row_starts")}


def test_cache_hit_is_byte_identical_and_keyed_by_inputs(tok, tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", _unique_rows(50))
    spec = DataSpec(train=path, validation="0.1", max_seq_len=64, cache_dir=str(tmp_path / "c"))
    first = build_splits(spec, tok)
    assert not first.cache_hit and os.path.isdir(first.cache_path)
    second = build_splits(spec, tok)
    assert second.cache_hit and second.cache_path == first.cache_path
    assert second.stats == first.stats
    for a, b in ((first.train, second.train), (first.validation, second.validation)):
        for k, v in _arrays(a).items():
            assert v.tobytes() == _arrays(b)[k].tobytes(), k
        for step in range(3):
            x, y = batch_at(a, step, 4, 0), batch_at(b, step, 4, 0)
            assert all(x[k].tobytes() == y[k].tobytes() for k in x)
    # Anything the data depends on changes the key.
    changed = [
        (DataSpec(**{**spec.__dict__, "max_seq_len": 48}), tok),
        (DataSpec(**{**spec.__dict__, "seed": 1}), tok),
        (DataSpec(**{**spec.__dict__, "template": "chatml"}), tok),
    ]
    tok2 = load_tokenizer("gpt2")
    tok2.chat_template = "{{ messages }}"
    changed.append((spec, tok2))
    for s, t in changed:
        assert not build_splits(s, t).cache_hit
    _write_jsonl(tmp_path / "d.jsonl", _unique_rows(51))  # The file's content.
    assert not build_splits(spec, tok).cache_hit
    # Where the cache lives, or how many workers tokenize, is not part of the key.
    assert build_splits(DataSpec(**{**spec.__dict__, "num_workers": 0}), tok).cache_hit


def test_unreadable_cache_entry_is_rebuilt(tok, tmp_path):
    spec = DataSpec(train="synthetic:add:30", max_seq_len=64, cache_dir=str(tmp_path))
    first = build_splits(spec, tok)
    os.remove(os.path.join(first.cache_path, "train.ids.npy"))
    again = build_splits(spec, tok)
    assert (
        not again.cache_hit and _arrays(again.train)["ids"].tobytes() == first.train.ids.tobytes()
    )
    assert build_splits(spec, tok).cache_hit


def test_same_config_same_bytes_and_resume_replays_batches(tok, tmp_path):
    spec = DataSpec(train="synthetic:mix:400", max_seq_len=64, cache_dir=str(tmp_path))
    a = build_splits(DataSpec(**{**spec.__dict__, "cache": False}), tok)
    b = build_splits(DataSpec(**{**spec.__dict__, "cache": False}), tok)
    n = num_batches_per_epoch(a.train, 8)
    from_start = [batch_at(a.train, s, 8, 0) for s in range(2 * n + 3)]  # Into epoch 3.
    for s, batch in enumerate(from_start):
        other = batch_at(b.train, s, 8, 0)
        assert all(batch[k].tobytes() == other[k].tobytes() for k in batch)
    # A resumed run rebuilds (here: from the cache) and asks for step s directly.
    build_splits(spec, tok)
    resumed = build_splits(spec, tok)
    assert resumed.cache_hit
    for s in (n - 1, n, 2 * n + 2):
        again = batch_at(resumed.train, s, 8, 0)
        assert all(from_start[s][k].tobytes() == again[k].tobytes() for k in again)


@pytest.mark.skipif(not os.path.exists(DEMO), reason="needs ../shared/data/alpaca_en_demo.json")
def test_alpaca_demo_at_512(tok):
    """The done-means figure: ≥ 98% real tokens packed at 512, every fitting row trained on
    exactly its response and EOS (data: CC BY-NC 4.0 Alpaca sample, see its README)."""
    splits = build_splits(_spec(train=DEMO, max_seq_len=512), tok)
    stats = splits.stats["train"]
    assert stats["rows_read"] == stats["examples"] == 999
    assert stats["packing_efficiency"] >= 0.98
    assert stats["responses_truncated"] == 28  # Kept, cut at 512; they lost their EOS.
    rows = json.load(open(DEMO, encoding="utf-8"))
    want = collections.Counter(r["output"] + "<|endoftext|>" for r in rows)
    got = collections.Counter()
    for ids, trained in _segments(splits.train):
        if ids[-1] == EOS:  # Fitting rows: the trained text is the response and EOS.
            got[tok.decode(ids[trained])] += 1
    assert sum(got.values()) == 999 - 28 and not got - want


# ---------------------------------------------------------------- worker processes


def _fail():
    raise RuntimeError("cannot unpickle in a worker")


class _ParentOnly:
    """A regex that works here but whose unpickling fails in a worker process."""

    def __init__(self, pattern):
        self._p = pattern
        self.pattern = pattern.pattern

    def search(self, *args):
        return self._p.search(*args)

    def __reduce__(self):
        return (_fail, ())  # This test module cannot be imported by a spawned worker.


@pytest.fixture(scope="module")
def encoder():
    tok = load_tokenizer("gpt2")
    spec = DataSpec(train="x", max_seq_len=64)
    return examples.make_encoder(spec, tok, templates.resolve_template(spec, tok), "alpaca")


def _chunks(n_chunks, size=50):
    return [
        [{"instruction": f"Say {c}-{i}.", "output": f"{c}-{i}" * (1 + i % 5)} for i in range(size)]
        for c in range(n_chunks)
    ]


def _same(a, b):
    for x, y in zip(a, b, strict=True):
        for f in ("status", "flags", "lengths", "ids", "trainable"):
            np.testing.assert_array_equal(getattr(x, f), getattr(y, f), err_msg=f)


def test_workers_keep_order_and_results(encoder):
    chunks = _chunks(7)
    _same(
        build.encode_chunks(iter(chunks), encoder, 2), build.encode_chunks(iter(chunks), encoder, 0)
    )


def test_workers_that_cannot_start_fall_back(encoder, caplog):
    broken = dataclasses.replace(encoder, special=_ParentOnly(encoder.special))
    chunks = _chunks(3)
    with caplog.at_level(logging.WARNING):
        got = list(build.encode_chunks(iter(chunks), broken, 2))
    assert "worker processes failed" in caplog.text
    _same(got, build.encode_chunks(iter(chunks), encoder, 0))


def test_cache_in_a_bucket(tok, tmp_path, monkeypatch, gcs_bucket):  # noqa: F811
    """data.cache_dir as a gs:// URL (a GCS emulator on loopback): the entry is written to the
    bucket, and a second build maps a local copy of it, byte for byte the first."""
    monkeypatch.setenv("SFT_JAX_CACHE", str(tmp_path / "local"))  # Where the copy goes.
    path = _write_jsonl(tmp_path / "d.jsonl", _unique_rows(30))
    spec = DataSpec(train=path, validation="0.1", max_seq_len=64, cache_dir=f"{gcs_bucket}/c")
    first = build_splits(spec, tok)
    assert not first.cache_hit and first.cache_path.startswith(f"{gcs_bucket}/c/")
    assert not (tmp_path / "local").exists()  # Nothing written locally while building.
    second = build_splits(spec, tok)
    assert second.cache_hit and second.cache_path == first.cache_path
    assert second.stats == first.stats
    assert os.path.isdir(tmp_path / "local" / "data" / "remote")
    for a, b in ((first.train, second.train), (first.validation, second.validation)):
        for k, v in _arrays(a).items():
            assert v.tobytes() == _arrays(b)[k].tobytes(), k


# ---------------------------------------------------------------- weighted mixtures

QA = [{"question": f"What is {i} + {i}?", "answer": f"It is {2 * i}."} for i in range(120)]
CHAT = [
    {
        "messages": [
            {"role": "user", "content": f"Hi, I am {i}."},
            {"role": "assistant", "content": f"Hello {i}!"},
        ]
    }
    for i in range(60)
]
MIX_BATCH = 4


@pytest.fixture(scope="module")
def mixture(tmp_path_factory, tok):
    """A 3:1 mixture of 120 Alpaca-shaped rows with their own field names and 60 chat rows,
    10% of each held out; built once into a cache, then loaded from it (a resumed run)."""
    tmp = tmp_path_factory.mktemp("mixture")
    for name, rows in (("qa.jsonl", QA), ("chat.jsonl", CHAT)):
        (tmp / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    spec = DataSpec(
        train="",
        mixture=(
            {
                "source": str(tmp / "qa.jsonl"),
                "weight": 3,
                "format": "alpaca",
                "fields": "instruction=question,output=answer",
            },
            {"source": str(tmp / "chat.jsonl"), "weight": 1},
        ),
        validation="0.1",
        max_seq_len=64,
        cache_dir=str(tmp / "cache"),
        num_workers=0,
    )
    return spec, build_splits(spec, tok), build_splits(spec, tok)


def test_mixture_epoch_holds_the_weighted_shares(mixture):
    spec, splits, _ = mixture
    stats = splits.stats["train"]
    qa, chat = stats["sources"]["qa"], stats["sources"]["chat"]
    assert stats["format"] == "qa: alpaca, chat: messages"
    # 108 + 54 train examples; 3:1 of 162 -> 121.5 : 40.5, rounded to sum to 162.
    assert (qa["examples"], chat["examples"]) == (108, 54)
    assert (qa["examples_in_epoch"], chat["examples_in_epoch"]) == (122, 40)
    assert stats["examples"] == 162 and (qa["weight"], chat["weight"]) == (0.75, 0.25)
    assert qa["times_each"] == 122 / 108 and chat["share"] == 40 / 162
    # The packed rows hold exactly those examples, each from its own source.
    train = splits.train
    from_chat = train.source_rows >= chat["first_row"]
    assert (int((~from_chat).sum()), int(from_chat.sum())) == (122, 40)
    assert len(set(train.source_rows[from_chat].tolist())) == 40  # A subset, each once.
    assert np.bincount(np.bincount(train.source_rows[~from_chat])[:120])[1:].tolist() == [94, 14]


def test_mixture_shares_over_steps_within_tolerance(mixture):
    spec, splits, _ = mixture
    firsts = [s["first_row"] for s in splits.stats["train"]["sources"].values()]
    n = num_batches_per_epoch(splits.train, MIX_BATCH)
    # Over 3 epochs (40 batches each; the rows left out of each epoch's batches differ), the
    # examples' shares are the weights within 0.01; over the first 10 steps (~40 examples,
    # binomial sd ~0.07 for 0.25) within 0.15.
    assert n == 40
    shares = pipeline.source_shares(splits.train, firsts, range(3 * n), MIX_BATCH, spec.seed)
    assert np.allclose(shares, [0.75, 0.25], atol=0.01), shares
    shares = pipeline.source_shares(splits.train, firsts, range(10), MIX_BATCH, spec.seed)
    assert np.allclose(shares, [0.75, 0.25], atol=0.15), shares


def test_mixture_batches_replay_from_a_resume(mixture):
    spec, built, loaded = mixture
    assert not built.cache_hit and loaded.cache_hit
    uninterrupted = [batch_at(built.train, s, MIX_BATCH, spec.seed) for s in range(25)]
    for s in range(12, 25):  # A run resumed at step 12 reads the cache entry.
        resumed = batch_at(loaded.train, s, MIX_BATCH, spec.seed)
        assert all(np.array_equal(resumed[k], uninterrupted[s][k]) for k in resumed)
    assert loaded.stats == json.loads(json.dumps(built.stats))


def test_mixture_validation_per_source_and_eval_loss(mixture):
    from configs import default
    from sft_jax import evaluate

    spec, built, loaded = mixture
    for splits in (built, loaded):
        by_source = splits.validation_sources
        assert list(by_source) == ["qa", "chat"]
        assert [len(r.starts) - 1 for r in by_source.values()] == [12, 6]
        assert len(splits.validation.starts) - 1 == 18
    c = default.get_config()
    c.eval.generations = 0

    def eval_fn(params, batch):  # A stand-in loss: the target id mod 7 on trained tokens.
        mask = batch["loss_mask"]
        return {
            "loss_sum": float((mask * (batch["targets"] % 7)).sum()),
            "loss_tokens": float(mask.sum()),
        }

    ev = evaluate.Evaluation(
        "/tmp",
        config_lib.eval_config(c),
        0,
        spec,
        None,
        None,
        built.validation,
        eval_fn,
        4,
        validation_sources=built.validation_sources,
    )
    got = ev.validation_loss(None)
    want = {
        n: [eval_fn(None, b) for b in pipeline.eval_batches(r, 4)]
        for n, r in built.validation_sources.items()
    }
    sums = {
        n: [sum(o[k] for o in out) for k in ("loss_sum", "loss_tokens")] for n, out in want.items()
    }
    assert got["eval_loss/qa"] == sums["qa"][0] / sums["qa"][1]
    assert got["eval_loss/chat"] == sums["chat"][0] / sums["chat"][1]
    total = [a + b for a, b in zip(sums["qa"], sums["chat"], strict=True)]
    assert (
        got["eval_loss"] == pytest.approx(total[0] / total[1])
        and got["eval_loss_tokens"] == total[1]
    )


def test_mixture_string_of_synthetic_sources(tok):
    spec = DataSpec(
        train="synthetic:mix:60:1,synthetic:mix:60:seed=1:2",
        validation="",
        cache=False,
        max_seq_len=64,
        num_workers=0,
        mixture_examples=90,
    )
    stats = build_splits(spec, tok).stats["train"]
    assert {n: s["examples_in_epoch"] for n, s in stats["sources"].items()} == {
        "mix": 30,
        "mix_2": 60,
    }
    # Several validation sources: each one's rows apart too (their weights play no part).
    spec = dataclasses.replace(
        spec, train="synthetic:mix:60", validation="synthetic:mix:20:seed=1,synthetic:mix:10:9"
    )
    splits = build_splits(spec, tok)
    assert "sources" not in splits.stats["train"]
    assert {n: len(r.starts) - 1 for n, r in splits.validation_sources.items()} == {
        "mix": 20,
        "mix_2": 10,
    }
