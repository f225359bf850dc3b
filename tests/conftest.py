"""Fake 8 CPU devices for every test; this must run before jax is imported anywhere."""

import os
import shutil
import sys

import pytest

FAKE_DEVICES = "--xla_force_host_platform_device_count=8"

# Not twice: pytest-xdist workers inherit the controller's environment, which already has it.
if FAKE_DEVICES not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAKE_DEVICES).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def grad_scratch_bytes():
    """f(preset, tokens, **fields) → scratch bytes of the compiled gradient of
    mean(logits²) for GPT(GPTConfig.preset(preset, **fields)): how much the backward pass
    keeps. The model is built at each call, so a monkeypatched layer takes effect."""
    import jax
    import jax.numpy as jnp

    from sft_jax.model import GPT, GPTConfig

    def measure(preset, tokens, **fields):
        model = GPT(GPTConfig.preset(preset, **fields))
        params = model.init(jax.random.key(0), tokens)["params"]
        loss = lambda p: jnp.mean(model.apply({"params": p}, tokens) ** 2)
        compiled = jax.jit(jax.grad(loss)).lower(params).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    return measure


def one_device_environment() -> dict[str, str]:
    """The environment for a tool run in a subprocess that should see one CPU device, as a
    user's run on this machine would (XLA refuses an XLA_FLAGS of only whitespace)."""
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").replace(FAKE_DEVICES, "").strip()
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    return env


@pytest.fixture
def one_device_env() -> dict[str, str]:
    return one_device_environment()


RUNTIME_ONLY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runtime_only")


@pytest.fixture
def runtime_env() -> dict[str, str]:
    """`one_device_env` with the test-only packages (torch, lm-eval, peft …) unimportable
    (tests/runtime_only/sitecustomize.py), as in the README's runtime-only install: a command
    run in it must not need the test extras."""
    env = one_device_environment()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (RUNTIME_ONLY, env.get("PYTHONPATH")) if p)
    return env


@pytest.fixture(scope="session")
def console_script():
    """f(name) → the path of a console script from setup.py (`sft-jax-inspect`, …), as
    `pip install -e .` put it next to this Python (or on PATH); the test fails without it."""

    def find(name: str) -> str:
        here = os.path.join(os.path.dirname(sys.executable), name)
        path = here if os.path.exists(here) else shutil.which(name)
        assert path, f"{name} is not installed: pip install -e ."
        return path

    return find
