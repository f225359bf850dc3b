"""Real multi-process runs: 2 processes × 2 faked CPU devices on loopback (JAX's CPU
collectives over gloo), against the same run in one process on one device. One mesh puts
a tensor axis across the two processes (both feed the same rows), one splits the batch
over them (fsdp) with tensor inside each. The processes build the data together
(sft_jax/data/hosts.py) in WORKDIR/data_cache."""

import json
import os
import subprocess
import sys

import pytest

from tests.processes import ROOT, cpu_env, run_processes

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multiprocess")]  # one reference run

ARGS = [
    "--config",
    "configs/tiny.py",
    "--config.train.steps=4",
    "--config.train.log_every=1",
    "--config.train.eval_every=2",
    "--config.checkpoint.save_every=2",
    "--config.data.train=synthetic:mix:400",
    "--config.data.validation=0.1",
    "--config.optim.warmup_steps=1",
    "--config.train.progress_bar=False",
]


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [(r["step"], r.get("loss"), r.get("eval_loss")) for r in records]


@pytest.fixture(scope="session")  # the xdist group keeps it on one worker
def single_device_run(tmp_path_factory):
    """The reference: the same run in one process on one device."""
    single = tmp_path_factory.mktemp("single")
    out = subprocess.run(
        [sys.executable, "-m", "sft_jax.main", f"--workdir={single}", *ARGS],
        cwd=ROOT,
        env=cpu_env(devices=1),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return single


@pytest.mark.parametrize(
    "mesh",
    [
        ["--config.mesh.fsdp=1", "--config.mesh.tensor=4"],
        ["--config.mesh.fsdp=2", "--config.mesh.tensor=2"],
    ],
    ids=["tensor4-across-processes", "fsdp2-tensor2"],
)
def test_two_processes_train_like_one_device(tmp_path, single_device_run, mesh):
    multi = tmp_path / "multi"
    errs = run_processes(
        lambda i, port: [
            sys.executable,
            "-m",
            "sft_jax.main",
            f"--workdir={multi}",
            *ARGS,
            *mesh,
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={i}",
        ],
        env=cpu_env(devices=2),
    )
    assert "process 1 of 2, 2 local devices" in errs[1]

    ref, got = _losses(single_device_run), _losses(multi)
    assert [r[0] for r in got] == [r[0] for r in ref] == [0, 1, 2, 3, 4]
    for (_, loss_a, eval_a), (_, loss_b, eval_b) in zip(got, ref, strict=True):
        assert (loss_a is None) == (loss_b is None)  # step 0 holds the starting eval only
        if loss_a is not None:
            assert loss_a == pytest.approx(loss_b, rel=1e-5)
        assert (eval_a is None) == (eval_b is None)
        if eval_a is not None:
            assert eval_a == pytest.approx(eval_b, rel=1e-5)
    # Only process 0 writes metrics and events; checkpoints are written together.
    assert sorted(os.listdir(multi / "checkpoints")) == ["2", "4"]
    assert len(os.listdir(multi / "tensorboard")) == 1
    # The data was built once, shared: in WORKDIR/data_cache, by both processes.
    (entry,) = os.listdir(multi / "data_cache")
    meta = json.loads((multi / "data_cache" / entry / "meta.json").read_text())
    assert meta["stats"]["train"]["rows_tokenized_by_process"] == [400, 0]  # One chunk.
