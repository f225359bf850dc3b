"""`build_splits`: sources -> examples -> (held-out split) -> seeded shuffle -> packed rows.

Rows stream from the source in chunks; each chunk is normalised, rendered, tokenized
and fitted by `examples.encode_chunk`, in worker processes when the data is large. Bad
rows stop the build at the first one, naming file, line and field, unless
`data.on_bad_row=skip`. The result is a pure function of (data, spec, tokenizer), kept
in the on-disk cache under a key of all three.

Worker processes are spawned, not forked: the parent may run JAX's threads, and forking
those can deadlock. Spawned workers re-import the main module, so a script that builds
data with workers needs the `if __name__ == "__main__":` guard; if the workers cannot
start, the rest runs in this process, with a warning. At most 2 chunks per worker are in
flight: a huge stream never piles up in memory.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import logging
import multiprocessing
import os
import pickle
import tempfile
from collections.abc import Iterator

import numpy as np
import transformers

from sft_jax.data import cache, examples, formats, sources, templates
from sft_jax.data.packing import PackedRows
from sft_jax.data.spec import (
    BAD_ROW_REASONS,
    CODES,
    NAMES,
    DataSpec,
    Fields,
    check,
    hint,
    validation_fraction,
)

log = logging.getLogger(__name__)

CHUNK_ROWS = 1024
AUTO_WORKERS_MIN_ROWS = 16 * CHUNK_ROWS  # Below this, starting processes costs more than it saves.
MAX_WORKERS = 8
# Distinct random streams derived from the one seed, so the split does not change when
# the shuffle does, and vice versa.
_SPLIT, _SHUFFLE_TRAIN, _SHUFFLE_VAL = 1, 2, 3


@dataclasses.dataclass
class DataSplits:
    train: PackedRows
    validation: PackedRows | None
    stats: dict  # {"train": {...}, "validation": {...}}: counts, drops by reason, efficiency.
    cache_path: str = ""  # The cache entry these came from or went to ("" = no cache).
    cache_hit: bool = False


# ---------------------------------------------------------------- worker processes

_WORKER_ENCODER: examples.Encoder | None = None


def _init_worker(encoder_path: str) -> None:
    global _WORKER_ENCODER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # One process per core already.
    with open(encoder_path, "rb") as f:
        _WORKER_ENCODER = pickle.load(f)


def _work(rows: list) -> examples.Chunk:
    return examples.encode_chunk(rows, _WORKER_ENCODER)


def encode_chunks(chunks: Iterator[list], encoder, workers: int) -> Iterator[examples.Chunk]:
    """encode_chunk over `chunks`, in order; in `workers` processes if > 0. If the processes
    cannot start (e.g. the main script cannot be re-imported), the rest runs here."""
    if workers <= 0:
        for rows in chunks:
            yield examples.encode_chunk(rows, encoder)
        return
    # The encoder (tokenizer included, megabytes) goes through a file: start-up data that
    # a dying child does not read would block the parent's write to it forever.
    with tempfile.NamedTemporaryFile(prefix="sft_jax_encoder_", delete=False) as f:
        pickle.dump(encoder, f)
    # spawn, not fork: the parent may run JAX's threads, and forking those can deadlock.
    pool = concurrent.futures.ProcessPoolExecutor(
        workers, multiprocessing.get_context("spawn"), _init_worker, (f.name,)
    )
    pending: collections.deque = collections.deque()  # (rows, future or None), in order
    broken = False

    def result(rows, future) -> examples.Chunk:
        nonlocal broken
        if future is not None and not broken:
            try:
                return future.result()
            except concurrent.futures.process.BrokenProcessPool as e:
                broken = True
                log.warning("data: worker processes failed (%s); tokenizing in this one", e)
        return examples.encode_chunk(rows, encoder)

    try:
        for rows in chunks:
            future = None
            if not broken:
                try:
                    future = pool.submit(_work, rows)
                except concurrent.futures.process.BrokenProcessPool:
                    broken = True
            pending.append((rows, future))
            while len(pending) >= (1 if broken else 2 * workers):  # Bounded read-ahead.
                yield result(*pending.popleft())
        while pending:
            yield result(*pending.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        os.remove(f.name)


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ---------------------------------------------------------------- one source -> examples


def _raise_bad_row(src: sources.Source, row: int, reason: str, problem: str, fmt: str):
    where = f"{src.key}={src.text!r}: {src.where(row)}"
    if reason == "too_long":
        raise ValueError(
            f"{where}: the example has {problem.split(',')[0]}, more than data.max_seq_len + 1; "
            "raise data.max_seq_len or set data.too_long=truncate (or drop)"
        )
    raise ValueError(
        f"{where}: {problem} (data.format={fmt}, reason {reason}). Fix: {hint(reason)}. "
        "Or set data.on_bad_row=skip to skip such rows (counted and reported)."
    )


def encode_source(
    src: sources.Source, spec: DataSpec, tokenizer, template
) -> tuple[examples.Chunk, str]:
    """Reads every row of `src` and turns it into an example or a drop reason; returns them
    and the rows' format (resolved, when data.format=auto)."""
    rows = src.rows()
    first = list(itertools.islice(rows, CHUNK_ROWS))
    fmt = spec.format
    if fmt == "auto":
        sample = next((r for r in first if isinstance(r, dict)), None)
        if sample is None:
            fmt = "alpaca"  # Nothing parseable: the rows fail below with their own messages.
        else:
            try:
                fmt = formats.detect(sample, Fields.parse(spec.fields))
            except ValueError as e:
                raise ValueError(f"{src.key}={src.text!r}: {e}") from None
    encoder = examples.make_encoder(spec, tokenizer, template, fmt)
    buffered = [first]
    workers = spec.num_workers
    if workers < 0:  # Auto: processes only when the data is large enough to pay for them.
        while len(buffered) * CHUNK_ROWS < AUTO_WORKERS_MIN_ROWS and len(buffered[-1]):
            buffered.append(list(itertools.islice(rows, CHUNK_ROWS)))
        large = len(buffered[-1]) > 0 and len(buffered) * CHUNK_ROWS >= AUTO_WORKERS_MIN_ROWS
        workers = min(cores(), MAX_WORKERS) if large and cores() > 1 else 0

    def chunks() -> Iterator[list]:
        yield from (c for c in buffered if c)
        while chunk := list(itertools.islice(rows, CHUNK_ROWS)):
            yield chunk

    parts: list[examples.Chunk] = []
    offset = 0
    bad_codes = [CODES[r] for r in BAD_ROW_REASONS]
    for chunk in encode_chunks(chunks(), encoder, workers):
        for i in np.flatnonzero(np.isin(chunk.status, bad_codes + [CODES["too_long"]])):
            reason = NAMES[int(chunk.status[i])]
            if (reason == "too_long" and spec.too_long == "error") or (
                reason != "too_long" and spec.on_bad_row == "error"
            ):
                _raise_bad_row(src, offset + int(i), reason, chunk.problems.get(int(i), ""), fmt)
        parts.append(chunk)
        offset += len(chunk.status)
    if offset == 0:
        raise ValueError(f"{src.key}={src.text!r} holds no rows")
    return examples.Chunk.concat(parts), fmt


# ---------------------------------------------------------------- examples -> packed split


def held_out_mask(n: int, fraction: float, seed: int) -> np.ndarray:
    """A boolean mask of the held-out rows: an exact, seeded `fraction` of all `n` rows."""
    n_val = round(n * fraction)
    if not 1 <= n_val < n:
        raise ValueError(
            f"data.validation={fraction} of {n} rows leaves an empty split; change the "
            "fraction or give a validation source"
        )
    held_out = np.zeros(n, np.bool_)
    held_out[np.random.default_rng([seed, _SPLIT]).permutation(n)[:n_val]] = True
    return held_out


def _pack_split(
    source: examples.Chunk,
    fmt: str,
    rows: np.ndarray,
    spec: DataSpec,
    src: sources.Source,
    name: str,
    stream: int,
) -> tuple[PackedRows, dict]:
    """Packs the examples of the selected `rows` (a bool mask over the source's rows)."""
    status, flags = source.status[rows], source.flags[rows]
    kept_rows = np.flatnonzero(source.status == 0)  # The source row of each example.
    n_read = int(rows.sum())
    counts = np.bincount(status, minlength=len(CODES) + 1)
    dropped = {NAMES[c]: int(counts[c]) for c in np.flatnonzero(counts) if c}
    n_dropped = sum(dropped.values())
    selected = np.flatnonzero(rows[kept_rows])  # Examples of this split.
    problems = [f"{src.where(r)}: {p}" for r, p in sorted(source.problems.items()) if rows[r]][:10]
    if not len(selected):
        raise ValueError(
            f"no {name} examples left of {n_read} rows ({src.key}={src.text!r}); dropped: "
            f"{dropped}. " + " ".join(f"{r}: {hint(r)}." for r in dropped)
        )
    if n_dropped > spec.max_drop_fraction * n_read:
        raise ValueError(
            f"{n_dropped} of {n_read} {name} rows were dropped ({n_dropped / n_read:.1%}, more "
            f"than data.max_drop_fraction={spec.max_drop_fraction}): {dropped}. "
            + " ".join(f"{r}: {hint(r)}." for r in dropped)
            + (f" First: {problems[0]}." if problems else "")
            + " Raise data.max_drop_fraction to accept this."
        )
    # Shuffle so rows mix sources and lengths tie-break by chance, not by file order.
    order = selected[np.random.default_rng([spec.seed, stream]).permutation(len(selected))]
    packed = PackedRows.pack(
        source,
        spec.max_seq_len,
        packed=spec.packing,
        max_segments=spec.max_segments,
        pad_multiple=spec.pad_multiple,
        source_rows=kept_rows,
        order=order,
    )
    segments = np.diff(packed.row_starts)
    trainable = packed.trainable.astype(np.int64)
    loss = np.add.reduceat(trainable, packed.starts[:-1]) - trainable[packed.starts[:-1]]
    stats = {
        "format": fmt,
        "rows_read": n_read,
        "examples": len(order),
        "dropped": dropped,
        "responses_truncated": int((flags & examples.RESPONSE_CUT != 0).sum()),
        "prompts_truncated": int((flags & examples.PROMPT_CUT != 0).sum()),
        # Kept rows whose responses end in no special token: the template writes no EOS.
        "responses_without_end_token": int(
            ((flags & examples.NO_END_TOKEN != 0) & (status == 0)).sum()
        ),
        "rows": len(packed),
        "tokens": int(packed.row_lengths.sum()),
        "loss_tokens": int(loss.sum()),
        "packing_efficiency": packed.efficiency(),
        "segments_per_row": {"mean": float(segments.mean()), "max": int(segments.max())},
        "problems": problems,
    }
    if n_dropped or stats["responses_truncated"] or stats["prompts_truncated"]:
        log.warning(
            "data %s: %d of %d rows dropped %s; %d responses cut at data.max_seq_len=%d "
            "(each lost its EOS: the model sees them but not where they end); %d prompts cut "
            "from the left%s",
            name, n_dropped, n_read, dropped, stats["responses_truncated"], spec.max_seq_len,
            stats["prompts_truncated"], f". First problems: {problems[:3]}" if problems else "",
        )  # fmt: skip
    if stats["responses_without_end_token"]:
        log.warning(
            "data %s: %d responses end in no special token of the tokenizer (EOS or end of "
            "turn), so the model learns to stop only on text; data.template=%s does not write "
            "one the tokenizer knows",
            name, stats["responses_without_end_token"], spec.template,
        )  # fmt: skip
    return packed, stats


# ---------------------------------------------------------------- the entry point


def build_splits(spec: DataSpec, tokenizer: transformers.PreTrainedTokenizerBase) -> DataSplits:
    """Reads, tokenizes and packs the train split and, if asked for, the validation split
    (or loads them from the cache)."""
    check(spec)
    if tokenizer.eos_token is None:
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} (model.tokenizer) has no EOS token; "
            "sft_jax ends every response with one"
        )
    template = templates.resolve_template(spec, tokenizer)
    skip = spec.on_bad_row == "skip"
    train_src = sources.Source(spec.train, "data.train", spec.streaming, skip)
    fraction = validation_fraction(spec.validation) if spec.validation else None
    val_src = None
    if spec.validation and fraction is None:
        val_src = sources.Source(spec.validation, "data.validation", spec.streaming, skip)
    cache_key = cache_path = ""
    if spec.cache:
        ids = [s.fingerprint() for s in (train_src, val_src) if s is not None]
        cache_key, inputs = cache.key(spec, tokenizer, templates.template_id(template), ids)
        if hit := cache.load(spec, cache_key):
            splits, stats = hit
            path = str(cache.directory(spec) / cache_key)
            log.info("data: loaded from the cache %s", path)
            return DataSplits(splits["train"], splits.get("validation"), stats, path, True)

    train_rows, fmt = encode_source(train_src, spec, tokenizer, template)
    all_rows = np.ones(len(train_rows.status), np.bool_)
    train, train_stats = all_rows, None
    stats: dict = {}
    splits: dict[str, PackedRows] = {}
    if fraction:  # 0 means none, like "" (a numeric config override may give 0).
        held_out = held_out_mask(len(all_rows), fraction, spec.seed)
        train = ~held_out
        splits["validation"], stats["validation"] = _pack_split(
            train_rows, fmt, held_out, spec, train_src, "validation", _SHUFFLE_VAL
        )
    splits["train"], train_stats = _pack_split(
        train_rows, fmt, train, spec, train_src, "train", _SHUFFLE_TRAIN
    )
    stats = {"train": train_stats, **stats}
    if train_src.empty_files:
        stats["train"]["empty_files"] = train_src.empty_files
    if val_src is not None:
        val_rows, val_fmt = encode_source(val_src, spec, tokenizer, template)
        splits["validation"], stats["validation"] = _pack_split(
            val_rows, val_fmt, np.ones(len(val_rows.status), np.bool_), spec, val_src,
            "validation", _SHUFFLE_VAL,
        )  # fmt: skip
    for name, s in stats.items():
        log.info("data %s: %s", name, {k: v for k, v in s.items() if k != "problems"})
    if spec.cache:
        cache_path = str(cache.save(spec, cache_key, inputs, splits, stats))
    return DataSplits(splits["train"], splits.get("validation"), stats, cache_path, False)
