"""The metrics window alone: one-step-late reads, compile timing apart, the token-weighted
loss over the window, throughput and MFU over the timed steps, paused time left out; the
logger's files in a bucket."""

import json

import numpy as np
import pytest
from etils import epath

from sft_jax import metrics
from sft_jax.config import TrainConfig
from tests.storage_emulator import gcs_bucket, gcs_emulator  # noqa: F401 (pytest fixtures)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _step(loss, loss_tokens, tokens=64.0, finite=True, lr=1e-3, grad_norm=0.5):
    f = np.float32
    return {
        "loss": f(loss),
        "loss_tokens": f(loss_tokens),
        "tokens": f(tokens),
        "finite": np.bool_(finite),
        "learning_rate": f(lr),
        "grad_norm": f(grad_norm),
    }


def _window(clock, peak=1000.0):
    # 10 FLOPs per position: a row of width w costs 10·w.
    return metrics.MetricsWindow(
        lambda w: 10.0 * w, batch_size=2, peak_flops_total=peak, clock=clock
    )


def test_loss_is_token_weighted_and_compile_is_timed_apart():
    clock = Clock()
    w = _window(clock)
    clock.now += 7.0  # the first step compiles
    w.add(1, _step(4.0, 10), width=8)
    clock.now += 1.0
    w.add(2, _step(2.0, 30), width=8)
    clock.now += 1.0
    w.add(3, _step(1.0, 60), width=16)
    r = w.record()
    assert r["compile_s"] == pytest.approx(7.0)
    # Σ loss·n / Σ n over all three steps, the compiling one included; never a mean of means.
    assert r["loss"] == pytest.approx((4 * 10 + 2 * 30 + 1 * 60) / 100)
    assert r["loss_tokens"] == 100 and r["tokens"] == 3 * 64
    # Timing: the two steps after the compiling one, in the 2 s they took.
    assert r["tokens_per_sec"] == pytest.approx(2 * 64 / 2.0)
    assert r["step_time_s"] == pytest.approx(1.0)
    assert r["mfu"] == pytest.approx((10 * 8 * 2 + 10 * 16 * 2) / 2.0 / 1000.0)
    assert r["learning_rate"] == pytest.approx(1e-3) and r["grad_norm"] == pytest.approx(0.5)

    # The next window starts afresh: no compile_s, every step timed, paused time left out.
    w.add(4, _step(3.0, 10), width=8)
    clock.now += 2.0
    with w.paused():  # e.g. a validation pass
        clock.now += 50.0
    w.add(5, _step(3.0, 10), width=8)
    r = w.record()
    assert "compile_s" not in r
    assert r["loss"] == pytest.approx(3.0) and r["tokens"] == 128
    assert r["step_time_s"] == pytest.approx(1.0)  # 2 s for 2 steps, not 52 s


def test_steps_are_read_one_step_late_and_a_non_finite_one_stops():
    clock = Clock()
    w = _window(clock)
    w.add(1, _step(1.0, 1), width=8)
    w.add(2, _step(float("nan"), 1, finite=False), width=8)  # queued, not yet read
    with pytest.raises(FloatingPointError, match="non-finite loss or gradient at step 2"):
        w.add(3, _step(1.0, 1), width=8)  # reading step 2 while step 3 runs
    w = _window(clock)
    w.add(1, _step(1.0, 1), width=8)
    w.add(2, _step(float("inf"), 1, finite=False), width=8)
    with pytest.raises(FloatingPointError, match="optim.learning_rate"):
        w.read()  # before logging or saving, the pending step is read and checked


def test_no_peak_means_no_mfu():
    clock = Clock()
    w = _window(clock, peak=0.0)
    w.add(1, _step(1.0, 1), width=8)
    clock.now += 1.0
    w.add(2, _step(1.0, 1), width=8)
    assert w.record()["mfu"] == 0.0


def test_a_window_of_the_compiling_step_alone_reports_no_throughput():
    """log_every=1: the first record holds only the step that compiled, whose time is
    compile_s; it once reported that step in ~0 s (tokens_per_sec 1.9e7, mfu 2757)."""
    clock = Clock()
    w = _window(clock)
    clock.now += 7.0
    w.add(1, _step(2.0, 10), width=8)
    r = w.record()
    assert r["compile_s"] == pytest.approx(7.0) and r["loss"] == pytest.approx(2.0)
    assert not {"tokens_per_sec", "step_time_s", "mfu"} & set(r)
    clock.now += 1.0
    w.add(2, _step(2.0, 10), width=8)
    assert w.record()["step_time_s"] == pytest.approx(1.0)


def test_training_and_the_benchmark_share_one_peak_measurement(monkeypatch):
    import jax

    from tools import benchmark

    calls = []
    monkeypatch.setattr(metrics, "cpu_peak_flops", lambda: calls.append(1) or 8e11)
    per_device, source = metrics.peak_flops_per_device()
    total, bench_source = benchmark.peak_flops(0.0)
    assert len(calls) == 2  # both asked the same function
    assert per_device == pytest.approx(8e11 / jax.local_device_count())
    assert total == pytest.approx(8e11) and metrics.CPU_PEAK_SOURCE in bench_source
    assert source == metrics.CPU_PEAK_SOURCE
    assert metrics.peak_flops_per_device(5e12) == (5e12, "config train.peak_flops")


def test_logger_in_a_bucket_appends_across_runs(gcs_bucket):  # noqa: F811
    """metrics.jsonl and TensorBoard events in a bucket (GCS emulator on loopback): an object
    cannot be appended to, so a resumed run's logger keeps what was there and adds to it."""
    workdir = f"{gcs_bucket}/run"
    first = metrics.MetricsLogger(workdir, TrainConfig(progress_bar=False), 4, 0)
    first.write(1, {"loss": 2.5})
    first.write(2, {"loss": 2.0})  # within the flush interval: written at close
    first.close()
    resumed = metrics.MetricsLogger(workdir, TrainConfig(progress_bar=False), 4, 2)
    resumed.write(3, {"loss": np.float32(1.5)})
    resumed.close()
    lines = epath.Path(workdir, "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "loss": 2.5},
        {"step": 2, "loss": 2.0},
        {"step": 3, "loss": 1.5},
    ]
    events = list(epath.Path(workdir, "tensorboard").iterdir())
    assert events and all(e.stat().length > 0 for e in events)


MIXTURE_STATS = {
    "train": {
        "format": "a: alpaca, b: messages",
        "rows_read": 1200,
        "examples": 1500,
        "dropped": {"too_long": 7, "no_loss_tokens": 2},
        "responses_truncated": 3,
        "prompts_truncated": 0,
        "split_rows": 100,
        "split_examples": 250,
        "rows": 400,
        "tokens": 190000,
        "loss_tokens": 57000,
        "packing_efficiency": 0.9276,
        "sources": {
            "a": {"examples": 900, "examples_in_epoch": 1125, "share": 0.75},
            "b": {"examples": 291, "examples_in_epoch": 375, "share": 0.25},
        },
    },
    "validation": {
        "format": "a: alpaca, b: messages",
        "rows_read": 60,
        "examples": 60,
        "dropped": {},
        "responses_truncated": 0,
        "prompts_truncated": 1,
        "split_rows": 0,
        "split_examples": 0,
        "rows": 20,
        "tokens": 9000,
        "loss_tokens": 0,
        "packing_efficiency": 0.8789,
        "sources": {"a": {"examples": 60, "share": 1.0}},
    },
    "cache": {"path": "", "hit": False},
}


def test_data_table_reads_as_a_table():
    assert metrics.data_table(MIXTURE_STATS).splitlines() == [
        "data                          train  validation",
        "rows read                     1,200          60",
        "examples kept                 1,500          60",
        "dropped                           9           0",
        "  no_loss_tokens                  2           0",
        "  too_long                        7           0",
        "conversations split       100 → 250       0 → 0",
        "responses cut                     3           0",
        "prompts cut                       0           1",
        "tokens                      190,000       9,000",
        "trained tokens       57,000 (30.0%)    0 (0.0%)",
        "packed rows                     400          20",
        "packing efficiency            92.8%       87.9%",
        "  from a                1,125 (75%)   60 (100%)",
        "  from b                  375 (25%)           -",
    ]


def test_data_table_of_a_real_build(tmp_path):
    """The table of build_splits' own stats: its keys, one dropped reason, two splits."""
    from sft_jax.data import DataSpec, build_splits, load_tokenizer

    rows = [{"instruction": f"Echo {i}.", "input": "", "output": f"{i}."} for i in range(40)]
    for i in range(0, 40, 10):
        rows[i]["output"] = " ".join(["word"] * 100)  # over max_seq_len: dropped
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    spec = DataSpec(
        train=str(path),
        validation="0.25",
        max_seq_len=64,
        too_long="drop",
        max_drop_fraction=0.5,
        cache=False,
        num_workers=0,
    )
    stats = build_splits(spec, load_tokenizer("gpt2")).stats
    lines = metrics.data_table(stats).splitlines()
    table = {" ".join(line.split()[:-2]): line.split()[-2:] for line in lines}  # one-word cells
    train, validation = stats["train"], stats["validation"]
    assert table["data"] == ["train", "validation"]
    assert table["rows read"] == [str(train["rows_read"]), str(validation["rows_read"])]
    dropped = [str(s["dropped"].get("too_long", 0)) for s in (train, validation)]
    assert table["too_long"] == dropped and sum(map(int, dropped)) == 4
    assert table["tokens"] == [f"{train['tokens']:,}", f"{validation['tokens']:,}"]
