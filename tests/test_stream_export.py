"""The one-host export (`runs.stored_run`, `checkpoint.StoredArray`; `sft-jax-export` in one
process): checkpoints that 8 faked devices wrote sharded (fsdp=8), exported a tensor at a
time, must give the same files, byte for byte, as restoring the params over the devices
and saving them (`runs.load_run` + `hf.save_hf`, which test_hf.py loads in transformers);
and the real command, in a process of its own with one CPU device, must export a model
twice the size of its memory bound within that bound (peak RSS above the same command's
when it stops after opening the checkpoint).

Random values come from numpy, not from jitted initialisers: on 8 faked devices the
compiles cost a minute."""

import dataclasses
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from safetensors import safe_open

from sft_jax import checkpoint, hf, lora, runs, sharding, steps
from sft_jax.cli import export
from sft_jax.hf.tensors import shard_plan
from sft_jax.model import GPT, GPTConfig
from sft_jax.run_meta import RunMeta
from tests.processes import ROOT, cpu_env

MIB = 1024**2


def _save(workdir, cfg, params, spec=None, init_from=""):
    """A run's checkpoint at step 1, `params` (the adapters alone, with `spec`) sharded over
    all 8 devices (fsdp=8) as training holds them."""
    mesh = sharding.make_mesh(fsdp=8)
    model = GPT(cfg, spec.layers(cfg) if spec else None)
    boxed = (
        lora.abstract_adapters(cfg, spec)
        if spec
        else jax.eval_shape(lambda: steps.init_params(jax.random.key(0), model))
    )
    params = jax.device_put(params, sharding.tree_shardings(boxed, mesh))
    meta = RunMeta({}, cfg, "gpt2", "chatml", init_from=init_from, seed=3, lora=spec)
    ckpt = checkpoint.Checkpointer(str(workdir), keep=1, writer=True, async_save=False)
    ckpt.save(1, {"params": params, "step": 1}, meta.to_json(), force=True)
    ckpt.close()


def _normal(shapes, seed, scale=1.0):
    """numpy normals of each leaf's shape: every tensor distinct (norms included)."""
    rng = np.random.default_rng(seed)
    draw = lambda s: (scale * rng.standard_normal(s.shape, np.float32)).astype(s.dtype)
    return jax.tree.map(draw, nn.meta.unbox(shapes))


def _random(cfg, seed=0):
    return _normal(jax.eval_shape(lambda: steps.init_params(jax.random.key(0), GPT(cfg))), seed)


def _adapters(cfg, spec):
    return _normal(lora.abstract_adapters(cfg, spec), 7, scale=0.1)  # B ≠ 0: merges show


def _same_files(a, b):
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))
    for name in os.listdir(a):
        if name.endswith((".safetensors", ".json")):
            with open(os.path.join(a, name), "rb") as x, open(os.path.join(b, name), "rb") as y:
                assert x.read() == y.read(), name


def _safetensors(folder):
    from safetensors.numpy import load_file

    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            yield from load_file(os.path.join(folder, f)).items()


def _exported_both_ways(workdir, tmp_path, *args):
    """(the restored export's folder, the streamed one's) of the run in `workdir`."""
    run = runs.load_run(str(workdir))
    restored, streamed = str(tmp_path / "restored"), str(tmp_path / "streamed")
    dtype = hf.export_dtype(run.model_cfg, args[1] if args else "")
    shard = int(float(args[-1]) * 1024**3) if "--max-shard-gb" in args else 2 * 1024**3
    hf.save_hf(run.model_cfg, run.merged_params(), restored, run.tokenizer, shard, dtype)
    assert export.main(["--workdir", str(workdir), "--out", streamed, *args]) == 0
    return restored, streamed


SMALL = dict(
    vocab_size=128, max_seq_len=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=64
)
LLAMA = dict(family="llama", positions="rope", norm="rmsnorm", mlp="swiglu", bias=False)


@pytest.mark.parametrize(
    "fields",
    [
        dict(),  # GPT-2: fused c_attn, biases, learned positions; scanned layers
        dict(LLAMA, n_kv_heads=2, scan_layers=False, tie_embeddings=False),
    ],
    ids=["gpt2-scanned", "llama-unrolled"],
)
def test_the_streamed_export_is_the_restored_one(tmp_path, fields):
    cfg = GPTConfig(**SMALL | fields)
    _save(tmp_path / "run", cfg, _random(cfg))
    args = ("--dtype", "bfloat16", "--max-shard-gb", str(10_000 / 1024**3))
    restored, streamed = _exported_both_ways(tmp_path / "run", tmp_path, *args)
    assert len([f for f in os.listdir(streamed) if f.endswith(".safetensors")]) > 1
    _same_files(restored, streamed)


def test_a_lora_run_exports_merged_a_tensor_at_a_time(tmp_path):
    """The QLoRA base read from init_from's files a layer at a time, stored as the run did
    (bfloat16, NF4), dequantized and merged. NF4 without double quantization: the scales'
    mean is a float sum whose order follows the mesh (8 devices restore, one streams), so a
    double-quantized base differs between the two in the last bit. (A random base, the
    seed's: test_lora_run.py exports one with sft-jax-export.)"""
    cfg = GPTConfig(**SMALL | LLAMA, tie_embeddings=False)
    spec = lora.LoraSpec(
        rank=4, alpha=8.0, quantize="nf4", double_quant=False, base_dtype="bfloat16"
    )
    init_from = str(tmp_path / "base")
    hf.save_hf(cfg, _random(cfg, seed=5), init_from)
    _save(tmp_path / "run", cfg, _adapters(cfg, spec), spec, init_from)
    restored, streamed = _exported_both_ways(tmp_path / "run", tmp_path)
    _same_files(restored, streamed)


def test_a_lora_run_on_experts_exports_them_merged_a_tensor_at_a_time(tmp_path):
    """A mixture of experts' LoRA run (attention, router and the experts' stacked weights,
    unrolled layers): the streamed export merges each expert's adapters into its gate, up
    and down as the restored one does."""
    from sft_jax.model import PRESETS

    cfg = dataclasses.replace(
        PRESETS["tiny-moe"], vocab_size=128, d_model=32, d_expert=24, n_layers=2, head_dim=8,
        max_seq_len=16, scan_layers=False,
    )  # fmt: skip
    spec = lora.LoraSpec(rank=4, alpha=8.0, targets=("all-linear",))
    init_from = str(tmp_path / "base")
    hf.save_hf(cfg, _random(cfg, seed=5), init_from)
    adapters = _adapters(cfg, spec)
    assert "lora_gate_up" in adapters["layers_0"]["mlp"]["experts"]
    _save(tmp_path / "run", cfg, adapters, spec, init_from)
    restored, streamed = _exported_both_ways(tmp_path / "run", tmp_path)
    # Within float32 rounding, not bitwise: a merged weight whose output dimension fsdp
    # splits (the experts' down, o_proj) is A·B computed on the 8 devices' blocks when
    # restored and whole when streamed, and XLA:CPU's dot rounds the two shapes differently
    # (measured: at most 2.4e-7 on weights of magnitude up to 3.7).
    streamed_tensors = dict(_safetensors(streamed))
    for name, tensor in _safetensors(restored):
        np.testing.assert_allclose(tensor, streamed_tensors[name], rtol=0, atol=5e-7, err_msg=name)
    # And the merge moved the experts' weights off the base's.
    base = dict(hf.params_to_hf(cfg, hf.load_hf(init_from, scan_layers=False)[1]))
    merged = dict(hf.params_to_hf(cfg, hf.load_hf(streamed, scan_layers=False)[1]))
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    assert np.abs(merged[name] - base[name]).max() > 1e-3


# Runs a command and prints [exit code, its peak RSS in bytes]. A child of this small
# process, not of the test's: a forked child's high-water mark starts at its parent's.
_PEAK_RSS = (
    "import json, resource, subprocess, sys\n"
    "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, timeout=300).returncode\n"
    "print(json.dumps([code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024]))"
)


def _start(argv, stderr):
    """`argv` started in a process of its own with one CPU device and none of the test's
    malloc settings (what a user's command gets), under `_PEAK_RSS`."""
    env = cpu_env(devices=None)
    for name in ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX"):
        env.pop(name, None)
    command = [sys.executable, "-c", _PEAK_RSS, *argv]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr)


def _peak_rss(proc, stderr) -> tuple[int, int]:
    """(exit code, peak RSS in bytes) of the command `proc` ran."""
    out, _ = proc.communicate(timeout=330)
    stderr.seek(0)
    assert proc.returncode == 0, stderr.read()[-3000:]
    code, peak = json.loads(out.splitlines()[-1])
    if code not in (0, 2):
        pytest.fail(f"exit {code}:\n{stderr.read()[-3000:]}")
    return code, peak


def test_one_device_exports_an_8_device_checkpoint_within_its_bound(tmp_path):
    """A 385 MiB model (8 layers of 48 MiB, float32; one MLP weight 16 MiB, its stacked
    leaf 128 MiB) written by 8 devices; `python -m sft_jax.cli.export` (what the console
    script runs), in a process with one device, reads a layer of a leaf at a time into
    files of at most 32 MiB."""
    cfg = GPTConfig(
        vocab_size=256, max_seq_len=16, d_model=1024, n_layers=8, n_heads=8, n_kv_heads=8, d_ff=4096
    )
    params = _random(cfg)
    model_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    workdir, out = tmp_path / "run", tmp_path / "streamed"
    _save(workdir, cfg, params)
    shard = 32 * MIB
    command = [sys.executable, "-m", "sft_jax.cli.export", "--workdir", str(workdir)]
    # The baseline: the same command stopping once it has opened the checkpoint (there is
    # no step 2): the interpreter, its imports, the JAX client, Orbax. Both run at once.
    with open(tmp_path / "base.err", "w+") as base_err, open(tmp_path / "err", "w+") as err:
        base = _start([*command, "--step", "2", "--out", str(tmp_path / "none")], base_err)
        full = _start([*command, "--out", str(out), "--max-shard-gb", str(shard / 1024**3)], err)
        code, peak = _peak_rss(full, err)
        base_code, base_peak = _peak_rss(base, base_err)
    assert code == 0 and base_code == 2
    growth = peak - base_peak
    one_tensor = 16 * MIB  # the largest: an MLP weight of one layer (float32)
    chunk = 128 * MIB // 8  # one device's shard of the largest stacked leaf, as written
    # The tensor as read and as converted, one chunk as read and as decoded, the file being
    # filled and safetensors' copy of it as it writes, and the tokenizer, the conversions'
    # compiles and allocator slack. Measured 175-176 MiB (AMD EPYC, 2 shared cores); 211 MiB
    # with SFT_JAX_MALLOC_TUNING=0 (no mmap_threshold: freed tensors stay in the heap).
    bound = 2 * one_tensor + 2 * chunk + 2 * shard + 64 * MIB
    print(
        f"export peak RSS {peak / MIB:.0f} MiB, {growth / MIB:.0f} MiB above the baseline's "
        f"{base_peak / MIB:.0f}; bound {bound / MIB:.0f} MiB, model {model_bytes / MIB:.0f} MiB"
    )
    assert model_bytes >= 2 * bound  # restoring the params whole could not pass
    assert growth <= bound, growth / MIB
    # The right tensors, in the planned files: what hf.save_hf converts from the params.
    dtype = np.dtype(jax.numpy.dtype(hf.export_dtype(cfg)))
    plan = shard_plan(cfg, params, dtype.itemsize, shard)
    assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == sorted(plan)
    where = {name: file for file, names in plan.items() for name in names}
    for name, tensor in hf.params_to_hf(cfg, params):
        with safe_open(str(out / where[name]), "np") as f:
            np.testing.assert_array_equal(f.get_tensor(name), tensor.astype(dtype), name)
