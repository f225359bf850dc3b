"""`build_splits`: sources -> examples -> (held-out split) -> seeded shuffle -> packed rows.

Rows stream from the source in chunks; each chunk is normalised, rendered, tokenized
and fitted by `examples.encode_chunk`, in worker processes when the data is large. Bad
rows stop the build at the first one, naming file, line and field, unless
`data.on_bad_row=skip`. The result is a pure function of (data, spec, tokenizer), kept
in the on-disk cache under a key of all three.

A mixture (several weighted sources, `sources.mixture`) is read source by source, each
with its own format and fields; each source's held-out rows are its own. Its training
examples are then resampled once to the weights (`mixture.mixture_counts`: each example
whole times over plus a seeded subset), and packed together: the epoch holds the weighted
shares, so batches stay a pure function of (data, config, seed, step). Its validation
rows are packed together (eval_loss) and source by source (eval_loss/<name>).

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
from sft_jax.data.mixture import Part, mix, mixture_stats
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
    # A mixture's validation rows source by source (for eval_loss/<name>); None: one source.
    validation_sources: dict[str, PackedRows] | None = None


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
        ids=np.zeros(0, np.int32),
        trainable=np.zeros(0, np.bool_),
        starts=np.zeros(1, np.int64),
        status=np.zeros(0, np.int8),
        flags=np.zeros(0, np.uint8),
        problems={},
    )


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


@dataclasses.dataclass(frozen=True)
class _Input:
    """A source to read: its Source, its place in the mixture, and the spec it is read with
    (the mixture's format and fields for it)."""

    src: sources.Source
    mix: sources.MixSource
    spec: DataSpec


def _select(part: Part, spec: DataSpec, split: str) -> tuple[np.ndarray, dict]:
    """The examples (indices into part.chunk) of the part's rows and the rows' counts; raises
    if none is left or more than data.max_drop_fraction of them were dropped."""
    chunk, rows, src = part.chunk, part.rows, part.src
    status, flags = chunk.status[rows], chunk.flags[rows]
    n_read = int(rows.sum())
    counts = np.bincount(status, minlength=len(CODES) + 1)
    dropped = {NAMES[c]: int(counts[c]) for c in np.flatnonzero(counts) if c}
    n_dropped = sum(dropped.values())
    selected = np.flatnonzero(rows[chunk.example_rows()])  # Examples of this split.
    problems = [f"{src.where(r)}: {p}" for r, p in sorted(chunk.problems.items()) if rows[r]][:10]
    if not len(selected):
        raise ValueError(
            f"no {split} examples left of {n_read} rows ({src.key}={src.text!r}); dropped: "
            f"{dropped}. " + " ".join(f"{r}: {hint(r)}." for r in dropped)
        )
    if n_dropped > spec.max_drop_fraction * n_read:
        common = max(dropped, key=dropped.get)
        example = next(
            (
                f"{src.where(r)}: {p}"
                for r, p in sorted(chunk.problems.items())
                if rows[r] and NAMES.get(int(chunk.status[r])) == common
            ),
            problems[0] if problems else "",
        )
        raise ValueError(
            f"{n_dropped} of {n_read} {split} rows of {src.key}={src.text!r} were dropped "
            f"({n_dropped / n_read:.1%}, more than data.max_drop_fraction="
            f"{spec.max_drop_fraction}): {dropped}. "
            + " ".join(f"{r}: {hint(r)}." for r in dropped)
            + (f" Most are {common}, e.g. {example}." if example else "")
            + " Raise data.max_drop_fraction to accept this."
        )
    stats = {
        "format": part.fmt,
        "rows_read": n_read,
        "examples": len(selected),
        "dropped": dropped,
        "responses_truncated": int((flags & examples.RESPONSE_CUT != 0).sum()),
        "prompts_truncated": int((flags & examples.PROMPT_CUT != 0).sum()),
        # Kept rows whose responses end in no special token: the template writes no EOS.
        "responses_without_end_token": int(
            ((flags & examples.NO_END_TOKEN != 0) & (status == 0)).sum()
        ),
        **_split_stats(flags, status, chunk.examples_per_row[rows]),
        # Tokens in <think> blocks of trained turns (trained unless data.train_reasoning=False).
        "reasoning_tokens": int(chunk.reasoning_tokens[rows].sum()),
        # Kept rows with tools (definitions, calls, results) or reasoning the chat template
        # did not write: it cannot express them.
        "rows_tools_not_rendered": int(
            ((flags & examples.TOOLS_UNRENDERED != 0) & (status == 0)).sum()
        ),
        "rows_reasoning_not_rendered": int(
            ((flags & examples.REASONING_UNRENDERED != 0) & (status == 0)).sum()
        ),
        "problems": problems,
    }
    if src.empty_files:
        stats["empty_files"] = src.empty_files
    return selected, stats


def _pack_split(
    parts: list[Part], spec: DataSpec, split: str, stream: int
) -> tuple[PackedRows, dict]:
    """Packs the selected rows of `parts` (one source, or a mixture's) into one split."""
    chosen = [_select(p, spec, split) for p in parts]
    rng = np.random.default_rng([spec.seed, stream])
    if len(parts) == 1:
        chunk, ((selected, stats),) = parts[0].chunk, chosen
        picks = [selected]
    else:
        chunk, picks, per_source = mix(parts, chosen, spec, split, stream)
        stats = mixture_stats(per_source, picks, chunk)
    # Shuffle so rows mix sources and lengths tie-break by chance, not by file order.
    order = np.concatenate(picks)
    order = order[rng.permutation(len(order))]
    packed = PackedRows.pack(
        chunk,
        spec.max_seq_len,
        packed=spec.packing,
        max_segments=spec.max_segments,
        pad_multiple=spec.pad_multiple,
        source_rows=chunk.example_rows(),
        order=order,
    )
    segments = np.diff(packed.row_starts)
    trainable = packed.trainable.astype(np.int64)
    loss = np.add.reduceat(trainable, packed.starts[:-1]) - trainable[packed.starts[:-1]]
    problems = stats.pop("problems")
    stats.update(
        {
            "rows": len(packed),
            "tokens": int(packed.row_lengths.sum()),
            "loss_tokens": int(loss.sum()),
            "packing_efficiency": packed.efficiency(),
            "segments_per_row": {"mean": float(segments.mean()), "max": int(segments.max())},
            "problems": problems,
        }
    )
    _warn(split, stats, spec)
    return packed, stats


def _warn(split: str, stats: dict, spec: DataSpec) -> None:
    n_dropped, problems = sum(stats["dropped"].values()), stats["problems"]
    if n_dropped or stats["responses_truncated"] or stats["prompts_truncated"]:
        log.warning(
            "data %s: %d of %d rows dropped %s; %d responses cut at data.max_seq_len=%d "
            "(each lost its EOS: the model sees them but not where they end); %d prompts cut "
            "from the left%s",
            split,
            n_dropped,
            stats["rows_read"],
            stats["dropped"],
            stats["responses_truncated"],
            spec.max_seq_len,
            stats["prompts_truncated"],
            f". First problems: {problems[:3]}" if problems else "",
        )
    if stats["responses_without_end_token"]:
        log.warning(
            "data %s: %d responses end in no special token of the tokenizer (EOS or end of "
            "turn), so the model learns to stop only on text; data.template=%s does not write "
            "one the tokenizer knows",
            split,
            stats["responses_without_end_token"],
            spec.template,
        )
    for what, key in (
        ("tools", "rows_tools_not_rendered"),
        ("reasoning", "rows_reasoning_not_rendered"),
    ):
        if stats[key]:
            log.warning(
                "data %s: %d rows have %s that data.template=%s does not write (it cannot "
                "express them), so the model never sees them; use a template that does "
                "(chatml writes tools and <think> blocks)",
                split,
                stats[key],
                what,
                spec.template,
            )


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


def _inputs(spec: DataSpec) -> tuple[dict[str, _Input], float | None]:
    """The sources to read, by key ("train", or "train_<k>" for each source of a mixture;
    the same for "validation"), and the fraction of the train rows held out (or None)."""
    skip = spec.on_bad_row == "skip"
    fraction = validation_fraction(spec.validation) if spec.validation else None
    groups = [("train", sources.mixture(spec))]
    if spec.validation and fraction is None:
        groups.append(("validation", sources.parse_mixture(spec.validation, "data.validation")))
    inputs = {}
    for split, mixes in groups:
        for k, m in enumerate(mixes):
            src = sources.Source(m.text, m.key, spec.streaming, skip)
            own = dataclasses.replace(
                spec,
                format=m.format or spec.format,
                fields=spec.fields if m.fields is None else m.fields,
            )
            inputs[split if len(mixes) == 1 else f"{split}_{k}"] = _Input(src, m, own)
    return inputs, fraction


def _encode(tokenizer, template, inputs: dict[str, _Input], share=(0, 1)) -> dict:
    """{source key: (Chunk, format, source rows)} of this process's share of each source."""
    return {
        key: encode_source(i.src, i.spec, tokenizer, template, share) for key, i in inputs.items()
    }


def _parts(
    spec: DataSpec, encoded: dict, inputs: dict[str, _Input], fraction: float | None
) -> tuple[list[Part], list[Part]]:
    """Each source's rows for the train split and the validation split."""
    train, validation = [], []
    for key, inp in inputs.items():
        chunk, fmt = encoded[key]
        _refuse_all_dropped(chunk, inp.src)
        part = Part(
            inp.mix.name, chunk, fmt, np.ones(len(chunk.status), np.bool_), inp.src, inp.mix.weight
        )
        if key.startswith("validation"):
            validation.append(part)
            continue
        if fraction:  # 0 means none, like "" (a numeric config override may give 0).
            held_out = held_out_mask(len(part.rows), fraction, spec.seed, inp.src)
            validation.append(dataclasses.replace(part, rows=held_out))
            part = dataclasses.replace(part, rows=~held_out)
        train.append(part)
    return train, validation


def _pack_all(
    spec: DataSpec,
    encoded: dict,
    inputs: dict[str, _Input],
    fraction: float | None,
    tokenized: dict,
) -> tuple[dict[str, PackedRows], dict]:
    """The packed splits and their stats from every source's examples (`encoded`: {key:
    (Chunk, format)}; `tokenized`: {key: rows each process tokenized}). A mixture's
    validation sources are packed one by one as well ("validation_<k>") for eval_loss/<name>."""
    train, validation = _parts(spec, encoded, inputs, fraction)
    splits, stats = {}, {}
    splits["train"], stats["train"] = _pack_split(train, spec, "train", _SHUFFLE_TRAIN)
    if validation:
        splits["validation"], stats["validation"] = _pack_split(
            validation, spec, "validation", _SHUFFLE_VAL
        )
    if len(validation) > 1:
        for k, part in enumerate(validation):
            splits[f"validation_{k}"], _ = _pack_split([part], spec, "validation", _SHUFFLE_VAL)
    for key, counts in tokenized.items():  # Per source: the validation split may be held out.
        split, _, k = key.partition("_")
        where = stats[split] if not k else stats[split]["sources"][inputs[key].mix.name]
        where["rows_tokenized_by_process"] = counts
    for name, s in stats.items():
        log.info("data %s: %s", name, {k: v for k, v in s.items() if k != "problems"})
    return splits, stats


def _build_here(spec, tokenizer, template, reads, fraction) -> tuple[dict, dict]:
    """Every row tokenized and packed in this process."""
    encoded = _encode(tokenizer, template, reads)
    tokenized = {key: [len(rows)] for key, (_, _, rows) in encoded.items()}
    encoded = {key: (chunk, fmt) for key, (chunk, fmt, _) in encoded.items()}
    return _pack_all(spec, encoded, reads, fraction, tokenized)


def _build_together(
    spec, tokenizer, template, reads, fraction, processes: hosts.Processes, cache_key, inputs
) -> None:
    """Each process tokenizes its share into the cache directory; process 0 joins, packs and
    writes the entry (see `hosts`). Returns once the entry is written."""
    scratch = cache.directory(spec) / f".build-{cache_key}"
    share = (processes.index, processes.count)

    def tokenize() -> None:
        scratch.mkdir(parents=True, exist_ok=True)
        hosts.part_path(scratch, processes).unlink(missing_ok=True)  # A stale one.
        hosts.write_part(scratch, processes, _encode(tokenizer, template, reads, share))

    hosts.together(scratch, processes, "tokenize", tokenize)
    hosts.check_parts(scratch, processes, cache_key)

    def pack_and_save() -> None:
        parts = hosts.read_parts(scratch, processes)
        encoded = {key: hosts.join(parts, key) for key in reads}
        tokenized = {key: [len(p[key][2]) for p in parts] for key in reads}
        splits, stats = _pack_all(spec, encoded, reads, fraction, tokenized)
        cache.save(spec, cache_key, inputs, splits, stats)

    hosts.together(scratch, processes, "pack", pack_and_save if processes.index == 0 else None)
    if processes.index == 0:  # Every process has seen every part: the parts can go.
        scratch.rmtree(missing_ok=True)


def _data_splits(splits: dict, stats: dict, path: str = "", hit: bool = False) -> DataSplits:
    per_source = stats.get("validation", {}).get("sources", {})
    by_source = {name: splits[f"validation_{k}"] for k, name in enumerate(per_source)}
    return DataSplits(
        splits["train"], splits.get("validation"), stats, path, hit, by_source or None
    )


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
    reads, fraction = _inputs(spec)
    if not spec.cache:
        if processes.count > 1:
            log.warning(
                "data.cache=False: each of the %d processes tokenizes every row; turn the cache "
                "on (data.cache_dir shared by all hosts) to tokenize each row once",
                processes.count,
            )
        return _data_splits(*_build_here(spec, tokenizer, template, reads, fraction))
    ids = [r.src.fingerprint() for r in reads.values()]
    # data.tools may name a file: its tools, not its path, go into the key.
    tools = templates.dumps(list(examples.load_tools(spec.tools)))
    cache_key, inputs = cache.key(spec, tokenizer, templates.template_id(template), [*ids, tools])
    path = str(cache.directory(spec) / cache_key)
    hit = cache.load(spec, cache_key)
    if processes.sync(int(hit is not None)):  # Loaded on every process: the same branch.
        log.info("data: loaded from the cache %s", path)
        return _data_splits(*hit, path, True)
    if processes.count == 1:
        splits, stats = _build_here(spec, tokenizer, template, reads, fraction)
        cache.save(spec, cache_key, inputs, splits, stats)
        return _data_splits(splits, stats, path, False)
    _build_together(spec, tokenizer, template, reads, fraction, processes, cache_key, inputs)
    hit = cache.load(spec, cache_key)
    if hit is None:  # Process 0 wrote it where every part was seen: not expected.
        raise ValueError(hosts.not_shared(cache.directory(spec), processes.index, 0, cache_key))
    return _data_splits(*hit, path, False)
