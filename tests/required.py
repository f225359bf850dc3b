"""Tests that need something outside the Python packages (a real SLURM from Debian, libtpu)
skip on a machine without it, but never in CI: `.ci/run` sets SFT_JAX_CI=1, and there a
missing tool fails the test instead of silently dropping what the README says CI proves."""

import os

import pytest

IN_CI = os.environ.get("SFT_JAX_CI") == "1"


def skip_unless_ci(missing: str | None) -> pytest.MarkDecorator:
    """A skip mark for `missing` (why the tool is unusable, or None), off in CI."""
    return pytest.mark.skipif(missing is not None and not IN_CI, reason=str(missing))


def importorskip(module: str, reason: str):
    """pytest.importorskip, except in CI, where the import must succeed."""
    if IN_CI:
        return __import__(module)
    return pytest.importorskip(module, reason=reason)
