"""What the benchmark tools share: the offline tokenizer choice, peak RSS, the torch side
(check, random model, PEFT's LoRA of it, AdamW) and the command-line ending (one JSON line,
errors in one line)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import platform
import resource
import sys
from collections.abc import Callable

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


def host_cpu() -> str:
    """The CPU figures come from, as a README row names it: model, cores this process may
    use, and its widest vector extensions (speed ratios differ with these: XLA:CPU and
    torch both pick their kernels by them)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model != value.strip():
                    model = value.strip()
                elif key.strip() in ("flags", "Features"):
                    flags = set(value.split())
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if "avx512f" in flags:
        vectors = "AVX-512" + (", AMX" if "amx_tile" in flags else "")
    elif "avx2" in flags:
        vectors = "AVX2, no AVX-512"
    elif "avx" in flags:
        vectors = "AVX, no AVX2"
    else:
        vectors = ", ".join(
            name for name, flag in (("SVE", "sve"), ("NEON", "asimd")) if flag in flags
        )
    return f"{model}, {cores} cores, {vectors or 'vector extensions unknown'}"


def tokenizer_for(c):
    """The config's tokenizer, with SmolLM2's hub id swapped for its offline copy."""
    from sft_jax import config as config_lib

    name = config_lib.tokenizer_name(c)
    if name == config_lib.PRESET_TOKENIZERS["smollm2"] and not os.path.isdir(name):
        name = SMOLLM2_OFFLINE_TOKENIZER
    return name


def torch_available(with_peft: bool = False) -> str:
    """'' if torch and transformers (and `with_peft`, peft) import, else why not."""
    needed = ("torch", "transformers", "peft") if with_peft else ("torch", "transformers")
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        return (
            f"{' and '.join(missing)} not installed: torch is a test-only dependency of sft_jax "
            "(pip install -e '.[test]'); --compare-torch skipped"
        )
    return ""


def torch_random_model(hf_config: dict):
    """transformers' model class of `hf_config` (GPT2LMHeadModel, LlamaForCausalLM, …),
    randomly initialised, float32."""
    import torch
    import transformers

    config = transformers.AutoConfig.for_model(
        **{k: v for k, v in hf_config.items() if k != "architectures"}
    )
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def torch_peft_model(model, settings: dict):
    """PEFT's LoRA over `model` (`peft.get_peft_model`, its default init: Kaiming-uniform A,
    zero B), the base first cast to `settings["base_dtype"]` (the adapters stay float32,
    PEFT's `autocast_adapter_dtype`); the other settings are `peft.LoraConfig`'s."""
    import peft
    import torch

    settings = dict(settings)
    model = model.to(getattr(torch, settings.pop("base_dtype", "float32")))
    return peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **settings))


def torch_adamw(params, **kwargs):
    """torch AdamW with the fused kernel (the Trainer's default) where the build has it."""
    import torch

    params = list(params)  # a generator would be spent by the first attempt
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # a build without the fused CPU kernel
        return torch.optim.AdamW(params, **kwargs)


def _finite(v):
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return None if isinstance(v, float) and not math.isfinite(v) else v


def finish(compute: Callable[[], dict], errors: tuple = (ValueError, FileNotFoundError)) -> int:
    """Runs a tool's `compute`; its result becomes the last printed line, one JSON object
    (NaN and infinities, which JSON lacks, as null); `errors` end it with one line."""
    try:
        out = compute()
    except errors as e:
        raise SystemExit(f"error: {e}") from None
    sys.stdout.flush()
    print(json.dumps(_finite(out)))
    return 0
