"""Sources to packed rows, and packed rows to deterministic step-indexed batches.

`build_splits`: rows -> template -> token ids and trainable flags -> too-long policy ->
seeded shuffle -> pack (or pad) into `[rows, max_seq_len]` arrays, with stats.

`batch_at`: the global batch of a step depends on (rows, step, batch size, seed) alone,
so resuming at step s replays exactly the data an uninterrupted run would have seen; the
checkpoint needs no iterator state. Each process takes its contiguous slice.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
from collections.abc import Iterator

import numpy as np
import transformers

from sft_jax.data import packing, sources, templates

log = logging.getLogger(__name__)

TOO_LONG = ("drop", "truncate", "error")

# Distinct random streams derived from the one seed, so the split does not change when
# the shuffle does, and vice versa.
_SPLIT, _SHUFFLE_TRAIN, _SHUFFLE_VAL = 1, 2, 3


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """The data part of a config, as plain values (see configs/default.py)."""

    train: str  # A source string: path, glob, folder, hf:..., synthetic:...
    validation: str = ""  # A source, a fraction such as "0.05" held out from train, "" or "0".
    format: str = "alpaca"
    template: str = "alpaca"
    train_on: str = "response"  # Or "all".
    max_seq_len: int = 512
    packing: bool = True
    too_long: str = "drop"  # Or "truncate" (keep the first max_seq_len + 1 tokens), "error".
    seed: int = 0


@dataclasses.dataclass
class DataSplits:
    train: dict[str, np.ndarray]  # [rows, max_seq_len] per field, see packing.FIELDS.
    validation: dict[str, np.ndarray] | None
    stats: dict  # {"train": {...}, "validation": {...}}: counts, drops by reason, efficiency.


def _fraction(validation: str) -> float | None:
    try:
        f = float(validation)
    except ValueError:
        return None  # Not a number: a source.
    if not 0.0 <= f < 1.0:
        raise ValueError(f"data.validation={validation!r}: a held-out fraction must be in [0, 1)")
    return f


def split_rows(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """Holds out `fraction` of the rows (seeded), before tokenization: no shared example."""
    n_val = round(len(rows) * fraction)
    if not 1 <= n_val < len(rows):
        raise ValueError(
            f"data.validation={fraction} of {len(rows)} rows leaves an empty split; "
            "change the fraction or give a validation source"
        )
    perm = np.random.default_rng([seed, _SPLIT]).permutation(len(rows))
    # Sorted, so each split keeps the source order (it is shuffled later anyway).
    return [rows[i] for i in np.sort(perm[n_val:])], [rows[i] for i in np.sort(perm[:n_val])]


def _build(
    rows: list, spec: DataSpec, tokenizer, split: str, stream: int
) -> tuple[dict[str, np.ndarray], dict]:
    rendered = [templates.render(r, spec.template) for r in rows]
    examples = templates.tokenize_many(rendered, tokenizer, spec.train_on)
    limit = spec.max_seq_len + 1  # n+1 ids give n positions.
    kept: list[packing.Example] = []
    dropped = collections.Counter(too_long=0, no_loss_tokens=0)
    truncated = 0
    for row, (ids, trainable) in zip(rows, examples, strict=True):
        if len(ids) > limit:
            if spec.too_long == "error":
                raise ValueError(
                    f"a {split} example has {len(ids)} tokens, more than data.max_seq_len + 1 = "
                    f"{limit} (instruction {row['instruction'][:60]!r}); raise data.max_seq_len "
                    "or set data.too_long to drop or truncate"
                )
            if spec.too_long == "drop":
                dropped["too_long"] += 1
                continue
            ids, trainable = ids[:limit], trainable[:limit]  # The EOS goes too: no stop signal.
            truncated += 1
        if not trainable[1:].any():  # Nothing to learn (e.g. truncated inside the prompt).
            dropped["no_loss_tokens"] += 1
            continue
        kept.append((ids, trainable))
    if sum(dropped.values()) or truncated:
        log.warning(
            "data %s: %d of %d examples dropped %s, %d truncated (data.max_seq_len=%d, "
            "data.too_long=%s)",
            split, sum(dropped.values()), len(rows), dict(dropped), truncated,
            spec.max_seq_len, spec.too_long,
        )  # fmt: skip
    if not kept:
        raise ValueError(
            f"no {split} examples left of {len(rows)} rows (dropped: {dict(dropped)}); "
            "check data.max_seq_len and data.too_long"
        )
    # Shuffle so rows mix sources and lengths tie-break by chance, not by file order.
    order = np.random.default_rng([spec.seed, stream]).permutation(len(kept))
    kept = [kept[i] for i in order]
    arrays = (packing.pack if spec.packing else packing.pad)(kept, spec.max_seq_len)
    stats = {
        "rows_read": len(rows),
        "examples_kept": len(kept),
        "dropped": dict(dropped),
        "truncated": truncated,
        "packed_rows": len(arrays["tokens"]),
        "tokens": int((arrays["segment_ids"] != 0).sum()),
        "loss_tokens": int(arrays["loss_mask"].sum()),
        "packing_efficiency": packing.packing_efficiency(arrays),
    }
    log.info("data %s: %s", split, stats)
    return arrays, stats


def build_splits(spec: DataSpec, tokenizer: transformers.PreTrainedTokenizerBase) -> DataSplits:
    """Reads, tokenizes and packs the train split and, if asked for, the validation split."""
    if spec.too_long not in TOO_LONG:
        raise ValueError(f"unknown data.too_long {spec.too_long!r}; valid: {', '.join(TOO_LONG)}")
    if spec.max_seq_len < 1:
        raise ValueError(f"data.max_seq_len must be positive, got {spec.max_seq_len}")
    train_rows = sources.read_rows(spec.train, "data.train", spec.format)
    val_rows = None
    if spec.validation:
        fraction = _fraction(spec.validation)
        if fraction is None:
            val_rows = sources.read_rows(spec.validation, "data.validation", spec.format)
        elif fraction > 0:  # 0 means none, like "" (a numeric config override may give 0).
            train_rows, val_rows = split_rows(train_rows, fraction, spec.seed)
    train, train_stats = _build(train_rows, spec, tokenizer, "train", _SHUFFLE_TRAIN)
    stats = {"train": train_stats}
    validation = None
    if val_rows is not None:
        validation, stats["validation"] = _build(
            val_rows, spec, tokenizer, "validation", _SHUFFLE_VAL
        )
    return DataSplits(train=train, validation=validation, stats=stats)


def num_batches_per_epoch(rows: dict[str, np.ndarray], batch_size: int) -> int:
    """Full global batches per epoch; the remainder rows sit out (different ones each epoch)."""
    n = len(rows["tokens"])
    if batch_size < 1 or n // batch_size == 0:
        raise ValueError(
            f"train.batch_size={batch_size} does not fit the {n} training rows "
            f"(max_seq_len {rows['tokens'].shape[1]}); lower train.batch_size or add data"
        )
    return n // batch_size


def _local_slice(batch_size: int, process_index: int, process_count: int) -> slice:
    if batch_size % process_count or not 0 <= process_index < process_count:
        raise ValueError(
            f"train.batch_size={batch_size} must divide evenly over {process_count} processes "
            f"(process_index={process_index})"
        )
    per = batch_size // process_count
    return slice(process_index * per, (process_index + 1) * per)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    # Cached: every step of an epoch needs it, and permuting 1e6 rows costs ~10 ms.
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    perm.setflags(write=False)
    return perm


def batch_at(
    rows: dict[str, np.ndarray],
    step: int,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> dict[str, np.ndarray]:
    """This process's slice [batch_size // process_count, seq_len] of the batch at `step`."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    local = _local_slice(batch_size, process_index, process_count)
    epoch, i = divmod(step, num_batches_per_epoch(rows, batch_size))
    perm = _epoch_permutation(seed, epoch, len(rows["tokens"]))
    idx = perm[i * batch_size : (i + 1) * batch_size][local]
    return {k: v[idx] for k, v in rows.items()}


def eval_batches(
    rows: dict[str, np.ndarray],
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Every row once, in order; the last batch is topped up with all-padding rows."""
    local = _local_slice(batch_size, process_index, process_count)
    n, seq_len = rows["tokens"].shape
    for start in range(0, n, batch_size):
        batch = {k: v[start : start + batch_size] for k, v in rows.items()}
        short = batch_size - len(batch["tokens"])
        if short:  # Constant shapes: one compiled eval step.
            fill = packing.empty_rows(short, seq_len)
            batch = {k: np.concatenate([v, fill[k]]) for k, v in batch.items()}
        yield {k: v[local] for k, v in batch.items()}
