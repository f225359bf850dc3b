"""Run metrics: `metrics.jsonl`, TensorBoard events, a progress bar, and MFU.

Only process 0 writes; the others get a logger that does nothing.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets, matched on device_kind.
PEAK_FLOPS_BF16 = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L4": 121e12,
}


def measure_matmul_flops(n: int = 1024, repeats: int = 5, seconds: float = 0.0) -> float:
    """FLOP/s of a float32 n×n matmul on the default device: the CPU's practical peak.
    The best of at least `repeats` runs, repeated until `seconds` have passed: on a shared
    machine a few runs can all land in a slow moment, and the best of more is closer to
    what the cores can do (a higher peak, so a lower MFU, never a flattering one)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best, runs, start = math.inf, 0, time.perf_counter()
    while runs < repeats or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
        runs += 1
    return 2 * n**3 / best


def peak_flops_per_device(configured: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure came from)."""
    if configured > 0:
        return configured, "config train.peak_flops"
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS_BF16.items():
        if name.lower() in kind.lower():
            return flops, f"{kind} bf16 data sheet"
    if jax.default_backend() == "cpu":
        # Faked CPU devices share the same cores: divide the measured peak between them.
        return measure_matmul_flops() / jax.local_device_count(), "measured float32 matmul"
    return 0.0, f"unknown device kind {kind!r}: set train.peak_flops"


class MetricsLogger:
    """Writes each logged step to metrics.jsonl, TensorBoard and the console."""

    def __init__(
        self,
        workdir: str,
        total_steps: int,
        start_step: int,
        enabled: bool = True,
        progress_bar: bool = True,
    ):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
        from tensorboardX import SummaryWriter  # imported here: only process 0 needs it

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        if progress_bar:
            from tqdm import tqdm

            # disable=None: no bar when stderr is not a terminal (logs, CI).
            self._bar = tqdm(
                total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, disable=None
            )

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, step)
        self._tb.flush()
        shown = " ".join(f"{k}={_short(v)}" for k, v in record.items())
        if self._bar is not None:
            self._bar.write(shown)
        else:
            logging.info("%s", shown)

    def progress(self, step: int, loss: float | None = None, tokens_per_sec: float | None = None):
        if self._bar is None:
            return
        self._bar.n = step
        postfix = {}
        if loss is not None:
            postfix["loss"] = f"{loss:.4f}"
        if tokens_per_sec is not None:
            postfix["tok/s"] = f"{tokens_per_sec:,.0f}"
        self._bar.set_postfix(postfix, refresh=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _plain(v: Any) -> Any:
    v = np.asarray(v) if not isinstance(v, (int, float, str, bool)) else v
    if isinstance(v, np.ndarray):
        v = v.item()
    return v


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
