"""sft_jax/cli/plan.py (sft-jax-plan): per-device parameter and optimizer bytes equal what
training holds; --device says whether a plan fits; --lower lowers for TPU."""

import os
import re
import subprocess

import jax
import pytest

from configs import tiny
from sft_jax import memory_plan, sharding, train
from sft_jax.cli import plan
from sft_jax.model import GPT
from tests import required
from tests.run_config import parse


def _shard_bytes(tree):
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("mesh", [(1, 8, 1), (1, 2, 4), (2, 2, 2)])
def test_planned_bytes_equal_the_real_shards(mesh):
    c = tiny.get_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    p = memory_plan.plan(parse(c), 8)
    assert p["mesh"] == dict(zip(("data", "fsdp", "tensor"), mesh, strict=True)) | {"expert": 1}
    fns = train.build_steps(GPT(p["model"]), p["tx"], p["schedule"], sharding.make_mesh(*mesh))
    with fns.context():
        state = fns.init(jax.random.key(0))
    assert p["terms"]["parameters"] == _shard_bytes(state.params)
    assert p["terms"]["optimizer state"] == _shard_bytes(state.opt_state)
    assert p["total"] == sum(p["terms"].values())


def test_a_mesh_that_does_not_cover_the_devices_is_refused():
    c = tiny.get_config()
    c.mesh.data, c.mesh.fsdp = 3, 1
    with pytest.raises(SystemExit, match="does not cover 8 devices"):
        memory_plan.plan(parse(c), 8)


def test_the_command_line_prints_the_plan_and_whether_it_fits(console_script):
    tiny_py = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py")
    command = [
        console_script("sft-jax-plan"),
        "--config",
        tiny_py,
        "--devices",
        "8",
        "--config.mesh.fsdp=2",
        "--config.mesh.tensor=4",
    ]
    fits = subprocess.run(
        [*command, "--device", "v5p"], capture_output=True, text=True, timeout=300
    )
    assert fits.returncode == 0, fits.stderr[-2000:]
    assert "mesh {'data': 1, 'fsdp': 2, 'expert': 1, 'tensor': 4}" in fits.stdout
    assert "per device, biggest first:" in fits.stdout
    for term in ("parameters", "optimizer state", "gradients", "activations kept", "total"):
        assert term in fits.stdout
    assert "fits in 95.0 GiB per device (headroom" in fits.stdout
    # 1 MB cannot hold it: the exit says so, for scripts.
    tight = subprocess.run(
        [*command, "--device", "1MB"], capture_output=True, text=True, timeout=300
    )
    assert tight.returncode == 2 and "does NOT fit in 0.0 GiB" in tight.stdout


def test_a_missing_config_is_a_flags_error(capsys):
    with pytest.raises(SystemExit) as e:
        plan.main(["--devices", "8"])
    assert e.value.code == 1 and "--config" in capsys.readouterr().err


def _splash_llama(mesh):
    c = tiny.get_config()
    c.model.preset, c.model.attention, c.model.dtype = "tiny-llama", "splash", "bfloat16"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    return c


@pytest.mark.parametrize("mesh", [(1, 8, 1), (2, 2, 2)])
def test_train_step_with_splash_lowers_for_tpu_on_faked_devices(mesh):
    # The TPU kernel (not interpret mode) over 8 devices: it takes whole 128-token blocks
    # and XLA cannot partition it, so it must run per shard inside shard_map.
    c = _splash_llama(mesh)
    lowered = plan.lower_train_step(parse(c), memory_plan.plan(parse(c), 8), "tpu")
    text = lowered.as_text()
    assert "tpu_custom_call" in text  # the Mosaic kernel, forward and backward
    assert "shard_map" in text or "manual" in text  # it runs per shard


def test_lower_command_exits_nonzero_with_the_lowering_error(console_script, one_device_env):
    tiny_py = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py")
    common = [
        console_script("sft-jax-plan"),
        "--config",
        tiny_py,
        "--devices",
        "8",
        "--config.model.preset=tiny-llama",
        "--config.model.dtype=bfloat16",
    ]
    ok = subprocess.run(
        [*common, "--lower", "tpu", "--config.model.attention=splash"],
        capture_output=True,
        text=True,
        timeout=300,
        env=one_device_env,
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (
        "lowered for tpu on mesh {'data': 1, 'fsdp': 8, "
        "'expert': 1, 'tensor': 1} (attention=splash)" in (ok.stdout)
    )
    # Rows splash cannot take on a TPU: the error is the answer, and the exit is 1.
    bad = subprocess.run(
        [
            *common,
            "--lower",
            "tpu",
            "--config.model.attention=auto",
            "--config.data.max_seq_len=96",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=one_device_env,
    )
    assert bad.returncode == 1
    assert "does not lower for tpu" in bad.stderr and "multiple of 128" in bad.stderr


def test_a_lora_plan_prints_full_finetuning_beside_it(capsys):
    tiny_py = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py")
    args = [
        "--config",
        tiny_py,
        "--devices",
        "8",
        "--config.model.preset=tiny-llama",
        "--config.lora.rank=4",
        "--config.lora.quantize=nf4",
    ]
    assert plan.main(args) == 0
    out = capsys.readouterr().out
    assert "of which: frozen base" in out and "block kernels nf4" in out
    assert "against full fine-tuning, per device (GiB):" in out and "LoRA r=4 nf4" in out
    assert "LoRA needs" in out
    assert plan.main([*args, "--nocompare_full"]) == 0
    assert "against full fine-tuning" not in capsys.readouterr().out


def test_topology_compiles_the_train_step_for_a_tpu_slice(console_script, one_device_env):
    """The TPU compiler itself (libtpu, no TPU): the real train step with splash attention
    for v5p-8's 4 chips; XLA's per-chip HBM beside the plan; exit 2 when it exceeds the
    chip's memory (here a --device of 64 MiB stands in for a small chip)."""
    required.importorskip("libtpu", reason="libtpu (the TPU compiler) is in the test extras")
    tiny_py = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py")
    common = [
        console_script("sft-jax-plan"),
        "--config",
        tiny_py,
        "--topology",
        "v5p-8",
        "--config.model.preset=tiny-llama",
        "--config.model.dtype=bfloat16",
        "--config.model.attention=splash",
    ]
    run = lambda *extra: subprocess.run(  # noqa: E731
        [*common, *extra], capture_output=True, text=True, timeout=300, env=one_device_env
    )
    ok = run()
    assert ok.returncode == 0, ok.stderr[-3000:]
    line = next(x for x in ok.stdout.splitlines() if x.startswith("TPU compiler"))
    assert line.startswith(
        "TPU compiler, v5p-8 (4 chips, v5:2x2x1, mesh {'data': 1, 'fsdp': 4, "
        "'expert': 1, 'tensor': 1}, "
        "attention=splash): "
    )
    compiled_gib = float(re.search(r"([\d.]+) GiB per chip compiled", line).group(1))
    assert 0.01 < compiled_gib < 1.0 and line.endswith(")") and ": fits (" in line
    assert "the TPU compiler's estimated step time:" in ok.stdout
    small = run("--device", "64MiB")
    assert small.returncode == 2, small.stderr[-3000:]
    assert "HBM 0.0625 GiB: DOES NOT FIT" in small.stdout
    wrong = run("--devices", "8")
    assert wrong.returncode == 1 and "v5p-8 has 4 chips" in wrong.stderr


def test_topology_compiles_a_mixture_of_experts_with_expert_parallelism(
    console_script, one_device_env
):
    """The TPU compiler on a mixture of experts split over expert=2 × fsdp=2 of v5p-8's
    chips: `lax.ragged_dot` (the accelerator path of the grouped matmul) in the
    shard_map's all-gather / reduce-scatter dispatch, with splash attention; the plan's
    experts' terms within a factor of 1.5 of XLA's per-chip figure."""
    required.importorskip("libtpu", reason="libtpu (the TPU compiler) is in the test extras")
    tiny_py = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py")
    done = subprocess.run(
        [
            console_script("sft-jax-plan"),
            "--config",
            tiny_py,
            "--topology",
            "v5p-8",
            "--config.model.preset=tiny-moe",
            "--config.model.dtype=bfloat16",
            "--config.data.max_seq_len=512",
            "--config.mesh.expert=2",
            "--config.mesh.fsdp=2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=one_device_env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "experts' dispatch" in done.stdout
    line = next(x for x in done.stdout.splitlines() if x.startswith("TPU compiler"))
    assert "mesh {'data': 1, 'fsdp': 2, 'expert': 2, 'tensor': 1}" in line, line
    compiled = float(re.search(r"([\d.]+) GiB per chip compiled", line).group(1))
    planned = float(re.search(r"plan ([\d.]+) GiB", line).group(1))
    assert 1 / 1.5 < planned / compiled < 1.5, line
