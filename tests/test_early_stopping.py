"""Early stopping (train.early_stopping_patience): the patience count, its min_delta, the
metric of checkpoint.keep_best, resuming the count, and a run that stops early end to end."""

import json
import os

import ml_collections
import pytest

from configs import default
from sft_jax import checkpoint
from sft_jax import config as config_lib
from sft_jax.early_stopping import EarlyStopping

LOSS = checkpoint.BestMetric("eval_loss")


def _stops(stopper, losses, first_step=1):
    """The steps (one evaluation each) at which `stopper` says stop."""
    return [s for s, v in enumerate(losses, first_step) if stopper.observe(s, {"eval_loss": v})]


def test_patience_evaluations_without_an_improvement_stop():
    # Improvements at 1, 2, 4; then 5 and 6 are no better than 4's 2.0: stop at 6.
    assert _stops(EarlyStopping(LOSS, patience=2), [3.0, 2.5, 2.6, 2.0, 2.0, 2.1, 1.0]) == [6]
    # min_delta 0.2: 2.5 → 2.4 → 2.35 is drift, not improvement (the reference stays 2.5).
    stopper = EarlyStopping(LOSS, patience=2, min_delta=0.2)
    assert _stops(stopper, [2.5, 2.4, 2.35]) == [3]
    assert (stopper.reference, stopper.reference_step, stopper.waited) == (2.5, 1, 2)
    # A non-finite evaluation is no improvement.
    assert _stops(EarlyStopping(LOSS, patience=1), [2.0, float("nan")]) == [2]
    # Off: never.
    assert _stops(EarlyStopping(LOSS, patience=0), [1.0, 2.0, 3.0, 4.0]) == []


def test_the_metric_of_keep_best_in_its_sense():
    accuracy = checkpoint.BestMetric.parse("max:eval_accuracy")
    stopper = EarlyStopping(accuracy, patience=1)
    assert not stopper.observe(1, {"eval_accuracy": 0.5})
    assert not stopper.observe(2, {"eval_accuracy": 0.6})  # higher is better
    assert stopper.observe(3, {"eval_accuracy": 0.55})
    with pytest.raises(ValueError, match="train.early_stopping_patience: the evaluation has no"):
        EarlyStopping(accuracy, patience=1).observe(1, {"eval_loss": 1.0})
    with pytest.raises(ValueError, match="early_stopping_min_delta=-1"):
        EarlyStopping(LOSS, patience=1, min_delta=-1)


def test_a_resumed_run_goes_on_counting(tmp_path):
    stopper = EarlyStopping(LOSS, patience=3)
    assert _stops(stopper, [2.0, 2.1]) == []
    config = ml_collections.ConfigDict(default.get_config())
    config.train.early_stopping_patience = 3
    ckpt = checkpoint.Checkpointer(str(tmp_path), writer=True)
    ckpt.save(2, {"w": [0.0]}, {"step": 2, **stopper.meta()})
    ckpt.wait()
    run = config_lib.RunConfig.parse(config)
    resumed = EarlyStopping.for_run(run.train, run.checkpoint, ckpt, start_step=2, validation=True)
    assert resumed.meta() == stopper.meta() and resumed.waited == 1
    assert _stops(resumed, [2.2, 2.3], first_step=3) == [4]  # 2 more, not 3
    with pytest.raises(ValueError, match="train.early_stopping_patience needs evaluations"):
        EarlyStopping.for_run(run.train, run.checkpoint, ckpt, start_step=2, validation=False)
    ckpt.close()


@pytest.mark.slow
def test_a_run_that_stops_improving_stops_cleanly(tmp_path, one_device_env):
    # min_delta 100: only the first evaluation sets a reference; patience 2 ends the run at
    # the third evaluation (step 3 of 50), which keeps the best of steps 1-3 beside step 3.
    from tests.test_train import _main, _records

    out = _main(
        tmp_path,
        "--config.data.train=synthetic:mix:200",
        "--config.data.max_seq_len=64",
        "--config.train.steps=50",
        "--config.train.eval_every=1",
        "--config.train.log_every=1",
        "--config.train.early_stopping_patience=2",
        "--config.train.early_stopping_min_delta=100",
        "--config.checkpoint.keep_best=eval_loss",
        "--config.checkpoint.keep=1",
        "--config.checkpoint.save_every=0",
        "--config.train.neftune_alpha=5",
        "--config.train.progress_bar=False",
        env=one_device_env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "early stopping at step 3: eval_loss has not improved by more than 100" in out.stderr
    losses = {r["step"]: r["eval_loss"] for r in _records(tmp_path) if "eval_loss" in r}
    assert max(losses) == 3
    best = min((losses[s], s) for s in (1, 2, 3))[1]
    steps = sorted(int(p) for p in os.listdir(tmp_path / "checkpoints") if p.isdigit())
    assert steps == sorted({best, 3})
    with open(tmp_path / "checkpoints" / "3" / "meta" / "metadata") as f:
        meta = json.load(f)
    assert meta["best"] == {"step": best, "metric": "eval_loss", "value": losses[best]}
    assert meta["early_stopping"]["waited"] == 2
    assert (tmp_path / "loss_curve.png").exists()  # finished as a run that reached its end
