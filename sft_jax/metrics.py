"""Run metrics: the window of steps behind each record (loss, throughput, MFU), and
`metrics.jsonl`, the experiment trackers (`trackers.py`) and a progress bar to write it
to; the data summary as a table for people.

Only process 0 writes; the others get a logger that does nothing.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from sft_jax import paths
from sft_jax.trackers import RUN_ARTIFACTS, make_trackers, tracker_names

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
    """FLOP/s of a float32 n×n matmul on the default device: the best of at least `repeats`
    runs, repeated until `seconds` have passed. On a shared machine a few runs can all land
    in a slow moment; the best of more is closer to what the cores can do (a higher peak, so
    a lower MFU, never a flattering one)."""
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


CPU_PEAK_SIZES = (1024, 2048)
CPU_PEAK_SECONDS = 0.5  # per size
CPU_PEAK_SOURCE = (
    f"measured float32 matmul, best of n={', '.join(map(str, CPU_PEAK_SIZES))} "
    f"over {CPU_PEAK_SECONDS:g} s each"
)


def cpu_peak_flops() -> float:
    """This host's practical float32 peak (all cores): the one CPU measurement behind every
    MFU the project reports, in metrics.jsonl and in tools/benchmark.py alike."""
    return max(measure_matmul_flops(n, seconds=CPU_PEAK_SECONDS) for n in CPU_PEAK_SIZES)


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
        return cpu_peak_flops() / jax.local_device_count(), CPU_PEAK_SOURCE
    return 0.0, f"unknown device kind {kind!r}: set train.peak_flops"


class MetricsWindow:
    """The train steps since the last record, turned into one record.

    Device metrics are read one step late: `add(step, …)` is called right after step i+1 is
    dispatched and reads step i, so the host never waits for the step it just queued. The
    first step a process runs compiles: it is read at once, timed apart (`compile_s` in the
    next record) and left out of the throughput, though its loss counts. Time spent in
    `paused()` (evaluation, saving) is not training time.
    """

    def __init__(
        self,
        flops_per_row: Callable[[int], float],
        batch_size: int,
        peak_flops_total: float,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self._flops_per_row = flops_per_row  # FLOPs of one row of the given width
        self._batch_size = batch_size
        self._peak = peak_flops_total
        self._clock = clock
        self._pending: tuple[int, Any, int] | None = None  # step, device metrics, width
        self._steps: list[dict] = []  # host copies, each with its batch width
        # Set in the window whose first step compiled; that step is then left out of the timing.
        self._compile_s: float | None = None
        self._compiled = False
        self._start = clock()
        self._paused_s = 0.0

    def add(self, step: int, device_metrics: dict, width: int) -> None:
        """Step `step` (1-based count of steps done) was dispatched with batch width `width`."""
        self.read()
        self._pending = (step, device_metrics, width)
        if not self._compiled:
            self.read()
            self._compiled = True
            self._compile_s = self._clock() - self._start
            logging.info("first step (compile included) took %.1f s", self._compile_s)
            self._start, self._paused_s = self._clock(), 0.0

    def read(self) -> None:
        """Wait for the pending step's metrics; stop on a non-finite loss or gradient (the
        step left the state untouched, so what was saved before it is good)."""
        if self._pending is None:
            return
        step, device_metrics, width = self._pending
        self._pending = None
        host = jax.device_get(device_metrics)
        if not bool(host["finite"]):
            raise FloatingPointError(
                f"non-finite loss or gradient at step {step} (loss={float(host['loss'])}, "
                f"grad_norm={float(host['grad_norm'])}): the update was not applied and "
                "nothing was saved. Lower optim.learning_rate or check the data."
            )
        self._steps.append(host | {"width": width})

    @contextlib.contextmanager
    def paused(self):
        """Leave what runs inside out of the training time."""
        start = self._clock()
        try:
            yield
        finally:
            self._paused_s += self._clock() - start

    def record(self) -> dict[str, float]:
        """The record of every step since the last one, then start a new window: loss
        token-weighted over all of them; throughput and MFU over the timed ones."""
        self.read()
        window = self._steps
        elapsed = max(self._clock() - self._start - self._paused_s, 1e-9)
        loss_tokens = sum(float(m["loss_tokens"]) for m in window)
        loss_sum = sum(float(m["loss"]) * float(m["loss_tokens"]) for m in window)
        timed = window[1:] if self._compile_s is not None else window
        record = {
            "loss": loss_sum / max(loss_tokens, 1.0),
            "learning_rate": float(window[-1]["learning_rate"]),
            "grad_norm": float(window[-1]["grad_norm"]),
            "tokens": sum(float(m["tokens"]) for m in window),
            "loss_tokens": loss_tokens,
        }
        for key in ("router_aux_loss", "router_z_loss"):  # a mixture of experts' (steps.py)
            if key in window[-1]:
                record[key] = sum(float(m[key]) for m in window) / len(window)
        if timed:  # a window of the compiling step alone has no throughput to report
            flops = sum(self._flops_per_row(m["width"]) * self._batch_size for m in timed)
            record["tokens_per_sec"] = sum(float(m["tokens"]) for m in timed) / elapsed
            record["step_time_s"] = elapsed / len(timed)
            record["mfu"] = flops / elapsed / self._peak if self._peak else 0.0
        if self._compile_s is not None:
            record["compile_s"] = self._compile_s
        self._steps, self._compile_s = [], None
        self._start, self._paused_s = self._clock(), 0.0
        return record


class StepProfiler:
    """A `jax.profiler` trace of the steps [start, start + count) in `directory` (a bucket
    URL too: the trace is written to a local folder, then copied there)."""

    def __init__(self, directory: str, start: int, count: int):
        self._directory = directory
        self._start, self._end = start, start + count
        self._active = False
        self._local = ""

    def before(self, step: int) -> None:
        """Step `step` (0-based) is about to be dispatched."""
        if step == self._start and self._end > self._start:
            remote = paths.is_remote(self._directory)
            self._local = tempfile.mkdtemp(prefix="sft_jax-profile-") if remote else ""
            jax.profiler.start_trace(self._local or self._directory)
            self._active = True
            logging.info("profiling steps %d to %d into %s", step, self._end - 1, self._directory)

    def after(self, done: int, outputs: Any) -> None:
        """`done` steps are dispatched; `outputs` are the last one's (waited for at the end)."""
        if self._active and done == self._end:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        if self._active:
            jax.profiler.stop_trace()
            self._active = False
            if self._local:
                paths.upload(self._local, self._directory)
                shutil.rmtree(self._local, ignore_errors=True)


class AppendedFile:
    """A text file that grows by lines, flushed after each: appended to on a local disk;
    in a bucket, where an object cannot be appended to, rewritten whole (what was there
    before, then every line since), at most every `remote_flush_s` seconds and at close."""

    def __init__(self, path: str, remote_flush_s: float = 10.0):
        self.path = path
        self._remote = paths.is_remote(path)
        self._flush_s = remote_flush_s if self._remote else 0.0
        self._last_flush = -math.inf
        if self._remote:
            file = epath.Path(path)
            self._text = [file.read_text(encoding="utf-8")] if file.exists() else []
        else:
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close)

    def write(self, line: str) -> bool:
        """Add one line; returns whether it was flushed now."""
        if not self._remote:
            self._file.write(line + "\n")
            self._file.flush()
            return True
        self._text.append(line + "\n")
        if time.monotonic() - self._last_flush < self._flush_s:
            return False
        self.flush()
        return True

    def flush(self) -> None:
        if self._remote:
            epath.Path(self.path).write_text("".join(self._text), encoding="utf-8")
            self._last_flush = time.monotonic()

    def close(self) -> None:
        if self._remote:
            self.flush()
        else:
            self._file.close()


class MetricsLogger:
    """Writes each logged step to metrics.jsonl, the trackers and the console; at close, the
    run's report and loss curve (those that exist) to the trackers that keep files."""

    def __init__(
        self,
        workdir: str,
        train,
        total_steps: int,
        start_step: int,
        enabled: bool = True,
        run_config: dict | None = None,
    ):
        """`train`: the run's train section (`config.TrainConfig`: progress_bar, trackers,
        tracker_project, mlflow_tracking_uri); `run_config`: the config the trackers
        record."""
        self.enabled = enabled
        self._workdir = workdir
        self._jsonl = None
        self._trackers = []
        self._bar = None
        names = tracker_names(train.trackers)  # bad names fail on every process alike
        if not enabled:
            return
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)
        self._jsonl = AppendedFile(paths.join(workdir, "metrics.jsonl"))
        self._trackers = make_trackers(
            names, workdir, train.tracker_project, run_config, train.mlflow_tracking_uri
        )
        if train.progress_bar:
            from tqdm import tqdm

            # disable=None: no bar when stderr is not a terminal (logs, CI).
            self._bar = tqdm(
                total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, disable=None
            )

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        flushed = self._jsonl.write(json.dumps(record))
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        for tracker in self._trackers:
            tracker.log(step, scalars)
            if flushed:  # in a bucket, events are copied up when metrics.jsonl is
                tracker.flush()
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
        files = [paths.join(self._workdir, name) for name in RUN_ARTIFACTS]
        files = [f for f in files if epath.Path(f).exists()] if self._trackers else []
        for tracker in self._trackers:
            tracker.save_files(files)
            tracker.close()
        self._trackers = []


def data_table(stats: dict[str, Any]) -> str:
    """The data a run trains on (`DataSplits.stats`) as a table a person reads: a column per
    split; rows read, examples kept, dropped (each reason on a line of its own), responses
    and prompts cut at data.max_seq_len, tokens, trained (loss) tokens, packed rows and
    packing efficiency, and a mixture's sources with their share of the examples."""
    splits = {k: v for k, v in stats.items() if isinstance(v, dict) and "rows_read" in v}
    reasons = sorted({reason for s in splits.values() for reason in s["dropped"]})
    sources = list(dict.fromkeys(n for s in splits.values() for n in s.get("sources", {})))
    lines: list[tuple[str, Callable[[dict], str]]] = [
        ("rows read", lambda s: f"{s['rows_read']:,}"),
        ("examples kept", lambda s: f"{s['examples']:,}"),
        ("dropped", lambda s: f"{sum(s['dropped'].values()):,}"),
        *((f"  {r}", lambda s, r=r: f"{s['dropped'].get(r, 0):,}") for r in reasons),
    ]
    if any(s.get("split_rows") for s in splits.values()):
        lines.append(("conversations split", _split_conversations))
    lines += [
        ("responses cut", lambda s: f"{s['responses_truncated']:,}"),
        ("prompts cut", lambda s: f"{s['prompts_truncated']:,}"),
        ("tokens", lambda s: f"{s['tokens']:,}"),
        ("trained tokens", _trained_tokens),
        ("packed rows", lambda s: f"{s['rows']:,}"),
        ("packing efficiency", lambda s: f"{s['packing_efficiency']:.1%}"),
        *((f"  from {n}", lambda s, n=n: _source_share(s, n)) for n in sources),
    ]
    header = ["data", *splits]
    return _aligned([header] + [[label, *map(cell, splits.values())] for label, cell in lines])


def _aligned(table: list[list[str]]) -> str:
    """Rows of cells as text: the first column to the left, the others to the right."""
    widths = [max(map(len, column)) for column in zip(*table, strict=True)]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in table
    )


def _trained_tokens(split: dict) -> str:
    """Loss tokens and their share of the tokens."""
    share = f"{split['loss_tokens'] / split['tokens']:.1%}" if split["tokens"] else "n/a"
    return f"{split['loss_tokens']:,} ({share})"


def _split_conversations(split: dict) -> str:
    """Conversations split per assistant turn: rows → examples."""
    return f"{split.get('split_rows', 0):,} → {split.get('split_examples', 0):,}"


def _source_share(split: dict, name: str) -> str:
    """One mixture source's examples in the split's epoch and their share."""
    source = split.get("sources", {}).get(name)
    if source is None:
        return "-"
    return f"{source.get('examples_in_epoch', source['examples']):,} ({source['share']:.0%})"


def _plain(v: Any) -> Any:
    v = np.asarray(v) if not isinstance(v, (int, float, str, bool)) else v
    if isinstance(v, np.ndarray):
        v = v.item()
    return v


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
