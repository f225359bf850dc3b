"""`s3://` paths against moto's real S3 server on loopback (never a mock): data sources, the
data cache, `model.init_from=hf:s3://…` and exports. How the clients (s3fs, which
`etils.epath` and fsspec use, and boto3) reach the server is in tests/storage_emulator.py.

Checkpoints cannot go to S3 (Orbax writes arrays to gs:// and file systems only): the last
test pins the message that says so and what to do instead.
"""

import dataclasses
import json
import os

import datasets
import numpy as np
import pytest
import transformers
from etils import epath

from sft_jax import checkpoint, hf, sharding
from sft_jax import config as config_lib
from sft_jax.data import DataSpec, build_splits, load_tokenizer, sources
from tests.run_config import model_config
from tests.storage_emulator import s3_bucket, s3_server  # noqa: F401 (pytest fixtures)
from tests.test_hf import _batch, _sharded_target, _tiny_hf, _torch_logits

ROWS = [{"instruction": f"Echo {i}.", "input": "", "output": f"{i} it is."} for i in range(24)]


def _upload(folder, bucket_folder: str) -> None:
    for f in sorted(folder.iterdir()):
        epath.Path(f"{bucket_folder}/{f.name}").write_bytes(f.read_bytes())


def _download(bucket_folder: str, folder) -> None:
    folder.mkdir(parents=True)
    for f in epath.Path(bucket_folder).iterdir():
        (folder / f.name).write_bytes(f.read_bytes())


def test_data_sources_and_cache_in_a_bucket(s3_bucket, tmp_path, monkeypatch):  # noqa: F811
    """data.train as a JSONL file, a glob (JSONL + parquet, parquet read by `datasets`
    through s3fs) and a folder in S3: the same rows, places and fingerprint as the same files
    on a local disk. Then data.train and data.cache_dir both in S3: the entry is written to
    the bucket, a second build maps a local copy of it, and both equal a local build of the
    local files, byte for byte."""
    local = tmp_path / "data"
    local.mkdir()
    (local / "p-1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:16]))
    datasets.Dataset.from_list(ROWS[16:]).to_parquet(str(local / "p-2.parquet"))
    (local / "notes.txt").write_text("not data")
    _upload(local, f"{s3_bucket}/data")

    src = sources.Source(f"{s3_bucket}/data/p-*", "data.train")
    assert list(src.rows()) == ROWS
    assert src.files == [f"{s3_bucket}/data/p-1.jsonl", f"{s3_bucket}/data/p-2.parquet"]
    assert src.where(3) == f"{s3_bucket}/data/p-1.jsonl, line 4"
    assert src.fingerprint() == sources.Source(str(local / "p-*"), "data.train").fingerprint()
    assert list(sources.Source(f"{s3_bucket}/data", "data.train").rows()) == ROWS  # a folder
    assert list(sources.Source(f"{s3_bucket}/data/p-1.jsonl", "x").rows()) == ROWS[:16]
    with pytest.raises(ValueError, match=r"data\.train='s3://.*/data/q-\*': no such file"):
        sources.Source(f"{s3_bucket}/data/q-*", "data.train")

    monkeypatch.setenv("SFT_JAX_CACHE", str(tmp_path / "local_cache"))  # where copies go
    tok = load_tokenizer("gpt2")
    common = dict(validation="0.25", max_seq_len=64)
    spec = DataSpec(train=f"{s3_bucket}/data/p-*", cache_dir=f"{s3_bucket}/cache", **common)
    first = build_splits(spec, tok)
    assert not first.cache_hit and first.cache_path.startswith(f"{s3_bucket}/cache/")
    assert (epath.Path(first.cache_path) / "meta.json").exists()
    second = build_splits(spec, tok)
    assert second.cache_hit and second.cache_path == first.cache_path
    assert os.path.isdir(tmp_path / "local_cache" / "data" / "remote")
    reference = build_splits(DataSpec(train=str(local / "p-*"), cache=False, **common), tok)
    assert second.stats == reference.stats
    for split in ("train", "validation"):
        for field in ("ids", "trainable", "starts", "row_starts"):
            got = np.asarray(getattr(getattr(second, split), field))
            assert got.tobytes() == np.asarray(getattr(getattr(reference, split), field)).tobytes()


def test_export_to_a_bucket_then_init_from_it(s3_bucket, tmp_path):  # noqa: F811
    """`hf.save_hf` to an s3:// folder (several safetensors files, the index, config and
    tokenizer): transformers, given a copy of that folder, gives the source model's logits.
    Then `model.init_from=hf:s3://…`: the model config and tokenizer come from the bucket,
    and the weights, read by byte range onto a data=2 × fsdp=2 × tensor=2 mesh, are those
    exported."""
    import jax

    src, out = str(tmp_path / "src"), f"{s3_bucket}/runs/export"
    model = _tiny_hf("llama", src)
    cfg, params = hf.load_hf(src)
    hf.save_hf(cfg, params, out, load_tokenizer("gpt2"), max_shard_bytes=50_000)
    names = {p.name for p in epath.Path(out).iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json"} <= names
    assert len([n for n in names if n.endswith(".safetensors")]) > 1
    assert not any(tmp_path.glob("**/s3:*"))  # nothing landed in a local "s3:" folder

    _download(out, tmp_path / "copy")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "copy"))
    tokens, mask = _batch()
    np.testing.assert_allclose(
        _torch_logits(reloaded, tokens, mask), _torch_logits(model, tokens, mask), atol=1e-6
    )

    from configs import tiny

    config = tiny.get_config()
    config.model.init_from = f"hf:{out}"
    config.model.tokenizer = ""
    got = model_config(config)  # the architecture, from the bucket's config.json
    numerics = ("dtype", "param_dtype", "remat", "scan_layers", "dropout", "attention")
    assert got == dataclasses.replace(cfg, **{k: getattr(got, k) for k in numerics})
    tokenizer = load_tokenizer(config_lib.tokenizer_name(config))
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]  # the gpt2 files, from S3
    shardings, shapes = _sharded_target(cfg, sharding.make_mesh(data=2, fsdp=2, tensor=2))
    loaded_cfg, loaded = hf.load_hf(
        config_lib.init_source(config), shardings=shardings, shapes=shapes
    )
    assert loaded_cfg == cfg
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)


def test_an_s3_workdir_is_refused_naming_the_flag_and_what_works():
    """Orbax would write an s3:// workdir's arrays to a local folder "s3:/…" on each host:
    refused before anything is written, naming --workdir, the fixes and what S3 serves."""
    with pytest.raises(ValueError) as e:
        checkpoint.Checkpointer("s3://b/run")
    message = str(e.value)
    assert message.startswith("--workdir s3://b/run: Orbax")
    for words in (
        "gs:// workdir",
        "shared file system",
        "s3fs-fuse",
        "not mountpoint-s3",
        "data.train",
        "data.cache_dir",
        "model.init_from=hf:s3://",
        "sft-jax-export --out s3://",
    ):
        assert words in message, words
    checkpoint.check_workdir("gs://b/run")  # accepted, like local paths
    checkpoint.check_workdir("/shared/run")


def test_a_remote_safetensors_block_fetches_its_rows_and_no_more(s3_server, s3_bucket, tmp_path):  # noqa: F811
    """Each block is one ranged GET of exactly its rows (the server counts the bytes it
    sent): a file object's read-ahead (50 MiB in s3fs) would fetch the whole 256 KiB file
    for every read, on every process."""
    from safetensors.numpy import save_file

    from sft_jax.hf import files as hf_files

    w = np.arange(256 * 256, dtype=np.float32).reshape(256, 256)
    save_file({"w": w, "b": np.ones(7, np.float32)}, str(tmp_path / "model.safetensors"))
    epath.Path(f"{s3_bucket}/m/model.safetensors").write_bytes(
        (tmp_path / "model.safetensors").read_bytes()
    )
    header_bytes = 8 + int.from_bytes((tmp_path / "model.safetensors").read_bytes()[:8], "little")
    sent = s3_server.object_bytes_served
    folder = hf_files.RemoteSafetensorsFolder(epath.Path(f"{s3_bucket}/m"))
    assert s3_server.object_bytes_served - sent == header_bytes
    sent = s3_server.object_bytes_served
    np.testing.assert_array_equal(
        folder.read("w", (slice(64, 96), slice(128, 256))), w[64:96, 128:256]
    )
    assert s3_server.object_bytes_served - sent == 32 * 256 * 4  # rows 64..95, whole rows
