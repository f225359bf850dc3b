"""sft_jax/cli/stage.py (sft-jax-stage): a model staged once to a bucket (a GCS emulator on
loopback) imports from `gs://…` exactly as from the folder it came from; from the hub, one
file at a time passes through local disk."""

import dataclasses
import os

import jax
import numpy as np
from etils import epath

from sft_jax import hf
from sft_jax.cli import stage
from sft_jax.hf import files as hf_files
from sft_jax.model import GPT, GPTConfig
from tests.storage_emulator import gcs_bucket, gcs_emulator  # noqa: F401 (pytest fixtures)

CFG = dataclasses.replace(GPTConfig.preset("tiny-llama"), vocab_size=256)


def _write_model(folder: str) -> None:
    """Random weights in an HF folder of several safetensors files with an index, plus a
    file no import uses."""
    import flax.linen as nn

    boxed = jax.eval_shape(GPT(CFG).init, jax.random.key(0), jax.numpy.zeros((1, 1), "int32"))
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda x: rng.standard_normal(x.shape, np.float32), nn.meta.unbox(boxed["params"])
    )
    hf.save_hf(CFG, params, folder, max_shard_bytes=100_000)
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write("not staged")


def test_a_staged_folder_imports_as_the_original(gcs_bucket, tmp_path, capsys, monkeypatch):  # noqa: F811
    src, dest = str(tmp_path / "model"), f"{gcs_bucket}/models/tiny"
    _write_model(src)
    assert stage.main([src, dest]) == 0
    assert f"model.init_from=hf:{dest}" in capsys.readouterr().out
    want = sorted(n for n in os.listdir(src) if n != "README.md")
    assert len([n for n in want if n.endswith(".safetensors")]) > 1
    assert sorted(p.name for p in epath.Path(dest).iterdir()) == want

    cfg, params = hf.load_hf(dest)
    ref_cfg, ref = hf.load_hf(src)
    assert cfg == ref_cfg
    for got, expected in zip(jax.tree.leaves(params), jax.tree.leaves(ref), strict=True):
        np.testing.assert_array_equal(got, expected)

    # Again: every file is there with its size, so nothing is copied.
    copied = []
    monkeypatch.setattr(hf_files, "copy_file", lambda a, b: copied.append(b))
    assert stage.main([src, dest]) == 0
    assert copied == []


def test_a_hub_model_passes_through_local_disk_one_file_at_a_time(tmp_path, monkeypatch):
    """Each hub file is downloaded alone, copied and deleted before the next; only the
    files an import or the tokenizer uses are fetched."""
    import huggingface_hub

    src, dest = tmp_path / "hub", tmp_path / "shared" / "tiny"
    _write_model(str(src))
    (src / "original").mkdir()
    (src / "original" / "consolidated.pth").write_bytes(b"x")
    files = [p for p in src.rglob("*") if p.is_file()]
    downloads = []

    def list_repo_tree(repo_id, recursive=False, revision=None, **kwargs):
        assert (repo_id, recursive, revision) == ("org/tiny", True, "main")
        for p in files:
            yield huggingface_hub.hf_api.RepoFile(
                path=str(p.relative_to(src)), size=p.stat().st_size, blob_id="", oid=""
            )

    def hf_hub_download(repo_id, filename, local_dir, revision=None, **kwargs):
        assert not [p for p in os.listdir(local_dir) if not p.startswith(".")]  # one at a time
        downloads.append(filename)
        with open(src / filename, "rb") as f, open(os.path.join(local_dir, filename), "wb") as g:
            g.write(f.read())
        return os.path.join(local_dir, filename)

    monkeypatch.setattr(huggingface_hub, "list_repo_tree", list_repo_tree)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    assert stage.main(["hf:org/tiny", str(dest), "--revision", "main"]) == 0
    want = sorted(n for n in os.listdir(src) if n not in ("README.md", "original"))
    assert sorted(downloads) == want and sorted(os.listdir(dest)) == want
    for name in want:
        assert (dest / name).read_bytes() == (src / name).read_bytes(), name


def test_a_source_without_safetensors_is_refused_before_anything_is_copied(tmp_path, capsys):
    src, dest = tmp_path / "bin_only", tmp_path / "dest"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "pytorch_model.bin").write_bytes(b"x")
    assert stage.main([str(src), str(dest)]) == 2
    err = capsys.readouterr().err
    assert "sft-jax-stage SOURCE" in err and "has no *.safetensors" in err
    assert not dest.exists()
    assert stage.main([str(src), str(dest), "--revision", "v1"]) == 2
    assert "is a folder, not a hub id" in capsys.readouterr().err
