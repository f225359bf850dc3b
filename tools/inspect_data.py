"""What a config's data turns into: counts, the first batches, and which tokens are trained.

    python tools/inspect_data.py --config configs/tiny.py
    python tools/inspect_data.py --config configs/tiny.py --dump-batches 2 --out /tmp/b.jsonl
    python tools/inspect_data.py --config configs/tiny.py --html /tmp/data.html \
        --config.data.train=my.jsonl --config.data.template=chatml

Builds the data exactly as training does (same config, tokenizer, cache), then prints:
- per split: rows read, examples kept, dropped by reason (with the first problems and where
  they are), responses cut at max_seq_len (lost EOS), prompts cut, tokens, loss tokens,
  packed rows, packing efficiency, padding share of the batches, segments per row;
- the first `--show` rows of batch 0, trained tokens in green (`--no-color`: ⟦brackets⟧);
- `--dump-batches K --out F.jsonl`: the first K global training batches, every field, one
  JSON object per batch (`{"step": i, "tokens": [[...]], ...}`);
- `--html F.html`: a page with the counts and the rows of the first batches, trained tokens
  highlighted, to open in a browser.
The last line printed is one JSON object with the counts.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).")
flags.DEFINE_integer("dump_batches", 0, "Write the first K training batches to --out.")
flags.DEFINE_string("out", None, "JSONL file for --dump-batches.")
flags.DEFINE_string("html", None, "Write an HTML view of the data here.")
flags.DEFINE_integer("show", 3, "Rows of batch 0 to print with trained tokens marked.")
flags.DEFINE_integer("html_rows", 32, "Rows (of the first batches) in the HTML view.")
flags.DEFINE_bool("color", True, "ANSI colours in the terminal view (--no-color: ⟦brackets⟧).")
flags.mark_flags_as_required(["config"])


def summary(splits, batch_size: int, seed: int) -> dict:
    """The stats of each split plus the padding share of its batches as training takes them."""
    from sft_jax.data import pipeline

    out = {}
    for name, rows in (("train", splits.train), ("validation", splits.validation)):
        if rows is None:
            continue
        s = dict(splits.stats[name])
        s["loss_share"] = s["loss_tokens"] / max(s["tokens"], 1)
        if name == "train" and len(rows) >= batch_size:
            s["padding_share"] = pipeline.padding_share(rows, batch_size, seed)
        else:
            s["padding_share"] = 1.0 - rows.efficiency() if rows.packed else None
        out[name] = s
    out["cache"] = {"path": splits.cache_path, "hit": splits.cache_hit}
    return out


def _print_summary(stats: dict) -> None:
    for name, s in stats.items():
        if name == "cache":
            print(f"cache: {s['path'] or 'off'}{' (hit)' if s['hit'] else ''}")
            continue
        print(f"== {name} ({s['format']})")
        print(f"  rows read {s['rows_read']}, kept {s['examples']}, dropped "
              f"{sum(s['dropped'].values())} {s['dropped'] or ''}")  # fmt: skip
        print(f"  responses cut at max_seq_len (lost EOS) {s['responses_truncated']}, "
              f"prompts cut from the left {s['prompts_truncated']}")  # fmt: skip
        print(f"  tokens {s['tokens']}, loss tokens {s['loss_tokens']} ({s['loss_share']:.1%})")
        pad = s["padding_share"]
        seg = s["segments_per_row"]
        print(f"  rows {s['rows']}, packing efficiency {s['packing_efficiency']:.2%}, padding "
              f"share {'n/a' if pad is None else f'{pad:.2%}'}, segments per row "
              f"{seg['mean']:.2f} (max {seg['max']})")  # fmt: skip
        for p in s.get("problems", [])[:5]:
            print(f"  problem: {p}")


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.dump_batches and not FLAGS.out:
        raise app.UsageError("--dump-batches needs --out F.jsonl")
    import datasets

    from sft_jax import config as config_lib
    from sft_jax import data as data_lib
    from sft_jax.data import view

    datasets.disable_progress_bars()
    c = FLAGS.config
    batch_size, seed = c.train.batch_size, c.seed
    try:
        tokenizer = data_lib.load_tokenizer(config_lib.tokenizer_name(c))
        splits = data_lib.build_splits(config_lib.data_spec(c), tokenizer)
        n_batches = data_lib.num_batches_per_epoch(splits.train, batch_size)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    stats = summary(splits, batch_size, seed)
    _print_summary(stats)

    first = data_lib.batch_at(splits.train, 0, batch_size, seed)
    for r in range(min(FLAGS.show, batch_size)):
        row = {k: v[r] for k, v in first.items()}
        for j, (ids, trained) in enumerate(view.segments(row), start=1):
            print(f"\n-- batch 0, row {r}, example {j} ({len(ids)} tokens, "
                  f"{int(trained.sum())} trained)")  # fmt: skip
            print(view.terminal(view.runs(ids, trained, tokenizer), color=FLAGS.color))

    if FLAGS.dump_batches:
        with open(FLAGS.out, "w", encoding="utf-8") as f:
            for step in range(FLAGS.dump_batches):
                batch = data_lib.batch_at(splits.train, step, batch_size, seed)
                f.write(json.dumps({"step": step, **{k: v.tolist() for k, v in batch.items()}}))
                f.write("\n")
        print(f"\nwrote {FLAGS.dump_batches} batches to {FLAGS.out}")

    if FLAGS.html:
        sections = []
        for n in range(min(FLAGS.html_rows, n_batches * batch_size)):
            step, r = divmod(n, batch_size)
            if r == 0:
                batch = data_lib.batch_at(splits.train, step, batch_size, seed)
            row = {k: v[r] for k, v in batch.items()}
            for j, (ids, trained) in enumerate(view.segments(row), start=1):
                label = (f"step {step}, row {r}, example {j}: {len(ids)} tokens, "
                         f"{int(trained.sum())} trained")  # fmt: skip
                sections.append((label, view.runs(ids, trained, tokenizer)))
        page = view.html_page(f"sft_jax data: {c.data.train}", stats, sections)
        with open(FLAGS.html, "w", encoding="utf-8") as f:
            f.write(page)
        print(f"\nwrote {FLAGS.html}")

    print(json.dumps(stats, default=str))
    return 0


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, taking the contract's spelling too: --dump-batches, --no-color."""
    fixed = []
    for a in argv:
        name, eq, value = a.partition("=")
        if name == "--no-color":
            name = "--nocolor"
        elif name.startswith("--") and not name.startswith("--config"):
            name = "--" + name[2:].replace("-", "_")
        fixed.append(name + eq + value)
    return FLAGS(fixed)


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
