"""The README's main command, shortened: SmolLM2 from its packaged GGUF, a few steps,
and every artefact the quickstart promises."""

import json
import os
import subprocess

import pytest

from configs import quickstart
from sft_jax import train
from tests.test_train import ROOT

pytestmark = pytest.mark.slow


def test_quickstart_config_end_to_end(tmp_path, console_script):
    c = quickstart.get_config()
    c.train.steps, c.train.log_every, c.train.eval_every = 2, 1, 2
    c.optim.warmup_steps = 1
    c.data.train = "synthetic:mix:200"
    c.eval.generations, c.eval.max_new_tokens = 4, 4
    c.train.progress_bar = False
    train.train_and_evaluate(c, str(tmp_path))
    files = set(os.listdir(tmp_path))
    assert {"report.md", "loss_curve.png", "generations_before.jsonl", "generations_after.jsonl",
            "metrics.jsonl", "checkpoints", "hf", "tokenizer"} <= files  # fmt: skip
    report = (tmp_path / "report.md").read_text()
    assert "| validation loss |" in report and "| exact match (4 held-out prompts) |" in report
    before = [json.loads(line) for line in open(tmp_path / "generations_before.jsonl")]
    assert len(before) == 4 and all(r["reference"] and "response" in r for r in before)
    # The exported folder answers through sft-jax-generate with the model's chat template.
    out = subprocess.run(
        [console_script("sft-jax-generate"), "--hf", str(tmp_path / "hf"),
         "--prompt", "What is 2 + 3?", "--max-new-tokens", "4"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip()
