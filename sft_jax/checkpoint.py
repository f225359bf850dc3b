"""Orbax checkpoints of the whole train state plus a JSON record of the run.

Layout: `WORKDIR/checkpoints/<step>/{state,meta}`. `state` is the TrainState (params,
optimizer state, step, RNG); `meta` is JSON: the data position (the step: batches are
step-indexed, so the step alone says where the data continues), the model config and the
tokenizer/template the run trained with, so tools can rebuild the model from the
checkpoint alone. Restores go into abstract arrays that carry the *current* shardings, so a
checkpoint written on one mesh loads onto another.

Retention: the newest `checkpoint.keep`, and with `checkpoint.keep_best` also the best by an
evaluation metric (`BestMetric`), which each save's meta names (meta["best"]).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from sft_jax import paths


def check_workdir(workdir: str) -> None:
    """Refuse a workdir URL that Orbax cannot write checkpoints to, saying what to use.

    Orbax builds tensorstore specs for gs:// only (`_use_gcs_driver` in its
    tensorstore_utils): it would write the arrays of s3://b/… to a local folder "s3:/b/…"
    on each host, where no other host could restore them. A mounted bucket serves as a local
    path only if the mount can rename: on a file system Orbax commits a step by renaming
    its folder, and tensorstore writes the OCDBT manifest by renaming a file; mountpoint-s3
    does not rename on general-purpose buckets, s3fs-fuse does (by copying)."""
    if not paths.is_remote(workdir) or str(workdir).startswith("gs://"):
        return
    scheme = str(workdir).split("://", 1)[0]
    raise ValueError(
        f"--workdir {workdir}: Orbax {ocp.__version__} writes checkpoints to gs:// buckets "
        f"and file systems only, not to {scheme}:// URLs. Use a gs:// workdir, or a folder "
        "on a file system every host mounts: a shared file system (NFS, Lustre, EFS, FSx) "
        "or the bucket mounted with s3fs-fuse (not mountpoint-s3: it cannot rename, which "
        "is how Orbax commits a step on a file system). Everything else may stay in the "
        f"bucket: data.train / data.validation, data.cache_dir, "
        f"model.init_from=hf:{scheme}://… and sft-jax-export --out {scheme}://…"
    )


@dataclasses.dataclass(frozen=True)
class BestMetric:
    """`checkpoint.keep_best`: the evaluation metric that ranks checkpoints and its sense."""

    name: str  # a key of the evaluation record, e.g. "eval_loss"
    higher_is_better: bool = False

    @classmethod
    def parse(cls, spec: str, key: str = "checkpoint.keep_best") -> BestMetric | None:
        """`eval_loss` (lower is better), `max:<metric>` or `min:<metric>`; "" → None."""
        if not spec:
            return None
        mode, name = spec.split(":", 1) if spec.startswith(("max:", "min:")) else ("min", spec)
        if not name or name.strip() != name:
            raise ValueError(
                f"{key}={spec!r}: name an evaluation metric, e.g. 'eval_loss' "
                "or 'max:<metric>' when higher is better"
            )
        return cls(name, higher_is_better=mode == "max")

    def score(self, value: float) -> float:
        """`value` turned so that lower is better."""
        return -value if self.higher_is_better else value

    def improves(self, value: float, on: float | None, min_delta: float = 0.0) -> bool:
        """Whether `value` beats `on` (None: nothing yet) by more than `min_delta`."""
        return on is None or self.score(on) - self.score(value) > min_delta

    def value(self, record: dict, key: str = "") -> float | None:
        """This metric in a record; None if not finite, or if the record has not got it
        and no `key` is given (else a ValueError naming that config key)."""
        if key and self.name not in record:
            raise ValueError(
                f"{key}: the evaluation has no metric {self.name!r}; it has "
                f"{sorted(k for k in record if k.startswith('eval'))}"
            )
        value = record.get(self.name)
        return None if value is None or not np.isfinite(value) else float(value)


@dataclasses.dataclass
class _KeepBest:
    """Orbax preservation policy: the checkpoint whose metrics hold the best score (lowest,
    the earliest of equals); checkpoints saved without an evaluation do not compete."""

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        del context
        scored = [(c.metrics["score"], c.step) for c in checkpoints if _scored(c.metrics)]
        best = min(scored)[1] if scored else None
        return [c.step == best for c in checkpoints]


def _scored(metrics: dict | None) -> bool:
    return bool(metrics) and "score" in metrics


class _LoopDecidesPreemption(ocp.CheckpointManager):
    """Orbax asks JAX's preemption sync point itself, also from the thread that finalizes an
    async save, with that save's older step. JAX's service keeps each host's last reported
    step, so a notice arriving just then would choose a stop step the loop has already
    passed, and the run would never stop. The train loop decides preemption saves
    (`sft_jax.preemption`): Orbax is told of none."""

    def reached_preemption(self, step: int) -> bool:
        return False


class Checkpointer:
    """A thin, typed face on `ocp.CheckpointManager` for the train loop and tools.

    With `best` (`checkpoint.keep_best`), the best checkpoint by that metric is kept beside
    the newest `keep`: saves given an evaluation record store its score as Orbax metrics
    (which a resumed run reads back), and each save's meta names the best so far
    (meta["best"] = {"step", "metric", "value"})."""

    def __init__(
        self,
        workdir: str,
        keep: int = 3,
        async_save: bool = True,
        writer: bool = False,
        best: BestMetric | None = None,
    ):
        """`writer`: the training run that owns the folder. It first deletes the unfinished
        saves a killed run left (in a bucket, a step folder without commit_success.txt,
        which a new save of that step could not overwrite); tools that only read must not,
        since a live run may be writing one."""
        check_workdir(workdir)
        self.directory = paths.join(paths.resolve(workdir), "checkpoints")
        self.best_metric = best
        retention = {"max_to_keep": keep if keep > 0 else None}
        if best is not None:
            latest = ocp.checkpoint_managers.LatestN(n=keep if keep > 0 else None)
            retention = dict(
                preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(
                    [latest, _KeepBest()]
                ),
                # Orbax writes metrics only when it ranks by them; ours ranks them itself.
                best_fn=lambda metrics: metrics.get("score", np.inf),
                best_mode="min",
            )
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=writer,
            # Process 0 lists the steps and broadcasts them: every host tries the same ones.
            single_host_load_and_broadcast=True,
            **retention,
        )
        self._manager = _LoopDecidesPreemption(self.directory, options=options)
        self._best = self._saved_best() if best is not None else None

    def _saved_best(self) -> dict | None:
        """{"step", "metric", "value"} of the best checkpoint already in the folder."""
        scored = []
        for step in self.all_steps():
            metrics = self._manager.metrics(step)
            if _scored(metrics):
                scored.append((metrics["score"], step, metrics["value"]))
        if not scored:
            return None
        _, step, value = min(scored)
        return {"step": step, "metric": self.best_metric.name, "value": value}

    @property
    def best(self) -> dict | None:
        """{"step", "metric", "value"} of the best checkpoint (None: off, or none yet)."""
        return self._best

    def improves(self, record: dict) -> bool:
        """Whether the evaluation `record` beats the best checkpoint's metric: the train loop
        then saves, so that the best evaluation has a checkpoint."""
        if self.best_metric is None:
            return False
        value = self.best_metric.value(record, key="checkpoint.keep_best")
        best = None if self._best is None else self._best["value"]
        return value is not None and self.best_metric.improves(value, best)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(
        self, step: int, state: Any, meta: dict, force: bool = False, record: dict | None = None
    ) -> bool:
        """Save if `step` is on the interval (or `force`); returns whether a save started.
        `record`: the evaluation of this step's params, if any (ranks it for keep_best)."""
        metrics, best = self._ranked(step, record or {})
        if best is not None:
            meta = {**meta, "best": best}
        started = self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=force,
            metrics=metrics,
        )
        if started:
            self._best = best
        return started

    def _ranked(self, step: int, record: dict) -> tuple[dict | None, dict | None]:
        """(Orbax metrics of a save at `step`, {} when it is not ranked; the best checkpoint
        once it is saved)."""
        if self.best_metric is None:
            return None, None
        value = self.best_metric.value(record)
        if value is None:
            return {}, self._best
        best = self._best
        if self.improves(record):
            best = {"step": step, "metric": self.best_metric.name, "value": value}
        return {"score": self.best_metric.score(value), "value": value}, best

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """The state at `step`, laid out as `abstract_state` (ShapeDtypeStructs with shardings)."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], restored["meta"]

    def restore_latest_good(
        self, abstract_state: Any, validate: Callable[[dict], None] | None = None
    ) -> tuple[Any, dict, int] | None:
        """(state, meta, step) of the newest checkpoint that every process restores; a
        damaged newer one (killed mid-write, truncated, disk full) is skipped with a warning.
        None if there is no checkpoint at all. `validate(meta)` may raise to refuse an
        incompatible run; that error is not mistaken for damage.

        Each process reads only its own shards, so damage can be visible to one host only:
        every process tries, then all agree (a collective) before any of them accepts a
        step, and so all restore the same step or none does."""
        steps = sorted(self.all_steps(), reverse=True)  # process 0's list, broadcast
        for step in steps:
            meta = self._try(step, "has no readable metadata", self._read, step, "meta", None)
            if not self._everywhere(meta is not None, step):
                continue
            if validate is not None:
                validate(meta)  # the same file on every host: the same verdict
            state = self._try(step, "cannot be restored", self._read, step, "state", abstract_state)
            if self._everywhere(state is not None, step):
                return state, meta, step
        if steps:
            raise ValueError(
                f"none of the checkpoints {sorted(steps)} in {self.directory} can be restored; "
                "move the folder away to start afresh"
            )
        return None

    def _try(self, step: int, failure: str, read: Callable, *args) -> Any:
        """`read(*args)`, or None (with a warning) when this process cannot read it."""
        try:
            return read(*args)
        except Exception as e:  # orbax/tensorstore raise many types for damaged files
            logging.warning(
                "checkpoint %s/%d %s on process %d (%s: %s); trying the previous one",
                self.directory,
                step,
                failure,
                jax.process_index(),
                type(e).__name__,
                str(e)[:300],
            )
            return None

    def _read(self, step: int, item: str, abstract_state: Any) -> Any:
        """This process's part of one item of a checkpoint ("meta", or "state" laid out as
        `abstract_state`). Through the handlers, not the manager: the manager's restore
        ends in a barrier that a process whose read failed would never reach, leaving the
        others waiting there."""
        path = epath.Path(self.directory) / str(step) / item
        if item == "meta":
            return ocp.JsonCheckpointHandler().restore(path, args=ocp.args.JsonRestore())
        handler = ocp.StandardCheckpointHandler()
        try:
            return handler.restore(path, args=ocp.args.StandardRestore(abstract_state))
        finally:
            handler.close()

    @staticmethod
    def _everywhere(ok: bool, step: int) -> bool:
        """Whether `ok` holds on every process (a collective: all processes call it)."""
        if jax.process_count() == 1:
            return ok
        oks = np.asarray(multihost_utils.process_allgather(np.int32(ok))).reshape(-1)
        if ok and not oks.all():
            logging.warning(
                "checkpoint %d cannot be read on processes %s; every process tries the "
                "previous one",
                step,
                np.flatnonzero(oks == 0).tolist(),
            )
        return bool(oks.all())

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only the params of the state at `step` (no optimizer state is read): for export
        and inference. `abstract_params` carries the target shardings."""
        restore_args = jax.tree.map(
            lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), abstract_params
        )
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    {"params": abstract_params},
                    restore_args={"params": restore_args},
                    partial_restore=True,
                )
            ),
        )
        return restored["state"]["params"]

    def stored_params(self, step: int) -> dict:
        """The params of the state at `step` as a tree of `StoredArray`s: nothing is read
        until a leaf (or one layer of it) is asked for, on this host, whatever mesh wrote
        it. For a one-host export of a run too big to restore whole."""
        directory = epath.Path(self.directory) / str(step) / "state"
        tree = ocp.PyTreeCheckpointHandler().metadata(directory).tree
        use_ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(directory)
        # One chunk read and decoded at a time: the memory bound of `StoredArray`.
        context = ocp.type_handlers.get_ts_context(
            use_ocdbt=use_ocdbt, file_io_concurrency_limit=1, data_copy_concurrency_limit=1
        )

        def stored(m) -> StoredArray:
            info = ocp.type_handlers.ParamInfo(
                name=m.name, parent_dir=directory, is_ocdbt_checkpoint=use_ocdbt, ts_context=context
            )
            spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=use_ocdbt)
            return StoredArray(spec, context, tuple(m.shape), m.dtype)

        return jax.tree.map(stored, tree["params"])

    def restore_meta(self, step: int) -> dict:
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_with_shardings(abstract_tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs that carry the target shardings: the restore target."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings
    )


class StoredArray:
    """One array of a checkpoint, read from its files when indexed: `x[i]` reads row i
    (one layer of a stacked leaf), `np.asarray(x)` all of it. Tensorstore reads only the
    chunks that hold what is asked (Orbax writes one chunk per device's shard), decodes
    them one at a time and keeps none."""

    def __init__(self, spec: dict, context, shape: tuple[int, ...], dtype):
        self.shape, self.dtype, self.ndim = shape, np.dtype(dtype), len(shape)
        self._spec, self._context = spec, context

    def __getitem__(self, index) -> np.ndarray:
        import tensorstore as ts

        store = ts.open(self._spec, context=self._context, read=True).result()
        return np.asarray(store[index].read().result())

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[...]
        return whole if dtype is None else whole.astype(dtype)
