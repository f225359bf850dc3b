"""The runtime install (`pip install -e .`, no extras) has no torch, lm-eval, peft, wandb or
mlflow. Every module of sft_jax must import without them but the one that exists for an
extra (`harness`, lm-eval's adapter), which must say which extra it needs; and each user
command must start. A runtime path that needs a test-only package passes every other test
(the test extras bring it) and fails for a new user. The quickstart itself runs the same
way in tests/test_quickstart.py."""

import subprocess
import sys

from tests.test_train import ROOT

# Modules that exist for an optional extra: importing them without it names the extra.
EXTRA_MODULES = {"sft_jax.harness": "pip install -e '.[eval]'"}
IMPORT_ALL = """
import importlib, pkgutil, sys
import sft_jax
names = [m.name for m in pkgutil.walk_packages(sft_jax.__path__, "sft_jax.")]
for name in names:
    try:
        importlib.import_module(name)
    except ImportError as e:
        print("needs-extra", name, str(e))
assert sys.modules["torch"] is None, "something replaced the hidden torch"
print(len(names))
"""


def _python(code: str, env: dict) -> subprocess.CompletedProcess:
    """`python -c code` in the repository root with `env`; asserts it exited 0."""
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def test_every_module_imports_without_the_test_only_packages(runtime_env):
    run = _python(IMPORT_ALL, runtime_env)
    assert int(run.stdout.split()[-1]) > 40  # the whole package was walked
    failed = {
        line.split()[1]: line for line in run.stdout.splitlines() if line.startswith("needs-extra")
    }
    assert failed.keys() == EXTRA_MODULES.keys(), failed
    for name, fix in EXTRA_MODULES.items():
        assert fix in failed[name], failed[name]


def test_user_commands_start_without_the_test_only_packages(runtime_env, console_script):
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


def test_gguf_tokenizer_loads_without_torch(runtime_env):
    """transformers 5.25's GGUF tokenizer path imported torch; ours (data/gguf_tokenizer.py)
    must not."""
    code = (
        "import sys\n"
        "from sft_jax.data import load_tokenizer\n"
        "tok = load_tokenizer('asset:smollm2-135m-instruct-gguf')\n"
        "assert tok.encode('Hello world') == [19556, 905], tok.encode('Hello world')\n"
        "print(tok.apply_chat_template([{'role': 'user', 'content': 'hi'}], tokenize=False))\n"
        "assert sys.modules['torch'] is None\n"
    )
    assert "<|im_start|>user\nhi<|im_end|>" in _python(code, runtime_env).stdout
