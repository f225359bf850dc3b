"""An import from a bucket on several hosts fetches about each host's share: 2 processes ×
4 faked CPU devices import a Llama from a GCS emulator on loopback onto fsdp=4 × tensor=2,
where fsdp spans the processes. HF keeps q, k, v, gate, up, the embedding and lm_head as
[out, in] (the table as [vocab, embed]), so fsdp (on `embed`) splits their columns: a
device's block is not one byte range, and reading it by whole rows fetched every such
tensor once per device (8 × a process's share of it, before `hf.sharded._by_rows`).

Each process counts the bytes its ranged GETs returned (tests/hf_bucket_worker.py); the
bound is 1.25 × the bytes its devices hold (distinct blocks), plus the headers."""

import dataclasses
import json
import os
import sys

import jax
import numpy as np
from etils import epath

from sft_jax import hf
from sft_jax.hf import files as hf_files
from sft_jax.model import GPT, GPTConfig
from tests.processes import ROOT, cpu_env, run_processes
from tests.storage_emulator import gcs_bucket, gcs_emulator  # noqa: F401 (pytest fixtures)

# A model whose tensors dwarf the safetensors headers (~6 MiB of float32 in 3 files).
CFG = dataclasses.replace(
    GPTConfig.preset("tiny-llama"), vocab_size=1024, d_model=256, d_ff=512, n_heads=4
)


def _write_model(folder: str) -> None:
    """Random weights (norms too, so every tensor is distinct), saved as an HF folder."""
    import flax.linen as nn

    boxed = jax.eval_shape(GPT(CFG).init, jax.random.key(0), jax.numpy.zeros((1, 1), "int32"))
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda x: rng.standard_normal(x.shape, np.float32), nn.meta.unbox(boxed["params"])
    )
    hf.save_hf(CFG, params, folder, max_shard_bytes=3 * 1024**2)


def test_two_hosts_fetch_their_share_of_column_sharded_tensors(gcs_bucket, tmp_path):  # noqa: F811
    local, src = str(tmp_path / "model"), f"{gcs_bucket}/models/tiny"
    _write_model(local)
    for name in os.listdir(local):
        hf_files.copy_file(epath.Path(local) / name, epath.Path(src) / name)
    model_bytes = sum(
        os.path.getsize(os.path.join(local, f))
        for f in os.listdir(local)
        if f.endswith(".safetensors")
    )

    worker = os.path.join(ROOT, "tests", "hf_bucket_worker.py")
    results = [tmp_path / f"result{i}.json" for i in range(2)]
    run_processes(
        lambda i, port: [
            sys.executable,
            worker,
            src,
            str(results[i]),
            str(i),
            "2",
            str(port),
            "4",
            "2",
        ],
        count=2,
        env=cpu_env(4),
        timeout=300,
    )
    reports = [json.loads(r.read_text()) for r in results]
    print([{k: r[k] for k in ("fetched", "gets", "headers", "share")} for r in reports])
    for i, r in enumerate(reports):
        assert not r["mismatched"] and not r["wrong_sharding"], (i, r)
        # Each process holds about half the model (norms are replicated): fsdp spans both.
        assert 0.45 * model_bytes < r["share"] < 0.6 * model_bytes, (i, r["share"], model_bytes)
        assert r["fetched"] <= 1.25 * r["share"] + r["headers"], (i, r)
