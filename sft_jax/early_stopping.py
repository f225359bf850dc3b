"""Early stopping: `train.early_stopping_patience` evaluations in a row without the metric
improving by more than `train.early_stopping_min_delta` end the run as a finished one
(checkpoint saved, report written, exit 0), saying why.

The metric is `checkpoint.keep_best`'s (with its sense), else `eval_loss`. As in Keras'
EarlyStopping, the reference moves only on an improvement larger than min_delta, so slow
drift below it still counts as waiting. The count travels in each checkpoint's meta
(meta["early_stopping"]), so a resumed run goes on counting where it stopped.
"""

from __future__ import annotations

from absl import logging

from sft_jax import checkpoint as ckpt_lib
from sft_jax import config as config_lib


class EarlyStopping:
    """Observe each evaluation record; `observe` says when the run should stop."""

    def __init__(
        self,
        metric: ckpt_lib.BestMetric,
        patience: int,
        min_delta: float = 0.0,
        saved: dict | None = None,
    ):
        """`saved`: the meta["early_stopping"] of the checkpoint a run resumes from."""
        if patience < 0 or min_delta < 0:
            raise ValueError(
                f"train.early_stopping_patience={patience}, early_stopping_min_delta="
                f"{min_delta}: both must be >= 0 (patience 0 = off)"
            )
        self.metric, self.patience, self.min_delta = metric, patience, min_delta
        saved = saved or {}
        self.reference: float | None = saved.get("reference")  # the value to beat
        self.reference_step: int | None = saved.get("reference_step")
        self.waited: int = saved.get("waited", 0)  # evaluations since the reference

    @classmethod
    def for_run(
        cls,
        t: config_lib.TrainConfig,
        checkpoint_cfg: config_lib.CheckpointConfig,
        checkpointer: ckpt_lib.Checkpointer,
        start_step: int,
        validation: bool,
    ) -> EarlyStopping:
        """From the train.early_stopping_* keys (the metric: checkpoint.keep_best's, else
        eval_loss), carrying on the count of the checkpoint at `start_step` (if any).
        `validation`: whether the run has held-out rows to evaluate."""
        keep_best = checkpoint_cfg.keep_best
        metric = ckpt_lib.BestMetric.parse(keep_best) or ckpt_lib.BestMetric("eval_loss")
        if t.early_stopping_patience > 0 and not validation:
            raise ValueError(
                "train.early_stopping_patience needs evaluations: the run has no validation "
                "rows (set data.validation to a source or a fraction such as 0.05, or patience 0)"
            )
        saved = None
        if t.early_stopping_patience > 0 and start_step > 0:
            saved = checkpointer.restore_meta(start_step).get("early_stopping")
        return cls(metric, t.early_stopping_patience, t.early_stopping_min_delta, saved)

    @property
    def enabled(self) -> bool:
        return self.patience > 0

    @property
    def stopped(self) -> bool:
        """Whether the patience is spent (a resumed run that had stopped early)."""
        return self.enabled and self.waited >= self.patience

    def observe(self, step: int, record: dict) -> bool:
        """Count the evaluation `record` of `step`; True when the run should stop now."""
        if not self.enabled:
            return False
        value = self.metric.value(record, key="train.early_stopping_patience")
        if value is not None and self.metric.improves(value, self.reference, self.min_delta):
            self.reference, self.reference_step, self.waited = value, step, 0
            return False
        self.waited += 1  # a non-finite value is no improvement either
        if not self.stopped:
            return False
        logging.warning(
            "early stopping at step %d: %s has not improved by more than %g for %d "
            "evaluations (best %.6g at step %s); the checkpoint of step %d is saved and the "
            "run ends here",
            step,
            self.metric.name,
            self.min_delta,
            self.waited,
            self.reference if self.reference is not None else float("nan"),
            self.reference_step,
            step,
        )
        return True

    def meta(self) -> dict:
        """What a checkpoint's meta carries of this, so that a resumed run goes on counting."""
        if not self.enabled:
            return {}
        state = {"reference": self.reference, "reference_step": self.reference_step}
        return {"early_stopping": {**state, "waited": self.waited}}
