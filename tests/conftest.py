"""Fake 8 CPU devices for every test; this must run before jax is imported anywhere."""

import os

import pytest

FAKE_DEVICES = "--xla_force_host_platform_device_count=8"

# Not twice: pytest-xdist workers inherit the controller's environment, which already has it.
if FAKE_DEVICES not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAKE_DEVICES).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def one_device_env() -> dict[str, str]:
    """The environment for a tool run in a subprocess that should see one CPU device, as a
    user's run on this machine would (XLA refuses an XLA_FLAGS of only whitespace)."""
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").replace(FAKE_DEVICES, "").strip()
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    return env
