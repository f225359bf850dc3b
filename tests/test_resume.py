"""Runs that survive: SIGKILL anywhere and SIGTERM resume to the same bits, in a local
workdir and in one in a bucket (a GCS emulator on loopback: tests/storage_emulator.py says
how the clients reach it); damaged checkpoints are skipped, divergence stops before saving,
a changed model is refused."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from etils import epath

from sft_jax import runs, train
from tests.storage_emulator import gcs_bucket, gcs_emulator  # noqa: F401 (pytest fixtures)
from tests.test_train import ROOT, _config

pytestmark = pytest.mark.slow

STEPS = 12
ARGS = [
    "--config",
    "configs/tiny.py",
    f"--config.train.steps={STEPS}",
    "--config.train.log_every=1",
    "--config.train.eval_every=0",
    "--config.checkpoint.save_every=2",
    "--config.data.train=synthetic:mix:400",
    "--config.data.validation=",
    "--config.optim.warmup_steps=2",
    "--config.train.progress_bar=False",
    "--config.train.peak_flops=1e12",  # not measured: MFU is not what these tests check
]


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
    """One persistent compilation cache for every run of the module: the first run compiles
    (the reference), the others load the same executables (about half a run's time)."""
    return tmp_path_factory.mktemp("xla_cache")


def _start(workdir, xla_cache, *extra):
    cmd = [
        sys.executable,
        "-m",
        "sft_jax.main",
        f"--workdir={workdir}",
        *ARGS,
        f"--config.train.compilation_cache_dir={xla_cache}",
        *extra,
    ]
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for_step(workdir, step, proc, timeout=300):
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stderr.read()[-2000:]}")
        if os.path.exists(path):
            with open(path) as f:
                steps = [json.loads(line)["step"] for line in f if line.strip()]
            if steps and steps[-1] >= step:
                return steps[-1]
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the run")


def _finish(workdir, xla_cache, *extra):
    proc = _start(workdir, xla_cache, *extra)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return err


def _final_params(workdir):
    run = runs.load_run(str(workdir))
    assert run.step == STEPS
    return jax.tree.leaves(jax.device_get(run.params))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, xla_cache):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    _finish(workdir, xla_cache)
    return _final_params(workdir)


def _assert_bitwise(params, reference):
    assert len(params) == len(reference)
    for a, b in zip(params, reference, strict=True):
        np.testing.assert_array_equal(a, b)


def _signal_at(workdir, xla_cache, step, signum):
    """Start a run on `workdir`, send `signum` once it has logged `step`; its stderr."""
    proc = _start(workdir, xla_cache)
    _wait_for_step(workdir, step, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def test_sigkill_and_sigterm_anywhere_then_resume_is_bitwise_the_same_run(
    tmp_path, reference, xla_cache
):
    # One run stopped three times, restarted after each stop: it must end with the
    # uninterrupted run's bits. SIGKILL (no handler runs) at step 1, before any save; SIGTERM
    # from step 3, which saves the step reached and exits 0; SIGKILL at step 10 of the run
    # resumed from that save, a save possibly half written. (A kill after a committed save,
    # mid-run, is the bucket test's.)
    code, _ = _signal_at(tmp_path, xla_cache, 1, signal.SIGKILL)
    assert code == -signal.SIGKILL
    code, err = _signal_at(tmp_path, xla_cache, 3, signal.SIGTERM)
    assert code == 0, err[-3000:]
    assert "SIGTERM received" in err and "stopped at step" in err
    stopped = int(err.split("stopped at step ")[1].split()[0])
    assert 3 <= stopped < STEPS
    assert str(stopped) in os.listdir(tmp_path / "checkpoints")
    code, err = _signal_at(tmp_path, xla_cache, 10, signal.SIGKILL)
    assert code == -signal.SIGKILL and f"at step {stopped}" in err, err[-3000:]
    err = _finish(tmp_path, xla_cache)
    assert "resumed from" in err
    _assert_bitwise(_final_params(tmp_path), reference)


def _wait_for_committed_checkpoint(checkpoints: epath.Path, proc, timeout=300) -> int:
    """The first step whose checkpoint Orbax has committed (its commit_success.txt)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stderr.read()[-2000:]}")
        if checkpoints.exists():
            done = [
                int(d.name)
                for d in checkpoints.iterdir()
                if d.name.isdigit() and (d / "commit_success.txt").exists()
            ]
            if done:
                return min(done)
        time.sleep(0.2)
    raise AssertionError("timed out waiting for a committed checkpoint")


def test_bucket_workdir_is_killed_after_a_save_and_resumes(gcs_bucket, reference, xla_cache):  # noqa: F811
    workdir = f"{gcs_bucket}/run"
    cache = f"--config.data.cache_dir={gcs_bucket}/data_cache"  # the data cache there too
    proc = _start(workdir, xla_cache, cache)
    saved = _wait_for_committed_checkpoint(epath.Path(workdir, "checkpoints"), proc)
    proc.kill()  # SIGKILL after a checkpoint is in the bucket
    proc.wait()
    assert saved < STEPS
    err = _finish(workdir, xla_cache, cache)
    assert "resumed from gs://" in err, err[-3000:]
    assert f"data: loaded from the cache {gcs_bucket}/data_cache" in err
    _assert_bitwise(_final_params(workdir), reference)
    # Everything the run writes is in the bucket, nothing in a local folder named "gs:".
    root = epath.Path(workdir)
    resumed = int(err.split("resumed from ")[1].split(" at step ")[1].split()[0])
    assert saved <= resumed < STEPS
    steps = [json.loads(line)["step"] for line in (root / "metrics.jsonl").read_text().splitlines()]
    # The killed run's first record (flushed at once; later ones every 10 s), then the
    # resumed run's appended to it.
    assert steps[0] == 1 and steps[-(STEPS - resumed) :] == list(range(resumed + 1, STEPS + 1))
    assert [f.name for f in (root / "tensorboard").iterdir()]
    assert sorted(d.name for d in (root / "checkpoints").iterdir()) == ["10", "12", "8"]  # keep=3
    assert (root / "tokenizer" / "tokenizer.json").exists()
    assert (root / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert not os.path.exists(os.path.join(ROOT, "gs:"))


def test_damaged_latest_checkpoint_falls_back_then_a_changed_model_is_refused(tmp_path, caplog):
    c = _config(
        train__steps=4,
        checkpoint__save_every=2,
        data__validation="",
        optim__warmup_steps=1,
        checkpoint__async_save=False,
        train__log_every=1,
    )
    train.train_and_evaluate(c, str(tmp_path))
    latest = tmp_path / "checkpoints" / "4" / "state"
    # Truncate every data file of the newest checkpoint, as a crash mid-write would.
    for root, _, files in os.walk(latest):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(3)
    c.train.steps = 6
    train.train_and_evaluate(c, str(tmp_path))  # resumes from 2, not 4
    assert "checkpoints/4 cannot be restored" in caplog.text
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 3, 4, 5, 6]

    # The same workdir (the run just saved step 6) with another model is refused, naming
    # the fields that differ, before any array is read.
    c.model.preset = "gpt2"  # same vocabulary, other shapes
    with pytest.raises(ValueError, match=r"different model \(d_ff: checkpoint 256 vs config 3072"):
        train.train_and_evaluate(c, str(tmp_path))


def test_divergence_stops_the_run_and_every_checkpoint_is_finite(tmp_path):
    c = _config(
        train__steps=8,
        checkpoint__save_every=1,
        data__validation="",
        optim__warmup_steps=0,
        optim__learning_rate=1e30,
        optim__decay="constant",
        train__log_every=1,
    )
    with pytest.raises(FloatingPointError, match="non-finite loss or gradient at step"):
        train.train_and_evaluate(c, str(tmp_path))
    run = runs.load_run(str(tmp_path))
    assert run.step < 8
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(run.params))
