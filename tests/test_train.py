"""The train loop end to end: the real `main` in a subprocess, overfitting, resume, and
config mistakes caught before anything compiles."""

import json
import os
import re
import subprocess
import sys

import pytest

from configs import tiny
from sft_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(workdir, *overrides, env=None):
    cmd = [
        sys.executable,
        "-m",
        "sft_jax.main",
        "--config",
        "configs/tiny.py",
        f"--workdir={workdir}",
        *overrides,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_main_trains_writes_outputs_and_resumes(tmp_path, one_device_env, monkeypatch):
    # On one device, as on a user's CPU (test_resume runs main over 8 faked devices).
    common = [
        "--config.train.log_every=2",
        "--config.train.eval_every=3",
        "--config.optim.warmup_steps=1",
        "--config.checkpoint.save_every=3",
        "--config.train.trackers=tensorboard,mlflow",  # MLflow's file store in the workdir
        "--config.train.label_smoothing=0.1",
    ]
    cache = tmp_path / "xla_cache"
    first = _main(
        tmp_path,
        "--config.train.steps=6",
        *common,
        "--config.train.profile_start=2",
        "--config.train.profile_steps=2",
        f"--config.train.compilation_cache_dir={cache}",
        env=one_device_env,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    # The trace of steps 2 and 3, and the compiled step kept for the next run.
    assert list((tmp_path / "profile").glob("plugins/profile/*/*.xplane.pb"))
    assert any(cache.iterdir())
    records = _records(tmp_path)
    assert [r["step"] for r in records] == [0, 2, 3, 4, 6]
    assert set(records[0]) == {"step", "eval_loss", "eval_perplexity", "eval_loss_tokens"}
    for r in records[1:]:
        if r["step"] != 3:  # step 3 is an evaluation-only record
            for key in (
                "loss",
                "learning_rate",
                "grad_norm",
                "tokens",
                "loss_tokens",
                "tokens_per_sec",
                "mfu",
            ):
                assert key in r, (key, r)
            assert 0 < r["loss_tokens"] < r["tokens"]
    assert "eval_loss" in records[2] and "eval_loss" in records[4]
    assert records[4]["eval_loss"] < records[0]["eval_loss"]
    assert "compile_s" in records[1]
    assert os.listdir(tmp_path / "tensorboard")[0].startswith("events.out.tfevents")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]
    assert "packing efficiency" in first.stdout  # the data table, for people
    # Log lines for people: the time and the message, no absl level/thread/source prefix.
    assert re.search(r"^\d\d:\d\d:\d\d done: step 6, checkpoints in ", first.stderr, re.M)
    assert not re.search(r"^I\d{4} ", first.stderr, re.M)
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # as the run sets for its own store
    client = mlflow.MlflowClient(f"file://{tmp_path}/mlruns")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    assert logged == [(r["step"], r["loss"]) for r in records if "loss" in r]

    # A second run on the same workdir resumes at the saved step and continues (loading
    # the first run's compiled step from the cache: the same programs).
    second = _main(
        tmp_path,
        "--config.train.steps=8",
        *common,
        f"--config.train.compilation_cache_dir={cache}",
        env=one_device_env,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr and "at step 6" in second.stderr
    assert [r["step"] for r in _records(tmp_path)][5:] == [8]
    assert "8" in os.listdir(tmp_path / "checkpoints")


def test_unknown_config_key_is_named_with_a_suggestion(tmp_path):
    out = _main(tmp_path, "--config.train.stepz=3")
    assert out.returncode != 0
    assert "--config.train.stepz" in out.stderr and 'did you mean "steps"' in out.stderr
    assert "Traceback" not in out.stderr


def test_s3_workdir_is_refused_before_the_data_is_built():
    """Orbax cannot checkpoint to s3://: the run says so at start, not after tokenizing
    (a synthetic data set of a million rows would take minutes to build first)."""
    out = _main("s3://bucket/run", "--config.data.train=synthetic:mix:1000000")
    assert out.returncode != 0
    assert "--workdir s3://bucket/run: Orbax" in out.stderr and "gs://" in out.stderr
    assert "Traceback" not in out.stderr and "data:" not in out.stderr


def _config(**overrides):
    c = tiny.get_config()
    c.train.progress_bar = False
    for key, value in overrides.items():
        section, name = key.split("__")
        c[section][name] = value
    return c


@pytest.mark.slow
def test_tiny_model_overfits_a_handful_of_examples(tmp_path, one_device_env):
    # On one device, as on a user's CPU: a step there takes a quarter of one over the test
    # process's 8 faked devices, and memorising does not depend on the mesh.
    out = _main(
        tmp_path,
        "--config.data.train=synthetic:mix:8",
        "--config.data.validation=",
        "--config.data.packing=False",
        "--config.data.max_seq_len=64",
        "--config.train.steps=60",
        "--config.train.log_every=5",
        "--config.optim.learning_rate=1e-2",
        "--config.optim.warmup_steps=5",
        "--config.checkpoint.save_every=0",
        "--config.train.progress_bar=False",
        env=one_device_env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    losses = [r["loss"] for r in _records(tmp_path)]
    assert losses[-1] < losses[0] / 10, losses  # memorised: falls by more than 10×


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(mesh__data=3), "3 does not divide 8"),
        (dict(train__batch_size=12), "multiple of 8"),
        (dict(train__micro_steps=3), "not divisible by train.micro_steps=3"),
        (dict(data__max_seq_len=512), "data.max_seq_len=512 exceeds the 256 positions"),
        (dict(optim__warmup_steps=10_000), "optim.warmup_steps"),
        (dict(model__preset="gpt5"), "model.preset"),
        (dict(eval__judge_url="http://localhost:11434/v1"), "eval.judge_model"),
        (dict(eval__judge_url="http://h/v1", eval__judge_model="m"), "eval.generations"),
    ],
)
def test_config_mistakes_fail_before_compiling_naming_the_key(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(_config(**overrides), str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints" / "1")
