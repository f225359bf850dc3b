"""tools/benchmark.py: the command-line contract (last line one JSON object) and figures
that agree with each other, on a tiny model for two steps. No timing is asserted."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "benchmark.py")
HAS_TORCH = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))


def _run(env: dict, *flags: str) -> tuple[dict, str]:
    cmd = [
        sys.executable,
        TOOL,
        "--config",
        os.path.join(ROOT, "configs", "bench.py"),
        "--steps=2",
        "--warmup=0",
        "--config.data.train=synthetic:mix:200",
        "--config.data.max_seq_len=64",
        *flags,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    return json.loads(lines[-1]), proc.stdout


def _check_sft_jax(r: dict, batch: int, seq: int) -> None:
    for key in ("tokens_per_sec", "step_time_s", "mfu", "peak_rss_mb", "compile_s"):
        assert isinstance(r[key], float) and r[key] > 0, key
    assert r["tokens_per_sec"] == pytest.approx(batch * seq / r["step_time_s"], rel=1e-6)
    assert 0 < r["loss_tokens_per_sec"] <= r["useful_tokens_per_sec"] <= r["tokens_per_sec"]
    assert r["mfu"] == pytest.approx(
        r["flops_per_token"] * r["tokens_per_sec"] / r["peak_flops"], rel=1e-6
    )
    assert r["step_time_s"] == pytest.approx(sum(r["step_times_s"]) / 2, rel=1e-6)
    assert r["peak_device_mb"] is None  # CPU
    # A random model starts near ln(vocab) (GPT-2's 50257 tokens: 10.8).
    assert 9.5 < r["first_loss"] < 12.5


@pytest.mark.skipif(not HAS_TORCH, reason="torch is a test-only dependency")
def test_contract_with_torch_and_padding(one_device_env):
    r, out = _run(
        one_device_env,
        "--config.model.preset=tiny",
        "--config.train.batch_size=2",
        "--compare-torch",
        "--compare-padding",
    )
    _check_sft_jax(r, 2, 64)
    assert r["preset"] == "tiny" and r["batch_size"] == 2 and r["seq_len"] == 64
    # Every figure names the CPU it came from (README rows quote it): model, cores, vectors.
    assert re.fullmatch(r".+, \d+ cores, .+", r["host_cpu"]), r["host_cpu"]
    assert f"host CPU: {r['host_cpu']}" in out
    for key in ("torch_tokens_per_sec", "torch_step_time_s", "torch_mfu", "torch_peak_rss_mb"):
        assert r[key] > 0, key
    assert r["ratio"] == pytest.approx(r["tokens_per_sec"] / r["torch_tokens_per_sec"])
    assert r["torch_model"] == "GPT2LMHeadModel"
    # Same batches, same masked loss, both models random: both start near ln(vocab).
    assert abs(r["first_loss"] - r["torch_first_loss"]) < 0.5
    # Padding: every padded batch is exactly as wide as its longest example.
    assert all(0 < w <= 64 for w in r["padded_widths"])
    assert 0 < r["padded_real_fraction"] <= 1 and 0 < r["real_fraction"] <= 1
    assert r["packing_speedup"] == pytest.approx(
        r["useful_tokens_per_sec"] / r["padded_useful_tokens_per_sec"]
    )
    assert "ratio: sft_jax / torch" in out


@pytest.mark.skipif(not HAS_TORCH, reason="torch is a test-only dependency")
def test_mixture_of_experts_against_transformers(one_device_env):
    """The MoE benchmark row: tiny-moe against transformers' Qwen3MoeForCausalLM on the same
    batches; MFU counts the active parameters only (k of the experts)."""
    from sft_jax.model import GPTConfig

    r, _ = _run(
        one_device_env,
        "--config.model.preset=tiny-moe",
        "--config.train.batch_size=2",
        "--compare-torch",
    )
    _check_sft_jax(r, 2, 64)
    assert r["torch_model"] == "Qwen3MoeForCausalLM" and r["torch_trainable_params"] > 0
    assert r["ratio"] == pytest.approx(r["tokens_per_sec"] / r["torch_tokens_per_sec"])
    assert abs(r["first_loss"] - r["torch_first_loss"]) < 0.5
    cfg = GPTConfig.preset("tiny-moe")
    assert r["flops_per_token"] == cfg.flops_per_token(64)
    assert cfg.num_params(active=True) < cfg.num_params()


def test_measured_peak_is_the_best_of_runs_for_the_time_given():
    from sft_jax import metrics

    start = time.perf_counter()
    flops = metrics.measure_matmul_flops(128, repeats=1, seconds=0.3)
    assert time.perf_counter() - start >= 0.3 and flops > 0


@pytest.mark.skipif(
    not (HAS_TORCH and importlib.util.find_spec("peft")), reason="torch, peft: test-only"
)
def test_qlora_random_batches_against_full_finetuning_and_peft(one_device_env):
    from sft_jax.model import GPTConfig

    r, out = _run(
        one_device_env,
        "--config.model.preset=tiny-llama",
        "--config.train.batch_size=2",
        "--config.lora.rank=4",
        "--config.lora.quantize=nf4",
        "--config.lora.targets=q_proj,v_proj,down_proj",
        "--batches=random",
        "--compare-torch",
    )
    _check_sft_jax(r, 2, 64)
    # The CPU peak is measured before and after the steps; MFU takes the higher.
    peaks = re.findall(r"peak(?: after the steps)?: ([0-9.]+) GFLOP/s", out)
    assert len(peaks) == 2
    assert r["peak_flops"] / 1e9 == pytest.approx(max(map(float, peaks)), abs=0.06)
    # Random rows: every position is real and in the loss.
    assert r["useful_tokens_per_sec"] == pytest.approx(r["tokens_per_sec"])
    assert r["loss_tokens_per_sec"] == pytest.approx(r["tokens_per_sec"])
    assert r["lora_rank"] == 4 and r["lora_quantize"] == "nf4"
    # A frozen base takes no weight gradients: 4 FLOPs per weight, not 6.
    cfg = GPTConfig.preset("tiny-llama")
    assert r["flops_per_token"] == cfg.flops_per_token(64, frozen_layers=True)
    # Full fine-tuning of the same model on the same batches, in its own process.
    assert r["full_tokens_per_sec"] == pytest.approx(2 * 64 / r["full_step_time_s"], rel=1e-6)
    assert r["full_mfu"] == pytest.approx(
        cfg.flops_per_token(64) * r["full_tokens_per_sec"] / r["peak_flops"], rel=1e-6
    )
    assert r["full_peak_rss_mb"] > 0 and 9.5 < r["full_first_loss"] < 12.5
    assert r["lora_speedup"] == pytest.approx(r["full_step_time_s"] / r["step_time_s"])
    # PEFT trains the same adapters: the same layers at the same rank, as many weights.
    assert r["torch_model"] == "PeftModelForCausalLM(LlamaForCausalLM)"
    adapted = 2 * (4 * (64 + 64) + 4 * (64 + 32) + 4 * (192 + 64))  # 2 layers × q, v, down
    assert r["trainable_params"] == r["torch_trainable_params"] == adapted
    # B starts at zero on both sides: each starts as its random base, near ln(vocab).
    assert abs(r["first_loss"] - r["torch_first_loss"]) < 0.5
    assert r["rss_ratio"] == pytest.approx(r["peak_rss_mb"] / r["torch_peak_rss_mb"])
    assert "LoRA step vs full fine-tuning step" in out and "peak RSS sft_jax / torch" in out
