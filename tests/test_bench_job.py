"""tools/bench_job.py: a whole sft_jax job (the real CLI) and the classic transformers
recipe on the same Alpaca rows, on a tiny model. No timing is asserted."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_TORCH = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))


def _alpaca_rows(path, n):
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            row = {"instruction": f"Add {i} and {i + 3}.", "input": "", "output": str(2 * i + 3)}
            if i % 3 == 0:
                row |= {"instruction": "Repeat the input twice.", "input": f"word{i}"}
                row["output"] = f"word{i} word{i}"
            f.write(json.dumps(row) + "\n")


@pytest.mark.skipif(not HAS_TORCH, reason="torch is a test-only dependency")
def test_job_against_classic_recipe(tmp_path, one_device_env):
    data = tmp_path / "alpaca.jsonl"
    _alpaca_rows(data, 60)
    env = one_device_env
    cmd = [
        sys.executable,
        os.path.join(ROOT, "tools", "bench_job.py"),
        "--config",
        os.path.join(ROOT, "configs", "tiny.py"),
        "--rows=40",
        "--padded",
        f"--config.data.train={data}",
        "--config.optim.warmup_steps=0",
        "--config.data.max_seq_len=64",
        "--config.train.batch_size=4",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["rows"] == 40  # the first 40 of the 60 rows
    padded, torch = r["sft_jax_padded"], r["torch"]
    # One example per row, 4 rows per batch: 10 steps each side.
    assert padded["steps"] == 10 and torch["steps"] == 5  # transformers: 8 examples a batch
    # Same rows, template and tokenizer: the same response tokens trained on both sides.
    assert padded["loss_tokens"] == torch["loss_tokens"]
    assert 0 < r["sft_jax"]["loss_tokens"] <= padded["loss_tokens"]  # packed: whole batches
    for job in (r["sft_jax"], padded, torch):
        assert job["wall_s"] > 0 and 9.0 < job["last_loss"] < 12.0  # random: near ln(50257)
    assert r["speedup"] == pytest.approx(torch["wall_s"] / r["sft_jax"]["wall_s"])
    assert "wall time, transformers / sft_jax" in proc.stdout
