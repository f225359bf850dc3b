"""The layers of sft_jax (pyproject.toml, [tool.importlinter]) hold: import-linter checks
every import, lazy ones included, against the contracts."""

import os
import subprocess
import sys

from tests.test_train import ROOT


def test_import_contracts_hold():
    lint = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    run = subprocess.run(
        [lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout
