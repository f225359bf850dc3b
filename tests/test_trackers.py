"""Experiment trackers beside TensorBoard (train.trackers): Weights & Biases in offline mode
and MLflow on a local file store, no network. Each gets the scalars of metrics.jsonl, the
config as run parameters and, at close, the report and loss curve; a resumed run goes on in
the same tracker run."""

import glob
import json
import os
import struct
import sys

import pytest

from sft_jax import metrics, trackers
from sft_jax.config import TrainConfig
from tests.run_config import model_config, parse

RUN_CONFIG = {"optim": {"name": "muon", "learning_rate": 0.01}, "train": {"steps": 4}}


def log_a_run(workdir, trackers, start_step=0, steps=(1, 2), config=RUN_CONFIG):
    """A logger's life in a run: records, then (as evaluate.finish leaves them) the report
    and the loss curve, then close. Returns what metrics.jsonl holds."""
    train = TrainConfig(progress_bar=False, trackers=trackers)
    logger = metrics.MetricsLogger(str(workdir), train, 4, start_step, run_config=config)
    for step in steps:
        logger.write(step, {"loss": 3.0 / step, "eval_loss": 2.5 / step, "tokens": 100.0 * step})
    (workdir / "report.md").write_text(f"# report after step {steps[-1]}\n")
    (workdir / "loss_curve.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    logger.close()
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_tracker_names_take_a_tuple_or_commas_and_name_the_key():
    assert trackers.tracker_names(("tensorboard", "wandb")) == ("tensorboard", "wandb")
    assert trackers.tracker_names("tensorboard, mlflow") == ("tensorboard", "mlflow")
    assert trackers.tracker_names(("tensorboard,wandb", "wandb")) == ("tensorboard", "wandb")
    assert trackers.tracker_names(()) == ()
    with pytest.raises(ValueError, match=r"train.trackers.*'comet'.*tensorboard"):
        trackers.tracker_names("tensorboard,comet")


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_a_missing_package_names_the_key_and_the_extra(name, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError
    with pytest.raises(ValueError, match=rf"train.trackers.*pip install 'sft_jax\[{name}\]'"):
        metrics.MetricsLogger(
            str(tmp_path), TrainConfig(progress_bar=False, trackers=(name,)), 4, 0
        )


def wandb_records(run_file: str) -> list:
    """The records of a W&B run file (run-<id>.wandb, as an offline run leaves it): W&B's
    LevelDB-style log of 32 KiB blocks, each record one or more chunks behind a 7-byte
    header (crc32, length, kind: 1 whole, 2 first, 3 middle, 4 last), each a protobuf
    `Record`."""
    from wandb.proto import wandb_internal_pb2

    data = open(run_file, "rb").read()
    assert data[:4] == b":W&B", "not a W&B run file"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or kind == 0:  # a block's zero-filled tail
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_run(workdir) -> tuple[dict, dict, set]:
    """({step: scalars}, config, file names) of every offline W&B run file in `workdir`."""
    history, config, files = {}, {}, set()
    for run_file in sorted(glob.glob(f"{workdir}/wandb/offline-run-*/run-*.wandb")):
        for record in wandb_records(run_file):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                items = {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in record.history.item
                }
                step = items.pop("_step")
                history[step] = {k: v for k, v in items.items() if not k.startswith("_")}
            elif kind == "run":
                config |= {i.key: json.loads(i.value_json) for i in record.run.config.update}
            elif kind == "files":
                files |= {f.path for f in record.files.files}
    return history, config, files


def test_wandb_offline_run_gets_the_scalars_config_and_files(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    log_a_run(tmp_path, ("tensorboard", "wandb"))
    run_id = json.loads((tmp_path / "trackers.json").read_text())["wandb"]
    # Resumed: the same W&B run goes on (its id kept in the work directory).
    lines = log_a_run(tmp_path, "tensorboard,wandb", start_step=2, steps=(3,))
    wandb.teardown()  # its service process writes the run file: wait until it has
    assert json.loads((tmp_path / "trackers.json").read_text())["wandb"] == run_id
    assert all(p.endswith(f"-{run_id}") for p in glob.glob(f"{tmp_path}/wandb/offline-run-*"))
    history, config, files = wandb_run(tmp_path)
    assert history == {line.pop("step"): line for line in lines}
    assert config["optim"] == RUN_CONFIG["optim"] and config["train"] == RUN_CONFIG["train"]
    assert {"report.md", "loss_curve.png"} <= files
    assert os.listdir(tmp_path / "tensorboard")  # TensorBoard beside it


def test_mlflow_file_store_gets_the_scalars_params_and_artifacts(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    log_a_run(tmp_path, ("mlflow",))
    # Resumed with a longer run: the same MLflow run, its params those it started with.
    longer = RUN_CONFIG | {"train": {"steps": 6}}
    lines = log_a_run(tmp_path, ("mlflow",), start_step=2, steps=(3,), config=longer)
    client = mlflow.MlflowClient(f"file://{tmp_path}/mlruns")
    (experiment,) = [e for e in client.search_experiments() if e.name == "sft_jax"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == json.loads((tmp_path / "trackers.json").read_text())["mlflow"]
    assert run.info.run_name == tmp_path.name and run.info.status == "FINISHED"
    for key in ("loss", "eval_loss", "tokens"):
        logged = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(logged) == [(line["step"], line[key]) for line in lines]
    assert run.data.params == {
        "optim.name": "muon",
        "optim.learning_rate": "0.01",
        "train.steps": "4",
    }
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"report.md", "loss_curve.png"}
    report = client.download_artifacts(run.info.run_id, "report.md", str(tmp_path / "back"))
    assert open(report).read() == "# report after step 3\n"  # the resumed run's, replaced
    assert not (tmp_path / "tensorboard").exists()  # only the trackers asked for


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("train.trackers", ("tensorboard", "neptune"), r"train.trackers.*'neptune'"),
        ("train.label_smoothing", 1.0, r"train.label_smoothing=1.0 must be in \[0, 1\)"),
        ("optim.name", "adamax", r"optim.name.*'adamax'.*muon"),
    ],
)
def test_config_check_refuses_bad_keys_before_the_data(key, value, message):
    from configs import default
    from sft_jax import config as config_lib

    c = default.get_config()
    section, name = key.split(".")
    c[section][name] = value
    with pytest.raises(ValueError, match=message):
        config_lib.check(parse(c), model_config(c), {"data": 1, "fsdp": 1, "tensor": 1})
