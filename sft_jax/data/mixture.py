"""A weighted mixture's split: several sources' examples resampled once, at build time, to
the weights (each example whole times over, then a seeded subset), with the counts of each
source beside their sum. Done once, so batches stay a pure function of (data, config, seed,
step) and a resume replays them exactly."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from sft_jax.data import examples, sources
from sft_jax.data.packing import offsets
from sft_jax.data.spec import DataSpec


@dataclasses.dataclass(frozen=True)
class Part:
    """One source's rows (`rows`: a bool mask) that go into a split."""

    name: str
    chunk: examples.Chunk
    fmt: str
    rows: np.ndarray
    src: sources.Source
    weight: float = 1.0


def mixture_counts(available: list[int], weights: list[float], total: int = 0) -> list[int]:
    """Examples per source in a mixture's epoch: `total` (0: all the sources hold) shared in
    proportion to `weights`, rounded by largest remainder so they sum to it, each >= 1."""
    total = total or sum(available)
    exact = np.asarray(weights, np.float64) / sum(weights) * total
    counts = np.maximum(np.floor(exact).astype(np.int64), 1)
    for k in np.argsort(-(exact - np.floor(exact)), kind="stable")[: total - counts.sum()]:
        counts[k] += 1
    return counts.tolist()


def resample(selected: np.ndarray, count: int, seed: int, stream: int, k: int) -> np.ndarray:
    """`count` of the `selected` examples: each whole times over, then a seeded subset."""
    whole, rest = divmod(count, len(selected))
    subset = np.random.default_rng([seed, stream, 1000 + k]).permutation(len(selected))[:rest]
    return np.concatenate([np.tile(selected, whole), selected[np.sort(subset)]])


def mix(
    parts: list[Part],
    chosen: list[tuple[np.ndarray, dict]],
    spec: DataSpec,
    split: str,
    stream: int,
) -> tuple[examples.Chunk, list[np.ndarray], dict]:
    """(the parts' examples as one Chunk, the examples of the split's epoch: resampled to the
    weights for train, each once for validation; the row offset of each part, its stats)."""
    chunk = examples.Chunk.concat([p.chunk for p in parts])
    first_example = offsets([len(p.chunk.starts) - 1 for p in parts])
    first_row = offsets([len(p.chunk.status) for p in parts])
    available = [len(sel) for sel, _ in chosen]
    counts = (
        mixture_counts(available, [p.weight for p in parts], spec.mixture_examples)
        if split == "train"
        else available
    )
    picks = [
        first_example[k] + resample(sel, m, spec.seed, stream, k)
        for k, ((sel, _), m) in enumerate(zip(chosen, counts, strict=True))
    ]
    weight = sum(p.weight for p in parts)
    per_source = {}
    for k, (p, (_, s), m) in enumerate(zip(parts, chosen, counts, strict=True)):
        per_source[p.name] = {
            "source": p.src.text,
            **({"weight": p.weight / weight, "examples_in_epoch": m} if split == "train" else {}),
            "share": m / sum(counts),
            "times_each": m / available[k],
            "first_row": int(first_row[k]),  # Its rows in source_rows: from here to the next.
            **s,
        }
    return chunk, picks, per_source


SUMMED = (
    "rows_read",
    "responses_truncated",
    "prompts_truncated",
    "responses_without_end_token",
    "split_rows",
    "split_examples",
    "split_rows_missing_turns",
    "reasoning_tokens",
    "rows_tools_not_rendered",
    "rows_reasoning_not_rendered",
)


def mixture_stats(per_source: dict, picks: list[np.ndarray], chunk: examples.Chunk) -> dict:
    """A mixture split's counts: summed over its sources, each source's beside them (with
    its realized share of the epoch's examples and loss tokens)."""
    trainable = chunk.trainable.astype(np.int64)
    loss = np.add.reduceat(trainable, chunk.starts[:-1]) - trainable[chunk.starts[:-1]]
    loss_per_source = [int(loss[p].sum()) for p in picks]
    for s, n in zip(per_source.values(), loss_per_source, strict=True):
        s["loss_token_share"] = n / max(sum(loss_per_source), 1)
    dropped: collections.Counter = collections.Counter()
    for s in per_source.values():
        dropped.update(s["dropped"])
    return {
        "format": ", ".join(f"{n}: {s['format']}" for n, s in per_source.items()),
        **{k: sum(s[k] for s in per_source.values()) for k in SUMMED},
        "examples": sum(len(p) for p in picks),
        "dropped": dict(dropped),
        "problems": [p for s in per_source.values() for p in s["problems"]][:10],
        "sources": {
            n: {k: v for k, v in s.items() if k != "problems"} for n, s in per_source.items()
        },
    }
