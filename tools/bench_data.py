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
packing_efficiency, workers, cores, and tokenize_s / pack_s (the build's two stages timed
apart, in this process).

With `--processes 1,2,4` it measures the build shared by P processes on loopback (JAX
distributed, one CPU device each, data.num_workers=0 so each is one core) for each P: each
process tokenizes its share into a fresh shared cache folder and all load the one entry
(`shared`), against the old way, every process tokenizing every row (`each`, data.cache=False).
Per P and mode: the slowest process's build time, rows/s per host, and the total work, CPU
seconds summed over the processes, which should not grow with P when shared. On a machine
with fewer cores than processes the wall times include waiting for a core; the CPU seconds
do not.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
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
        }
        for i in range(n)
    ]


def _worker(args) -> int:
    """One of the processes of --processes: times its build_splits, writes a JSON line."""
    port, index, count = (int(x) for x in args.worker.split(","))
    import jax

    if count > 1:
        jax.distributed.initialize(f"127.0.0.1:{port}", count, index)
    from sft_jax.data import DataSpec, build_splits, jax_processes, load_tokenizer

    tokenizer, processes = load_tokenizer(args.tokenizer), jax_processes()
    spec = DataSpec(
        train=args.rows_file,
        template=args.template,
        max_seq_len=args.max_seq_len,
        num_workers=0,
        cache_dir=args.cache_dir,
        cache=args.mode == "shared",
        max_drop_fraction=1.0,
    )
    processes.sync(0)  # Start together: the slowest start-up is not build time.
    wall, cpu = time.perf_counter(), time.process_time()
    splits = build_splits(spec, tokenizer, processes)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    tokenized = splits.stats["train"]["rows_tokenized_by_process"]
    mine = tokenized[index] if len(tokenized) == count else tokenized[0]
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "rows_tokenized": mine}))
    return 0


def _launch(args, count: int, mode: str, rows_file: str, cache_dir: str) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--worker",
                f"{port},{i},{count}",
                "--mode",
                mode,
                "--rows-file",
                rows_file,
                "--cache-dir",
                cache_dir,
                "--tokenizer",
                args.tokenizer,
                "--template",
                args.template,
                "--max-seq-len",
                str(args.max_seq_len),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(count)
    ]
    outs = [p.communicate() for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        if p.returncode:
            raise RuntimeError(f"a {mode} process of {count} failed: {err[-2000:]}")
    got = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    wall = max(g["wall_s"] for g in got)
    return {
        "processes": count,
        "mode": mode,
        "wall_s": round(wall, 2),
        "rows_per_s_per_host": round(args.rows / wall / count, 1),
        "cpu_s_total": round(sum(g["cpu_s"] for g in got), 2),
        "cpu_s_by_process": [round(g["cpu_s"], 2) for g in got],
        "rows_tokenized_by_process": [g["rows_tokenized"] for g in got],
    }


def _processes(args) -> int:
    counts = [int(x) for x in args.processes.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="sft_jax_bench_data_") as tmp:
        rows_file = os.path.join(tmp, "rows.jsonl")
        with open(rows_file, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in alpaca_rows(args.rows))
        for count in counts:
            for mode in ("shared", "each"):
                cache_dir = tempfile.mkdtemp(dir=tmp, prefix=f"cache-{mode}-{count}-")
                r = _launch(args, count, mode, rows_file, cache_dir)
                print(
                    f"{count} processes, {mode}: {r['wall_s']} s, {r['rows_per_s_per_host']} "
                    f"rows/s per host, {r['cpu_s_total']} CPU s in all, rows tokenized "
                    f"{r['rows_tokenized_by_process']}",
                    flush=True,
                )
                results.append(r)
    print(
        json.dumps(
            {
                "rows": args.rows,
                "tokenizer": args.tokenizer,
                "cores": os.cpu_count(),
                "runs": results,
            }
        )
    )
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=50_000)
    p.add_argument("--tokenizer", default="gpt2")
    p.add_argument("--template", default="alpaca")
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--workers", type=int, default=-1, help="data.num_workers")
    p.add_argument("--processes", default="", help="e.g. 1,2,4: the build shared by processes")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)  # port,index,count
    p.add_argument("--mode", default="shared", help=argparse.SUPPRESS)
    p.add_argument("--rows-file", default="", help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return _worker(args)
    if args.processes:
        return _processes(args)

    from sft_jax.data import DataSpec, build, build_splits, load_tokenizer, templates

    t = time.perf_counter()
    tokenizer = load_tokenizer(args.tokenizer)
    tokenizer_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory(prefix="sft_jax_bench_data_") as tmp:
        path = os.path.join(tmp, "rows.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in alpaca_rows(args.rows))
        spec = DataSpec(
            train=path,
            template=args.template,
            max_seq_len=args.max_seq_len,
            num_workers=args.workers,
            cache_dir=os.path.join(tmp, "cache"),
            max_drop_fraction=1.0,
        )
        t = time.perf_counter()
        cold = build_splits(spec, tokenizer)
        cold_s = time.perf_counter() - t
        t = time.perf_counter()
        cached = build_splits(spec, tokenizer)
        cached_s = time.perf_counter() - t
        assert cached.cache_hit and not cold.cache_hit
        # The two stages apart: is packing cheap next to tokenizing (process 0 packs alone)?
        srcs = {"train": build._sources(spec)[0]}
        t = time.perf_counter()
        template = templates.resolve_template(spec, tokenizer)
        encoded = build._encode(spec, tokenizer, template, srcs)
        tokenize_s = time.perf_counter() - t
        t = time.perf_counter()
        build._pack_all(spec, {n: e[:2] for n, e in encoded.items()}, srcs, None, {})
        pack_s = time.perf_counter() - t
    stats = cold.stats["train"]
    cores = build.cores()
    workers = (
        args.workers
        if args.workers >= 0
        else (
            min(cores, build.MAX_WORKERS)
            if args.rows >= build.AUTO_WORKERS_MIN_ROWS and cores > 1
            else 0
        )
    )
    print(
        f"{args.rows} rows ({stats['tokens']} tokens) tokenized, masked and packed in "
        f"{cold_s:.1f} s with {workers} worker processes on {cores} cores; "
        f"from the cache in {cached_s:.2f} s (tokenizer load {tokenizer_s:.1f} s); "
        f"tokenizing alone {tokenize_s:.1f} s, packing alone {pack_s:.2f} s"
    )
    print(
        json.dumps(
            {
                "rows": args.rows,
                "tokens": stats["tokens"],
                "loss_tokens": stats["loss_tokens"],
                "cold_s": round(cold_s, 2),
                "cached_s": round(cached_s, 3),
                "tokenize_s": round(tokenize_s, 2),
                "pack_s": round(pack_s, 3),
                "rows_per_s": round(args.rows / cold_s),
                "packing_efficiency": stats["packing_efficiency"],
                "dropped": stats["dropped"],
                "workers": workers,
                "cores": cores,
                "tokenizer": args.tokenizer,
                "template": args.template,
                "max_seq_len": args.max_seq_len,
            }
        )
    )
    return 0


if __name__ == "__main__":  # Needed: worker processes re-import this file.
    sys.exit(main())
