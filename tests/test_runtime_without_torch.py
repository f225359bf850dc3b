"""The runtime install (`pip install -e .`, no test extras) has no torch. Every module of
sft_jax must import without it, and each user command must start: a runtime path that
needs torch passes every other test (the test extras bring torch) and fails for a new user.
The quickstart itself runs with torch unimportable in tests/test_quickstart.py."""

import subprocess
import sys

from tests.test_train import ROOT

IMPORT_ALL = """
import importlib, pkgutil, sys
import sft_jax
names = [m.name for m in pkgutil.walk_packages(sft_jax.__path__, "sft_jax.")]
for name in names:
    importlib.import_module(name)
assert sys.modules["torch"] is None, "something replaced the hidden torch"
print(len(names))
"""


def test_every_module_imports_without_torch(runtime_env):
    run = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL],
        cwd=ROOT,
        env=runtime_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert int(run.stdout.split()[-1]) > 40  # the whole package was walked


def test_user_commands_start_without_torch(runtime_env, console_script):
    for name in (
        "sft-jax-eval",
        "sft-jax-export",
        "sft-jax-generate",
        "sft-jax-inspect",
        "sft-jax-plan",
    ):
        run = subprocess.run(
            [console_script(name), "--help"],
            cwd=ROOT,
            env=runtime_env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, (name, run.stderr[-2000:])
        assert "--" in run.stdout + run.stderr, name  # absl printed its flags
