"""A LoRA run end to end, as a user runs it: `python -m sft_jax.main … --config.lora.rank=4`
writes adapter-only checkpoints, answers the held-out prompts with the adapters applied,
exports the merged model and the PEFT folder; a run killed after a save resumes to the
same adapters bitwise; `sft-jax-export` rebuilds the base and exports both ways again;
changed LoRA settings are refused naming the key. (Against PEFT itself:
tests/test_lora_train.py.)"""

import functools
import json
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from sft_jax import hf, lora, runs
from sft_jax.cli import export
from tests.conftest import one_device_environment
from tests.test_train import _main as run_main

pytestmark = pytest.mark.slow

ARGS = [  # over configs/tiny.py
    "--config.train.steps=4",
    "--config.train.log_every=1",
    "--config.checkpoint.save_every=2",
    "--config.checkpoint.async_save=False",
    "--config.data.train=synthetic:add:120",
    "--config.data.validation=0.1",
    "--config.train.eval_every=0",
    "--config.eval.generations=2",
    "--config.eval.max_new_tokens=4",
    "--config.lora.rank=4",
    "--config.lora.alpha=8",
    "--config.optim.learning_rate=1e-2",
    "--config.optim.warmup_steps=1",
    "--config.export.adapter_dir=peft",
    "--config.export.hf_dir=hf",
    "--config.train.progress_bar=False",
    "--config.train.peak_flops=1e12",
]


def _main(workdir, xla_cache, *extra):
    """A run on one CPU device, as a user's; compiled executables shared through the cache."""
    cache = f"--config.train.compilation_cache_dir={xla_cache}"
    return run_main(workdir, *ARGS, cache, *extra, env=one_device_environment())


def _adapters(workdir):
    run = runs.load_run(str(workdir))
    return run, jax.device_get(lora.split(run.params)[1])


@pytest.fixture(scope="module")
def one_run(tmp_path_factory):
    """(workdir, XLA cache) of a finished 4-step LoRA run."""
    workdir = tmp_path_factory.mktemp("lora_run")
    xla_cache = tmp_path_factory.mktemp("xla_cache")
    out = _main(workdir, xla_cache)
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir, xla_cache


def test_checkpoints_hold_only_adapters_and_exports_agree(one_run, tmp_path):
    workdir, _ = one_run
    run, adapters = _adapters(workdir)
    assert run.lora == lora.LoraSpec(rank=4, alpha=8.0) and run.step == 4
    state_bytes = sum(p.stat().st_size for p in (workdir / "checkpoints/4/state").rglob("*"))
    assert state_bytes < 2_000_000  # adapters + Adam moments; the base alone is 13 MB
    records = [
        json.loads(x) for x in (workdir / "generations_after.jsonl").read_text().split("\n") if x
    ]
    assert len(records) == 2 and (workdir / "report.md").exists()  # answered with adapters

    # The end-of-run exports: the merged model is the run's params merged (W + s·A·B in
    # float32, rounded alike up to an ulp), the adapters nonzero.
    _, exported = hf.load_hf(str(workdir / "hf"))
    close = functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7)
    jax.tree.map(close, exported, jax.device_get(run.merged_params()))
    assert any(np.abs(a["lora_b"]).max() > 0 for a in _leaf_pairs(adapters))

    # sft-jax-export rebuilds the base from the run's seed: the same folders again.
    assert (
        export.main(["--workdir", str(workdir), "--out", str(tmp_path / "peft"), "--adapter"]) == 0
    )
    ours, theirs = (
        load_file(str(d / "adapter_model.safetensors"))
        for d in (workdir / "peft", tmp_path / "peft")
    )
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name])
    assert export.main(["--workdir", str(workdir), "--out", str(tmp_path / "hf")]) == 0
    _, again = hf.load_hf(str(tmp_path / "hf"))
    jax.tree.map(close, again, exported)


def _leaf_pairs(tree):
    if "lora_b" in tree:
        return [tree]
    return [pair for value in tree.values() for pair in _leaf_pairs(value)]


def test_resume_is_bitwise_and_changed_lora_settings_are_refused(one_run, tmp_path):
    workdir, xla_cache = one_run
    _, finished = _adapters(workdir)
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    shutil.rmtree(resumed / "checkpoints/4")  # as if killed after the save at step 2
    out = _main(resumed, xla_cache)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stderr
    _, again = _adapters(resumed)
    jax.tree.map(np.testing.assert_array_equal, again, finished)

    out = _main(resumed, xla_cache, "--config.lora.alpha=16", "--config.train.steps=6")
    assert out.returncode != 0
    assert "lora.alpha: checkpoint 8.0 vs config 16.0" in out.stderr
