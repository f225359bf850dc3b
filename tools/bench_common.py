"""What the benchmark tools share: the offline tokenizer choice, peak RSS, the torch check."""

from __future__ import annotations

import importlib.util
import os
import resource
import sys

# The offline copy of SmolLM2's tokenizer (inside the GGUF asset): the preset's own
# tokenizer name is a hub id, and these machines reach no hub.
SMOLLM2_OFFLINE_TOKENIZER = "asset:smollm2-135m-instruct-gguf"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB. Linux's VmHWM, not ru_maxrss: a
    spawned child inherits its parent's ru_maxrss across fork and exec."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, else KiB


def tokenizer_for(c):
    """The config's tokenizer, with SmolLM2's hub id swapped for its offline copy."""
    from sft_jax import config as config_lib

    name = config_lib.tokenizer_name(c)
    if name == config_lib.PRESET_TOKENIZERS["smollm2"] and not os.path.isdir(name):
        name = SMOLLM2_OFFLINE_TOKENIZER
    return name


def torch_available() -> str:
    """'' if torch and transformers import, else why not."""
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        return (
            f"{' and '.join(missing)} not installed: torch is a test-only dependency of sft_jax "
            "(pip install -e '.[test]'); --compare-torch skipped"
        )
    return ""
