"""The README's main command, shortened: SmolLM2 from its packaged GGUF, a few steps,
and every artefact the quickstart promises. Run as the README runs it, in a process of its
own on one CPU device (in the test process, with 8 faked devices, the compiles of the
fsdp=8 programs took four times as long) and with torch unimportable, as in the README's
runtime-only install (transformers 5.25's GGUF tokenizer reader needed torch, and only a
fresh machine saw it)."""

import json
import os
import subprocess
import sys

import pytest

from tests.test_train import ROOT

pytestmark = pytest.mark.slow


def test_quickstart_config_end_to_end(tmp_path, console_script, runtime_env):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "sft_jax.main",
            "--config",
            "configs/quickstart.py",
            f"--workdir={tmp_path}",
            "--config.train.steps=2",
            "--config.train.log_every=1",
            "--config.train.eval_every=2",
            "--config.optim.warmup_steps=1",
            "--config.data.train=synthetic:mix:200",
            "--config.eval.generations=4",
            "--config.eval.max_new_tokens=4",
            "--config.train.progress_bar=False",
        ],
        cwd=ROOT,
        env=runtime_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "over 1 devices" in run.stderr  # as on a user's CPU
    files = set(os.listdir(tmp_path))
    assert {
        "report.md",
        "loss_curve.png",
        "generations_before.jsonl",
        "generations_after.jsonl",
        "metrics.jsonl",
        "checkpoints",
        "hf",
        "tokenizer",
    } <= files
    report = (tmp_path / "report.md").read_text()
    assert "| validation loss |" in report and "| exact match (4 held-out prompts) |" in report
    before = [json.loads(line) for line in open(tmp_path / "generations_before.jsonl")]
    assert len(before) == 4 and all(r["reference"] and "response" in r for r in before)
    # The exported folder answers through sft-jax-generate with the model's chat template.
    out = subprocess.run(
        [
            console_script("sft-jax-generate"),
            "--hf",
            str(tmp_path / "hf"),
            "--prompt",
            "What is 2 + 3?",
            "--max-new-tokens",
            "4",
        ],
        cwd=ROOT,
        env=runtime_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip()
