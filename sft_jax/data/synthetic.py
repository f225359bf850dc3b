"""Synthetic instruction tasks with checkable answers, as Alpaca rows.

Short enough that a tiny model learns them in minutes on a CPU, so a training run can be
judged by exact-match accuracy, not by loss alone. Source strings in configs:

    synthetic:<task>:<n>[:seed=<s>]     e.g. synthetic:mix:2000  or  synthetic:add:500:seed=3

`<task>` is one of `TASKS` or `mix` (a uniform mixture). Same string, same rows.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable

Row = dict[str, str]


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))


def _reverse(rng: random.Random) -> Row:
    w = _word(rng)
    return {"instruction": "Reverse the letters of the word.", "input": w, "output": w[::-1]}


def _upper(rng: random.Random) -> Row:
    w = _word(rng)
    return {"instruction": "Convert the word to uppercase.", "input": w, "output": w.upper()}


def _add(rng: random.Random) -> Row:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return {"instruction": f"What is {a} + {b}?", "input": "", "output": str(a + b)}


def _sort(rng: random.Random) -> Row:
    digits = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
    return {
        "instruction": "Sort the digits in ascending order.",
        "input": " ".join(map(str, digits)),
        "output": " ".join(map(str, sorted(digits))),
    }


def _repeat(rng: random.Random) -> Row:
    w, k = _word(rng), rng.randint(2, 4)
    return {
        "instruction": f"Repeat the word {w} {k} times.",
        "input": "",
        "output": " ".join([w] * k),
    }


def _larger(rng: random.Random) -> Row:
    a, b = rng.sample(range(100), 2)  # Distinct, so the answer is unique.
    return {
        "instruction": f"Which number is larger, {a} or {b}?",
        "input": "",
        "output": str(max(a, b)),
    }


TASKS: dict[str, Callable[[random.Random], Row]] = {
    "reverse": _reverse,
    "upper": _upper,
    "add": _add,
    "sort": _sort,
    "repeat": _repeat,
    "larger": _larger,
}


def generate_rows(task: str, n: int, seed: int = 0) -> list[Row]:
    """`n` rows of `task` (a name in `TASKS`, or `mix`), fully determined by `seed`."""
    if task != "mix" and task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; valid: mix, {', '.join(TASKS)}")
    # random.Random with an int seed gives the same stream on every platform and version.
    rng = random.Random(seed)
    kinds = list(TASKS.values())
    return [(rng.choice(kinds) if task == "mix" else TASKS[task])(rng) for _ in range(n)]


def parse_source(source: str) -> tuple[str, int, int]:
    """`synthetic:<task>:<n>[:seed=<s>]` -> (task, n, seed)."""
    parts = source.split(":")
    try:
        if parts[0] != "synthetic" or len(parts) not in (3, 4):
            raise ValueError
        seed = 0
        if len(parts) == 4:
            key, _, value = parts[3].partition("=")
            if key != "seed":
                raise ValueError
            seed = int(value)
        n = int(parts[2])
        if n <= 0:
            raise ValueError
    except ValueError:
        raise ValueError(
            f"bad synthetic source {source!r}; expected synthetic:<task>:<n>[:seed=<s>], "
            "e.g. synthetic:mix:2000"
        ) from None
    return parts[1], n, seed
