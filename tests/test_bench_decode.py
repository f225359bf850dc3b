"""tools/bench_decode.py on the real SmolLM2-135M weights (the offline asset): the JSON
contract, and both sides decoding the same greedy tokens. No timing is asserted."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_TORCH = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))


@pytest.mark.skipif(not HAS_TORCH, reason="torch is a test-only dependency")
def test_decode_against_transformers_on_smollm2(one_device_env):
    env = one_device_env
    cmd = [
        sys.executable,
        os.path.join(ROOT, "tools", "bench_decode.py"),
        "--batches=1,3",
        "--new-tokens=6",
        "--repeats=1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [x["batch"] for x in r["results"]] == [1, 3]
    for x in r["results"]:
        assert x["tokens_per_sec"] == pytest.approx(x["batch"] * 6 / x["call_s"])
        assert x["ratio"] == pytest.approx(x["tokens_per_sec"] / x["torch_tokens_per_sec"])
        assert x["first_call_s"] > 0 and x["torch_threads"] >= 1
        # Same float32 weights, same left-padded prompts: the same greedy tokens.
        assert x["greedy_agreement"] == 1.0
    assert len(set(r["results"][1]["prompt_lengths"])) > 1  # really different lengths
