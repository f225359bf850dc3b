r"""What a config's data turns into: counts, the first batches, and which tokens are trained.

    sft-jax-inspect --config configs/tiny.py
    sft-jax-inspect --config configs/tiny.py --dump-batches 2 --out /tmp/b.jsonl
    sft-jax-inspect --config configs/tiny.py --html /tmp/data.html \
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

from absl import flags
from etils import epath
from ml_collections import config_flags

from sft_jax.cli import absl_args


def _define(values: flags.FlagValues, argv: list[str]) -> None:
    config_flags.DEFINE_config_file(
        "config", None, "Training config file (configs/*.py).", flag_values=values, sys_argv=argv
    )
    flags.DEFINE_integer(
        "dump_batches", 0, "Write the first K training batches to --out.", flag_values=values
    )
    flags.DEFINE_string("out", None, "JSONL file for --dump-batches.", flag_values=values)
    flags.DEFINE_string("html", None, "Write an HTML view of the data here.", flag_values=values)
    flags.DEFINE_integer(
        "show", 3, "Rows of batch 0 to print with trained tokens marked.", flag_values=values
    )
    flags.DEFINE_integer(
        "html_rows", 32, "Rows (of the first batches) in the HTML view.", flag_values=values
    )
    flags.DEFINE_bool(
        "color",
        True,
        "ANSI colours in the terminal view (--no-color: ⟦brackets⟧).",
        flag_values=values,
    )
    flags.mark_flags_as_required(["config"], flag_values=values)


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
        print(
            f"  rows read {s['rows_read']}, examples {s['examples']}, dropped "
            f"{sum(s['dropped'].values())} {s['dropped'] or ''}"
        )
        if s.get("split_rows"):  # older cache entries lack these keys
            print(
                f"  conversations split per assistant turn {s['split_rows']} → "
                f"{s['split_examples']} examples ({s.get('split_rows_missing_turns', 0)} "
                "lost turns to max_seq_len)"
            )
        print(
            f"  responses cut at max_seq_len (lost EOS) {s['responses_truncated']}, "
            f"prompts cut from the left {s['prompts_truncated']}"
        )
        print(f"  tokens {s['tokens']}, loss tokens {s['loss_tokens']} ({s['loss_share']:.1%})")
        pad = s["padding_share"]
        seg = s["segments_per_row"]
        print(
            f"  rows {s['rows']}, packing efficiency {s['packing_efficiency']:.2%}, padding "
            f"share {'n/a' if pad is None else f'{pad:.2%}'}, segments per row "
            f"{seg['mean']:.2f} (max {seg['max']})"
        )
        _print_sources(s.get("sources", {}))
        for p in s.get("problems", [])[:5]:
            print(f"  problem: {p}")


def _print_sources(per_source: dict) -> None:
    """A mixture's sources: weight, examples in the epoch, their share, repeats."""
    for name, m in per_source.items():
        weight = f"weight {m['weight']:.1%}, " if "weight" in m else ""
        n = m.get("examples_in_epoch", m["examples"])
        loss = m["loss_token_share"]
        print(
            f"  source {name} ({m['format']}): {weight}{n} examples ({m['share']:.1%}, "
            f"each {m['times_each']:.2f}x; {loss:.1%} of loss tokens)"
        )


def _print_rows(first: dict, rows: int, tokenizer, color: bool, seq_len: int) -> None:
    """The first `rows` rows of batch 0, one example at a time, trained tokens marked."""
    from sft_jax.data import view

    for r in range(rows):
        row = {k: v[r] for k, v in first.items()}
        for j, (ids, trained) in enumerate(view.segments(row), start=1):
            cut = view.response_cut(ids, trained, tokenizer, seq_len)
            note = f"; {view.CUT_LABEL}" if cut else ""
            print(
                f"\n-- batch 0, row {r}, example {j} ({len(ids)} tokens, "
                f"{int(trained.sum())} trained{note})"
            )
            print(view.terminal(view.runs(ids, trained, tokenizer), color=color))


def _dump_batches(rows, n: int, batch_size: int, seed: int, out: str) -> None:
    from sft_jax import data as data_lib

    with epath.Path(out).open("w", encoding="utf-8") as f:  # a local path or a bucket URL
        for step in range(n):
            batch = data_lib.batch_at(rows, step, batch_size, seed)
            f.write(json.dumps({"step": step, **{k: v.tolist() for k, v in batch.items()}}))
            f.write("\n")
    print(f"\nwrote {n} batches to {out}")


def _write_html(splits, stats, tokenizer, run, n_rows: int, path: str) -> None:
    """The first `n_rows` rows of the training batches as a page, trained tokens marked."""
    from sft_jax import data as data_lib
    from sft_jax.data import view

    batch_size, seed = run.train.batch_size, run.seed
    sections, cut = [], []
    for n in range(n_rows):
        step, r = divmod(n, batch_size)
        if r == 0:
            batch = data_lib.batch_at(splits.train, step, batch_size, seed)
        row = {k: v[r] for k, v in batch.items()}
        for j, (ids, trained) in enumerate(view.segments(row), start=1):
            label = (
                f"step {step}, row {r}, example {j}: {len(ids)} tokens, "
                f"{int(trained.sum())} trained"
            )
            sections.append((label, view.runs(ids, trained, tokenizer)))
            cut.append(view.response_cut(ids, trained, tokenizer, splits.train.seq_len))
    names = run.data.train or ", ".join(stats["train"].get("sources", {}))  # or data.mixture's
    page = view.html_page(f"sft_jax data: {names}", stats, sections, cut)
    epath.Path(path).write_text(page, encoding="utf-8")
    print(f"\nwrote {path}")


def _contract_spelling(argv: list[str]) -> list[str]:
    """absl's flag names from the contract's spelling: --dump-batches, --no-color."""
    fixed = []
    for a in argv:
        name, eq, value = a.partition("=")
        if name == "--no-color":
            name = "--nocolor"
        elif name.startswith("--") and not name.startswith("--config"):
            name = "--" + name[2:].replace("-", "_")
        fixed.append(name + eq + value)
    return fixed


def main(argv=None) -> int:
    argv = _contract_spelling(sys.argv[1:] if argv is None else list(argv))
    args, rest = absl_args.parse("sft-jax-inspect", __doc__, _define, argv)
    if rest or (args.dump_batches and not args.out):
        why = f"unexpected arguments: {rest}" if rest else "--dump-batches needs --out F.jsonl"
        print(f"sft-jax-inspect: {why}", file=sys.stderr)
        return 1
    import datasets

    from sft_jax import config as config_lib
    from sft_jax import data as data_lib

    datasets.disable_progress_bars()
    try:
        run = config_lib.RunConfig.parse(args.config)
        batch_size, seed = run.train.batch_size, run.seed
        tokenizer = data_lib.load_tokenizer(run.model.tokenizer)
        splits = data_lib.build_splits(run.data, tokenizer)
        n_batches = data_lib.num_batches_per_epoch(splits.train, batch_size)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    stats = summary(splits, batch_size, seed)
    _print_summary(stats)
    first = data_lib.batch_at(splits.train, 0, batch_size, seed)
    _print_rows(first, min(args.show, batch_size), tokenizer, args.color, splits.train.seq_len)
    if args.dump_batches:
        _dump_batches(splits.train, args.dump_batches, batch_size, seed, args.out)
    if args.html:
        n_rows = min(args.html_rows, n_batches * batch_size)
        _write_html(splits, stats, tokenizer, run, n_rows, args.html)
    print(json.dumps(stats, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
