"""Preprocessing speed: N Alpaca-sized rows read, tokenized, masked and packed, then the same
build again from the on-disk cache.

    python tools/bench_data.py                       # 50,000 rows, GPT-2, alpaca, 512
    python tools/bench_data.py --workers 0   # in this process only
    python tools/bench_data.py --tokenizer asset:smollm2-135m-instruct-gguf \
        --template tokenizer

Rows: the Alpaca sample ../shared/data/alpaca_en_demo.json (CC BY-NC 4.0; see its README)
repeated with a row number in each instruction, so no two rows are equal; without the file,
synthetic rows of the same sizes from a fixed vocabulary. They are written as JSONL to a
temporary folder and read from there, as a user's data would be. The cold build uses a fresh
cache folder; `--workers` is data.num_workers (-1: one process per core for large data).
The last line printed is one JSON object: rows, tokens, cold_s, cached_s, rows_per_s,
packing_efficiency, workers, cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

DEMO = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "alpaca_en_demo.json")


def alpaca_rows(n: int) -> list[dict]:
    if os.path.exists(DEMO):
        with open(DEMO, encoding="utf-8") as f:
            demo = json.load(f)
        return [
            {**demo[i % len(demo)], "instruction": f"{demo[i % len(demo)]['instruction']} (#{i})"}
            for i in range(n)
        ]
    rng = random.Random(0)
    words = [w for w in open(__file__, encoding="utf-8").read().split() if w.isalpha()]

    def text(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(k))

    return [
        {
            "instruction": text(rng.randint(5, 30)),
            "input": text(rng.randint(0, 20)) * (i % 3 == 0),
            "output": text(rng.randint(20, 200)),
        }  # fmt: skip
        for i in range(n)
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=50_000)
    p.add_argument("--tokenizer", default="gpt2")
    p.add_argument("--template", default="alpaca")
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--workers", type=int, default=-1, help="data.num_workers")
    args = p.parse_args()

    from sft_jax.data import DataSpec, build, build_splits, load_tokenizer

    t = time.perf_counter()
    tokenizer = load_tokenizer(args.tokenizer)
    tokenizer_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory(prefix="sft_jax_bench_data_") as tmp:
        path = os.path.join(tmp, "rows.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in alpaca_rows(args.rows))
        spec = DataSpec(
            train=path, template=args.template, max_seq_len=args.max_seq_len,
            num_workers=args.workers, cache_dir=os.path.join(tmp, "cache"),
            max_drop_fraction=1.0,
        )  # fmt: skip
        t = time.perf_counter()
        cold = build_splits(spec, tokenizer)
        cold_s = time.perf_counter() - t
        t = time.perf_counter()
        cached = build_splits(spec, tokenizer)
        cached_s = time.perf_counter() - t
        assert cached.cache_hit and not cold.cache_hit
    stats = cold.stats["train"]
    cores = build.cores()
    workers = args.workers if args.workers >= 0 else (
        min(cores, build.MAX_WORKERS) if args.rows >= build.AUTO_WORKERS_MIN_ROWS and cores > 1
        else 0
    )  # fmt: skip
    print(f"{args.rows} rows ({stats['tokens']} tokens) tokenized, masked and packed in "
          f"{cold_s:.1f} s with {workers} worker processes on {cores} cores; "
          f"from the cache in {cached_s:.2f} s (tokenizer load {tokenizer_s:.1f} s)")  # fmt: skip
    print(json.dumps({
        "rows": args.rows, "tokens": stats["tokens"], "loss_tokens": stats["loss_tokens"],
        "cold_s": round(cold_s, 2), "cached_s": round(cached_s, 3),
        "rows_per_s": round(args.rows / cold_s), "packing_efficiency": stats["packing_efficiency"],
        "dropped": stats["dropped"], "workers": workers, "cores": cores,
        "tokenizer": args.tokenizer, "template": args.template, "max_seq_len": args.max_seq_len,
    }))  # fmt: skip
    return 0


if __name__ == "__main__":  # Needed: worker processes re-import this file.
    sys.exit(main())
