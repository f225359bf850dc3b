"""`gs://` work directories end to end, against a real GCS emulator on loopback.

How the clients reach the emulator (gcsfs and google-cloud-storage through
`STORAGE_EMULATOR_HOST`, tensorstore through `TENSORSTORE_GCS_HTTP_URL` with a test token)
is in tests/storage_emulator.py.
"""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from sft_jax import paths
from tests.storage_emulator import gcs_bucket, gcs_emulator  # noqa: F401 (pytest fixtures)


def test_emulator_serves_files_and_orbax_arrays(gcs_bucket):  # noqa: F811
    """The fixture itself: epath (gcsfs) and Orbax (tensorstore + google-cloud-storage)
    write into the emulated bucket and read back what they wrote."""
    text = epath.Path(f"{gcs_bucket}/run/notes.txt")
    text.parent.mkdir(parents=True, exist_ok=True)
    text.write_text("hello")
    assert text.read_text() == "hello"

    mesh = jax.make_mesh((8,), ("fsdp",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    array = jax.device_put(np.arange(64, dtype=np.float32).reshape(16, 4), sharding)
    with ocp.CheckpointManager(f"{gcs_bucket}/run/checkpoints") as manager:
        manager.save(3, args=ocp.args.StandardSave({"w": array}))
        manager.wait_until_finished()
    with ocp.CheckpointManager(f"{gcs_bucket}/run/checkpoints") as manager:
        assert manager.all_steps() == [3]
        target = {"w": jax.ShapeDtypeStruct(array.shape, array.dtype, sharding=sharding)}
        restored = manager.restore(3, args=ocp.args.StandardRestore(target))
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(array))
    assert restored["w"].sharding == sharding


def test_paths_keep_urls_and_anchor_local_paths(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", "/home/me")
    assert paths.resolve("gs://b/run") == "gs://b/run"  # not <cwd>/gs:/b/run
    assert paths.resolve("s3://b/run/") == "s3://b/run/"
    assert paths.resolve("run") == os.path.join(str(tmp_path), "run")
    assert paths.resolve("~/run") == "/home/me/run"
    assert paths.join("gs://b/run", "checkpoints") == "gs://b/run/checkpoints"
    assert paths.under("gs://b/run", "hf") == "gs://b/run/hf"
    assert paths.under("gs://b/run", "/data/hf") == "/data/hf"
    assert paths.under("/w", "~/hf") == "/home/me/hf"
    assert paths.under("/w", "s3://c/hf") == "s3://c/hf"
    assert paths.is_remote("gs://b") and not paths.is_remote("/gs:/b")


def test_download_and_upload_a_folder(gcs_bucket, tmp_path):  # noqa: F811
    """A model folder's small files come down (weights stay: hf.py reads them in slices);
    a local folder with subfolders goes up whole."""
    folder = epath.Path(f"{gcs_bucket}/model")
    folder.mkdir(parents=True)
    for name in ("tokenizer.json", "config.json", "model.safetensors"):
        (folder / name).write_text(name)
    (tmp_path / "down").mkdir()
    paths.download(str(folder), str(tmp_path / "down"))
    assert sorted(os.listdir(tmp_path / "down")) == ["config.json", "tokenizer.json"]
    (tmp_path / "up" / "plugins" / "profile").mkdir(parents=True)
    (tmp_path / "up" / "plugins" / "profile" / "trace.json.gz").write_bytes(b"\x1f\x8b")
    paths.upload(str(tmp_path / "up"), f"{gcs_bucket}/profile")
    trace = epath.Path(f"{gcs_bucket}/profile/plugins/profile/trace.json.gz")
    assert trace.read_bytes() == b"\x1f\x8b"
