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

from sft_jax.data import cache, examples, formats, hosts, sources, templates
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
ONE_PROCESS = hosts.Processes()


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


def _format(src: sources.Source, spec: DataSpec, head: list) -> str:
    """data.format, or the format the first rows show when it is auto."""
    if spec.format != "auto":
        return spec.format
    sample = next((r for r in head if isinstance(r, dict)), None)
    if sample is None:
        return "alpaca"  # Nothing parseable: the rows fail later with their own messages.
    try:
        return formats.detect(sample, Fields.parse(spec.fields))
    except ValueError as e:
        raise ValueError(f"{src.key}={src.text!r}: {e}") from None


def _stop_at_bad_rows(chunk: examples.Chunk, first: int, src, spec: DataSpec, fmt: str) -> None:
    """Raises for the chunk's first row that the config says is an error (the row counted
    from the source's start: `first` is the chunk's)."""
    bad_codes = [CODES[r] for r in BAD_ROW_REASONS]
    for i in np.flatnonzero(np.isin(chunk.status, bad_codes + [CODES["too_long"]])):
        reason = NAMES[int(chunk.status[i])]
        if (reason == "too_long" and spec.too_long == "error") or (
            reason != "too_long" and spec.on_bad_row == "error"
        ):
            _raise_bad_row(src, first + int(i), reason, chunk.problems.get(int(i), ""), fmt)


def encode_source(
    src: sources.Source, spec: DataSpec, tokenizer, template, share: tuple[int, int] = (0, 1)
) -> tuple[examples.Chunk, str, np.ndarray]:
    """Reads every row of `src` and turns the rows of this process's `share` (index, count:
    chunk k of CHUNK_ROWS rows is process k % count's) into examples or drop reasons;
    returns them, the rows' format (resolved, when data.format=auto) and the source row of
    each of them."""
    index, count = share
    rows = src.rows()
    head = list(itertools.islice(rows, CHUNK_ROWS))
    fmt = _format(src, spec, head)
    encoder = examples.make_encoder(spec, tokenizer, template, fmt)
    buffered = [head]
    workers = spec.num_workers
    if workers < 0:  # Auto: processes only when the data is large enough to pay for them.
        while len(buffered) * CHUNK_ROWS < AUTO_WORKERS_MIN_ROWS and len(buffered[-1]):
            buffered.append(list(itertools.islice(rows, CHUNK_ROWS)))
        large = len(buffered[-1]) > 0 and len(buffered) * CHUNK_ROWS >= AUTO_WORKERS_MIN_ROWS
        workers = min(cores(), MAX_WORKERS) if large and cores() > 1 else 0

    firsts: list[int] = []  # The source row of each chunk this process encodes, in order.
    total = 0  # Rows read, this process's or not.

    def chunks() -> Iterator[list]:
        nonlocal total
        more = iter(lambda: list(itertools.islice(rows, CHUNK_ROWS)), [])
        for k, chunk in enumerate(itertools.chain(buffered, more)):
            if chunk and k % count == index:
                firsts.append(total)
                yield chunk
            total += len(chunk)

    parts: list[examples.Chunk] = []
    for j, chunk in enumerate(encode_chunks(chunks(), encoder, workers)):
        # firsts[j] was appended when chunk j was read, before its result came back.
        _stop_at_bad_rows(chunk, firsts[j], src, spec, fmt)
        parts.append(chunk)
    if total == 0:
        raise ValueError(f"{src.key}={src.text!r} holds no rows")
    if not parts:  # More processes than chunks: nothing for this one.
        return _no_rows(), fmt, np.zeros(0, np.int64)
    source_rows = [np.arange(f, f + len(c.status)) for f, c in zip(firsts, parts, strict=True)]
    return examples.Chunk.concat(parts), fmt, np.concatenate(source_rows)


def _no_rows() -> examples.Chunk:
    return examples.Chunk(
        ids=np.zeros(0, np.int32), trainable=np.zeros(0, np.bool_), starts=np.zeros(1, np.int64),
        status=np.zeros(0, np.int8), flags=np.zeros(0, np.uint8), problems={},
    )  # fmt: skip


# ---------------------------------------------------------------- examples -> packed split


def held_out_mask(
    n: int, fraction: float, seed: int, src: sources.Source | None = None
) -> np.ndarray:
    """A boolean mask of the held-out rows: an exact, seeded `fraction` of all `n` rows."""
    n_val = round(n * fraction)
    if not 1 <= n_val < n:
        of = f" ({src.key}={src.text!r})" if src is not None else ""
        split = "validation" if n_val < 1 else "train"
        raise ValueError(
            f"data.validation={fraction} of {n} rows{of} leaves an empty {split} split; change "
            "the fraction or give a validation source"
        )
    held_out = np.zeros(n, np.bool_)
    held_out[np.random.default_rng([seed, _SPLIT]).permutation(n)[:n_val]] = True
    return held_out


def _refuse_all_dropped(chunk: examples.Chunk, src: sources.Source) -> None:
    """Raises, naming the source and the real cause, if no row of it gave an example (before
    any held-out split, whose emptiness would be the wrong thing to report)."""
    if len(chunk.status) == 0 or (chunk.status == 0).any():
        return
    counts = collections.Counter(NAMES[int(c)] for c in chunk.status)
    causes = ", ".join(f"{r} ({k})" if len(counts) > 1 else r for r, k in counts.most_common())
    first = min(chunk.problems, default=None)
    example = f" First: {src.where(first)}: {chunk.problems[first]}." if first is not None else ""
    raise ValueError(
        f"all {len(chunk.status)} rows of {src.key}={src.text!r} were dropped: {causes}."
        + example
        + " "
        + " ".join(f"{r}: {hint(r)}." for r in counts)
    )


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
    kept_rows = source.example_rows()  # The source row of each example.
    n_read = int(rows.sum())
    counts = np.bincount(status, minlength=len(CODES) + 1)
    dropped = {NAMES[c]: int(counts[c]) for c in np.flatnonzero(counts) if c}
    n_dropped = sum(dropped.values())
    selected = np.flatnonzero(rows[kept_rows])  # Examples of this split.
    problems = [f"{src.where(r)}: {p}" for r, p in sorted(source.problems.items()) if rows[r]][:10]
    common = max(dropped, key=dropped.get) if dropped else ""
    example = next(
        (f"{src.where(r)}: {p}" for r, p in sorted(source.problems.items())
         if rows[r] and NAMES.get(int(source.status[r])) == common),
        problems[0] if problems else "",
    )  # fmt: skip
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
            + (f" Most are {common}, e.g. {example}." if example else "")
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
        **_split_stats(flags, status, source.examples_per_row[rows]),
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


def _split_stats(flags: np.ndarray, status: np.ndarray, per_row: np.ndarray) -> dict:
    """What data.split_turns did to a split's rows: the kept rows split into one example per
    assistant turn, the examples they gave, and those of them that lost some turns to
    data.max_seq_len."""
    split = (flags & examples.SPLIT_TURNS != 0) & (status == 0)
    return {
        "split_rows": int(split.sum()),
        "split_examples": int(per_row[split].sum()),
        "split_rows_missing_turns": int((flags[split] & examples.TURNS_DROPPED != 0).sum()),
    }


# ---------------------------------------------------------------- the entry point


def _sources(spec: DataSpec) -> tuple[sources.Source, sources.Source | None, float | None]:
    """The train source, a separate validation source (or None) and the held-out fraction."""
    skip = spec.on_bad_row == "skip"
    train_src = sources.Source(spec.train, "data.train", spec.streaming, skip)
    fraction = validation_fraction(spec.validation) if spec.validation else None
    val_src = None
    if spec.validation and fraction is None:
        val_src = sources.Source(spec.validation, "data.validation", spec.streaming, skip)
    return train_src, val_src, fraction


def _encode(spec, tokenizer, template, srcs: dict, share=(0, 1)) -> dict:
    """{source name: (Chunk, format, source rows)} of this process's share of each source."""
    return {name: encode_source(s, spec, tokenizer, template, share) for name, s in srcs.items()}


def _pack_all(
    spec: DataSpec, encoded: dict, srcs: dict, fraction: float | None, tokenized: dict
) -> tuple[dict[str, PackedRows], dict]:
    """The packed splits and their stats from every source's examples (`encoded`: {name:
    (Chunk, format)}; `tokenized`: {name: rows each process tokenized}."""
    train_rows, fmt = encoded["train"]
    train_src = srcs["train"]
    train = np.ones(len(train_rows.status), np.bool_)
    stats: dict = {}
    splits: dict[str, PackedRows] = {}
    _refuse_all_dropped(train_rows, train_src)
    if fraction:  # 0 means none, like "" (a numeric config override may give 0).
        held_out = held_out_mask(len(train), fraction, spec.seed, train_src)
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
    if "validation" in encoded:
        val_rows, val_fmt = encoded["validation"]
        _refuse_all_dropped(val_rows, srcs["validation"])
        splits["validation"], stats["validation"] = _pack_split(
            val_rows, val_fmt, np.ones(len(val_rows.status), np.bool_), spec,
            srcs["validation"], "validation", _SHUFFLE_VAL,
        )  # fmt: skip
    for name, counts in tokenized.items():  # Per source: the validation split may be held out.
        stats[name]["rows_tokenized_by_process"] = counts
    for name, s in stats.items():
        log.info("data %s: %s", name, {k: v for k, v in s.items() if k != "problems"})
    return splits, stats


def _build_here(spec, tokenizer, template, srcs, fraction) -> tuple[dict, dict]:
    """Every row tokenized and packed in this process."""
    encoded = _encode(spec, tokenizer, template, srcs)
    tokenized = {name: [len(rows)] for name, (_, _, rows) in encoded.items()}
    encoded = {name: (chunk, fmt) for name, (chunk, fmt, _) in encoded.items()}
    return _pack_all(spec, encoded, srcs, fraction, tokenized)


def _build_together(
    spec, tokenizer, template, srcs, fraction, processes: hosts.Processes, cache_key, inputs
) -> None:
    """Each process tokenizes its share into the cache directory; process 0 joins, packs and
    writes the entry (see `hosts`). Returns once the entry is written."""
    scratch = cache.directory(spec) / f".build-{cache_key}"
    share = (processes.index, processes.count)

    def tokenize() -> None:
        scratch.mkdir(parents=True, exist_ok=True)
        hosts.part_path(scratch, processes).unlink(missing_ok=True)  # A stale one.
        hosts.write_part(scratch, processes, _encode(spec, tokenizer, template, srcs, share))

    hosts.together(scratch, processes, "tokenize", tokenize)
    hosts.check_parts(scratch, processes, cache_key)

    def pack_and_save() -> None:
        parts = hosts.read_parts(scratch, processes)
        encoded = {name: hosts.join(parts, name) for name in srcs}
        tokenized = {name: [len(p[name][2]) for p in parts] for name in srcs}
        splits, stats = _pack_all(spec, encoded, srcs, fraction, tokenized)
        cache.save(spec, cache_key, inputs, splits, stats)

    hosts.together(scratch, processes, "pack", pack_and_save if processes.index == 0 else None)
    if processes.index == 0:  # Every process has seen every part: the parts can go.
        scratch.rmtree(missing_ok=True)


def build_splits(
    spec: DataSpec,
    tokenizer: transformers.PreTrainedTokenizerBase,
    processes: hosts.Processes = ONE_PROCESS,
) -> DataSplits:
    """Reads, tokenizes and packs the train split and, if asked for, the validation split
    (or loads them from the cache). With several `processes` (and the cache on), each
    tokenizes only its share of the rows and all of them load the one entry they build."""
    check(spec)
    if tokenizer.eos_token is None:
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} (model.tokenizer) has no EOS token; "
            "sft_jax ends every response with one"
        )
    template = templates.resolve_template(spec, tokenizer)
    train_src, val_src, fraction = _sources(spec)
    srcs = {"train": train_src, **({"validation": val_src} if val_src else {})}
    if not spec.cache:
        if processes.count > 1:
            log.warning(
                "data.cache=False: each of the %d processes tokenizes every row; turn the cache "
                "on (data.cache_dir shared by all hosts) to tokenize each row once",
                processes.count,
            )
        splits, stats = _build_here(spec, tokenizer, template, srcs, fraction)
        return DataSplits(splits["train"], splits.get("validation"), stats)
    ids = [s.fingerprint() for s in srcs.values()]
    cache_key, inputs = cache.key(spec, tokenizer, templates.template_id(template), ids)
    path = str(cache.directory(spec) / cache_key)
    hit = cache.load(spec, cache_key)
    if processes.sync(int(hit is not None)):  # Loaded on every process: the same branch.
        splits, stats = hit
        log.info("data: loaded from the cache %s", path)
        return DataSplits(splits["train"], splits.get("validation"), stats, path, True)
    if processes.count == 1:
        splits, stats = _build_here(spec, tokenizer, template, srcs, fraction)
        cache.save(spec, cache_key, inputs, splits, stats)
        return DataSplits(splits["train"], splits.get("validation"), stats, path, False)
    _build_together(spec, tokenizer, template, srcs, fraction, processes, cache_key, inputs)
    hit = cache.load(spec, cache_key)
    if hit is None:  # Process 0 wrote it where every part was seen: not expected.
        raise ValueError(hosts.not_shared(cache.directory(spec), processes.index, 0, cache_key))
    splits, stats = hit
    return DataSplits(splits["train"], splits.get("validation"), stats, path, False)
