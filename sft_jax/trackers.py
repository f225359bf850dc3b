"""Experiment trackers beside metrics.jsonl: TensorBoard events, Weights & Biases and MLflow
(`train.trackers`), each given the same scalars, the config as run parameters, and the
run's report and loss curve as files at the end. A resumed run continues the same tracker
run (their ids kept in WORKDIR/trackers.json). `metrics.MetricsLogger` drives them.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from etils import epath

from sft_jax import paths


class TensorBoardEvents:
    """A tensorboardX writer for `directory`. For a bucket it writes to a local folder that
    `flush` copies up: tensorboardX's own gs:// writer uploads once more when it is
    garbage-collected, which hangs a run's exit for minutes if the network is gone."""

    def __init__(self, directory: str):
        from tensorboardX import SummaryWriter  # imported here: only process 0 needs it

        self._directory = directory
        remote = paths.is_remote(directory)
        self._local = tempfile.mkdtemp(prefix="sft_jax-tensorboard-") if remote else ""
        self.writer = SummaryWriter(self._local or directory)

    def flush(self) -> None:
        self.writer.flush()
        if self._local:
            paths.upload(self._local, self._directory)

    def close(self) -> None:
        self.writer.close()
        if self._local:
            paths.upload(self._local, self._directory)
            shutil.rmtree(self._local, ignore_errors=True)


TRACKERS = ("tensorboard", "wandb", "mlflow")
# What a finished run leaves in its work directory for the trackers to keep (if it is there).
RUN_ARTIFACTS = ("report.md", "loss_curve.png")


def tracker_names(trackers: str | Sequence[str]) -> tuple[str, ...]:
    """`train.trackers` as names: a tuple ("tensorboard", "wandb") or a comma-separated
    string ("tensorboard,wandb", as --config.train.trackers=tensorboard,wandb gives it)."""
    parts = [trackers] if isinstance(trackers, str) else list(trackers)
    names = tuple(n.strip() for part in parts for n in part.split(",") if n.strip())
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ValueError(f"train.trackers: unknown {unknown}; choose from {TRACKERS}")
    return tuple(dict.fromkeys(names))


def check_trackers(trackers: str | Sequence[str]) -> tuple[str, ...]:
    """`tracker_names(trackers)`, each one's package imported: a bad name or a missing
    package fails here (config.check), before the run builds its data."""
    names = tracker_names(trackers)
    for name in names:
        if name != "tensorboard":
            _import_tracker(name)
    return names


def _import_tracker(name: str):
    """The tracker's package, or an error saying how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ValueError(
            f"train.trackers has {name!r} but the {name} package is not installed: "
            f"pip install 'sft_jax[{name}]' (or drop {name!r} from train.trackers)"
        ) from e


def flat_config(config: dict, prefix: str = "") -> dict[str, Any]:
    """{"optim": {"name": "adamw"}} → {"optim.name": "adamw"}: the config as run parameters."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class RunIds:
    """Each tracker's run id, kept in WORKDIR/trackers.json so that a resumed run goes on
    in the same tracker run rather than starting a second one."""

    def __init__(self, workdir: str):
        self._file = epath.Path(paths.join(workdir, "trackers.json"))

    def get(self, tracker: str) -> str:
        return self._read().get(tracker, "")

    def set(self, tracker: str, run_id: str) -> None:
        self._file.write_text(json.dumps(self._read() | {tracker: run_id}), encoding="utf-8")

    def _read(self) -> dict[str, str]:
        return json.loads(self._file.read_text(encoding="utf-8")) if self._file.exists() else {}


def _local_copy(path: str, folder: str) -> str:
    """`path` as a local file (a bucket object copied into `folder`)."""
    if not paths.is_remote(path):
        return path
    local = os.path.join(folder, os.path.basename(path))
    with open(local, "wb") as f:
        f.write(epath.Path(path).read_bytes())
    return local


class TensorBoardTracker:
    """Scalars as TensorBoard events in WORKDIR/tensorboard."""

    def __init__(self, workdir: str):
        self._events = TensorBoardEvents(paths.join(workdir, "tensorboard"))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self._events.writer.add_scalar(key, value, step)

    def flush(self) -> None:
        self._events.flush()

    def save_files(self, files: list[str]) -> None:
        del files  # the report and the curve are beside the events already

    def close(self) -> None:
        self._events.close()


class WandbTracker:
    """A Weights & Biases run: the scalars as its history, the config as its config, the
    report and loss curve as its files. WANDB_MODE=offline (or `wandb offline`) keeps it on
    disk for `wandb sync`; WANDB_ENTITY and the other WANDB_* variables apply as usual."""

    def __init__(self, workdir: str, project: str, run_name: str, config: dict):
        wandb = _import_tracker("wandb")
        ids = RunIds(workdir)
        local = None if paths.is_remote(workdir) else workdir
        self._run = wandb.init(
            project=project,
            name=run_name,
            id=ids.get("wandb") or None,
            resume="allow",
            config=config,
            dir=local,
        )
        ids.set("wandb", self._run.id)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self._run.log(scalars, step=step)

    def flush(self) -> None:
        pass  # the run's own process sends as it goes

    def save_files(self, files: list[str]) -> None:
        with tempfile.TemporaryDirectory() as folder:
            for f in files:
                local = _local_copy(f, folder)
                self._run.save(local, base_path=os.path.dirname(local), policy="now")

    def close(self) -> None:
        self._run.finish()


class MlflowTracker:
    """An MLflow run in experiment `project`: the scalars as its metrics, the config as its
    params (flattened: optim.learning_rate …), the report and loss curve as its artifacts.
    The tracking server is `tracking_uri`, else $MLFLOW_TRACKING_URI, else a local file
    store in WORKDIR/mlruns (`mlflow ui --backend-store-uri WORKDIR/mlruns` shows it)."""

    MAX_BATCH = 100  # params or metrics per log_batch request (MLflow's limit)
    MAX_PARAM_CHARS = 6000  # MLflow's limit on a param's value

    def __init__(self, workdir: str, project: str, run_name: str, config: dict, tracking_uri=""):
        mlflow = _import_tracker("mlflow")
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
        if not uri:
            if paths.is_remote(workdir):
                raise ValueError(
                    "train.trackers has 'mlflow' and the work directory is a bucket: set "
                    "train.mlflow_tracking_uri (or MLFLOW_TRACKING_URI) to a tracking server"
                )
            uri = "file://" + os.path.join(paths.resolve(workdir), "mlruns")
        if uri.startswith("file:"):  # MLflow 3 asks for this opt-in to its file store
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self._entities = importlib.import_module("mlflow.entities")
        self._client = mlflow.MlflowClient(uri)
        ids = RunIds(workdir)
        self._run_id = ids.get("mlflow")
        if not self._run_id:
            experiment = self._client.get_experiment_by_name(project)
            experiment_id = (
                experiment.experiment_id if experiment else self._client.create_experiment(project)
            )
            self._run_id = self._client.create_run(experiment_id, run_name=run_name).info.run_id
            ids.set("mlflow", self._run_id)
            # A run's params cannot change: they are the config it started with.
            params = [
                self._entities.Param(k, str(v)[: self.MAX_PARAM_CHARS])
                for k, v in flat_config(config).items()
            ]
            for i in range(0, len(params), self.MAX_BATCH):
                self._client.log_batch(self._run_id, params=params[i : i + self.MAX_BATCH])

    def log(self, step: int, scalars: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        metrics = [self._entities.Metric(k, float(v), now, step) for k, v in scalars.items()]
        for i in range(0, len(metrics), self.MAX_BATCH):
            self._client.log_batch(self._run_id, metrics=metrics[i : i + self.MAX_BATCH])

    def flush(self) -> None:
        pass  # each log is a request of its own

    def save_files(self, files: list[str]) -> None:
        with tempfile.TemporaryDirectory() as folder:
            for f in files:
                self._client.log_artifact(self._run_id, _local_copy(f, folder))

    def close(self) -> None:
        self._client.set_terminated(self._run_id)


def make_trackers(
    names: Sequence[str],
    workdir: str,
    project: str = "sft_jax",
    config: dict | None = None,
    mlflow_tracking_uri: str = "",
) -> list:
    """The trackers `names` (`tracker_names`) for a run in `workdir`, named after it."""
    run_name = os.path.basename(workdir.rstrip("/")) or "sft_jax"
    made = []
    for name in names:
        if name == "tensorboard":
            made.append(TensorBoardTracker(workdir))
        elif name == "wandb":
            made.append(WandbTracker(workdir, project, run_name, config or {}))
        else:
            made.append(
                MlflowTracker(workdir, project, run_name, config or {}, mlflow_tracking_uri)
            )
    return made
