"""The one-host export (`runs.stored_run`, `checkpoint.StoredArray`; `sft-jax-export` in one
process): checkpoints that 8 faked devices wrote sharded (fsdp=8), exported a tensor at a
time, must give the same files, byte for byte, as restoring the params over the devices
and saving them (`runs.load_run` + `hf.save_hf`, which test_hf.py loads in transformers);
and in a process of its own, with one device, the export's peak RSS growth must stay
within a bound tied to the largest tensor, well below the model's size."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import pytest

from sft_jax import checkpoint, hf, lora, runs, sharding, steps
from sft_jax.cli import export
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


def _random(cfg, key=0):
    init = lambda rng: nn.meta.unbox(steps.init_params(rng, GPT(cfg)))
    # Norms start at exactly 1: make every tensor distinct.
    noise = lambda p, k: p + 0.01 * jax.random.normal(k, p.shape, p.dtype)
    params = jax.jit(init)(jax.random.key(key))
    keys = jax.random.split(jax.random.key(key + 1), len(jax.tree.leaves(params)))
    return jax.tree.unflatten(jax.tree.structure(params), map(noise, jax.tree.leaves(params), keys))


def _same_files(a, b):
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))
    for name in os.listdir(a):
        if name.endswith((".safetensors", ".json")):
            with open(os.path.join(a, name), "rb") as x, open(os.path.join(b, name), "rb") as y:
                assert x.read() == y.read(), name


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
    vocab_size=256, max_seq_len=32, d_model=64, n_layers=3, n_heads=4, n_kv_heads=4, d_ff=128
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
    args = ("--dtype", "bfloat16", "--max-shard-gb", str(100_000 / 1024**3))
    restored, streamed = _exported_both_ways(tmp_path / "run", tmp_path, *args)
    assert len([f for f in os.listdir(streamed) if f.endswith(".safetensors")]) > 1
    _same_files(restored, streamed)


def _adapters(cfg, spec):
    shapes = nn.meta.unbox(lora.abstract_adapters(cfg, spec))
    leaves, tree = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    normal = lambda s, k: 0.1 * jax.random.normal(k, s.shape, s.dtype)  # B ≠ 0: merges show
    return jax.tree.unflatten(tree, map(normal, leaves, keys))


@pytest.mark.parametrize(
    "base, spec_fields",
    [
        ("hf", dict(base_dtype="bfloat16")),
        ("hf", dict(quantize="nf4")),
        ("random", dict(quantize="int8")),
    ],
)
def test_a_lora_run_exports_merged_a_tensor_at_a_time(tmp_path, base, spec_fields):
    cfg = GPTConfig(**SMALL | LLAMA, tie_embeddings=False)
    spec = lora.LoraSpec(rank=4, alpha=8.0, **spec_fields)
    init_from = ""
    if base == "hf":
        init_from = str(tmp_path / "base")
        hf.save_hf(cfg, _random(cfg, key=5), init_from)
    _save(tmp_path / "run", cfg, _adapters(cfg, spec), spec, init_from)
    restored, streamed = _exported_both_ways(tmp_path / "run", tmp_path)
    _same_files(restored, streamed)


def test_one_device_exports_an_8_device_checkpoint_within_one_tensor(tmp_path):
    """A ~390 MiB model (8 layers of 48 MiB, float32; one MLP weight 16 MiB, its stacked
    leaf 128 MiB) written by 8 devices; the export, in a process with one device, reads a
    layer of a leaf at a time into files of at most 32 MiB."""
    cfg = GPTConfig(
        vocab_size=256, max_seq_len=16, d_model=1024, n_layers=8, n_heads=8, n_kv_heads=8, d_ff=4096
    )
    params = _random(cfg)
    model_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    _save(tmp_path / "run", cfg, params)
    del params
    shard_gb = 32 * MIB / 1024**3
    args = ["--workdir", str(tmp_path / "run"), "--max-shard-gb", str(shard_gb)]
    out, result = tmp_path / "streamed", tmp_path / "result.json"
    env = cpu_env(devices=None) | {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": str(MIB)}
    worker = [sys.executable, "-m", "tests.stream_export_worker", str(result)]
    subprocess.run([*worker, *args, "--out", str(out)], cwd=ROOT, env=env, check=True, timeout=300)
    report = json.loads(result.read_text())
    assert report["code"] == 0 and report["devices"] == 1
    one_tensor = 16 * MIB  # the largest: an MLP weight of one layer (float32)
    chunk = 128 * MIB // 8  # one device's shard of the largest stacked leaf, as written
    # The tensor as read and as transposed, one chunk as read and as decoded, the file being
    # filled and safetensors' copy of it as it writes, and tokenizer/allocator slack.
    # Measured: 178 MiB (2 cores, load ~13); without MALLOC_MMAP_THRESHOLD_ glibc kept the
    # freed 16 MiB tensors in its heap and the peak was 237 MiB.
    bound = 2 * one_tensor + 2 * chunk + 2 * 32 * MIB + 64 * MIB
    print(
        f"export peak RSS growth {report['growth'] / MIB:.0f} MiB, bound {bound / MIB:.0f}"
        f" MiB, model {model_bytes / MIB:.0f} MiB"
    )
    assert model_bytes > 380 * MIB and model_bytes > 1.9 * bound
    assert report["growth"] <= bound, report["growth"] / MIB
    # The same files as restoring the params over the 8 devices and saving them.
    run = runs.load_run(str(tmp_path / "run"))
    restored = str(tmp_path / "restored")
    hf.save_hf(cfg, run.params, restored, run.tokenizer, 32 * MIB, hf.export_dtype(cfg))
    _same_files(restored, str(out))
