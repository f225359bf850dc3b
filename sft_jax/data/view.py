"""What is trained, for people: trained tokens marked apart from context, from the very
batch arrays the model gets (tokens, targets, loss_mask, segment_ids), in the terminal
(ANSI colours, or ⟦brackets⟧) and as a self-contained HTML page."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence

import numpy as np

Run = tuple[str, bool]  # (text, trained)
OPEN, CLOSE = "⟦", "⟧"


def mark_text(text: str, spans: Sequence[tuple[int, int]]) -> str:
    """`text` with each character span in ⟦brackets⟧ (golden tables of templates)."""
    out, pos = [], 0
    for s, e in sorted(spans):
        out += [text[pos:s], OPEN, text[s:e], CLOSE]
        pos = e
    return "".join(out + [text[pos:]])


def segments(row: dict[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The examples of one batch row as (ids t0..tn, trained flags): token j is trained if
    it is a target with loss, i.e. loss_mask[j - 1] at the position before it."""
    out = []
    seg = row["segment_ids"]
    for s in sorted(set(seg.tolist()) - {0}):
        where = np.flatnonzero(seg == s)
        ids = np.concatenate([row["tokens"][where], row["targets"][where[-1:]]])
        trained = np.concatenate([[False], row["loss_mask"][where] > 0])
        out.append((ids, trained))
    return out


def runs(ids: np.ndarray, trained: np.ndarray, tokenizer) -> list[Run]:
    """Consecutive tokens with the same flag, decoded together (special tokens shown)."""
    out: list[Run] = []
    start = 0
    for j in range(1, len(ids) + 1):
        if j == len(ids) or trained[j] != trained[start]:
            text = tokenizer.decode(ids[start:j].tolist(), skip_special_tokens=False)
            out.append((text, bool(trained[start])))
            start = j
    return out


def mark_tokens(ids: np.ndarray, trained: np.ndarray, tokenizer) -> str:
    """Decoded text with trained tokens in ⟦brackets⟧ (golden tables of masks)."""
    return "".join(f"{OPEN}{t}{CLOSE}" if tr else t for t, tr in runs(ids, trained, tokenizer))


def response_cut(ids: np.ndarray, trained: np.ndarray, tokenizer, seq_len: int) -> bool:
    """Whether an example (from `segments`) is a response cut at max_seq_len: it fills the
    row (seq_len + 1 ids) and ends in a trained token that is no special token (EOS, end of
    turn), so the model never sees where that response ends."""
    if len(ids) != seq_len + 1 or not len(trained) or not trained[-1]:
        return False
    return int(ids[-1]) not in set(tokenizer.all_special_ids)


def terminal(example_runs: Sequence[Run], color: bool = True) -> str:
    """Trained text in bold green (newlines shown as ↵), context dimmed; or ⟦brackets⟧."""
    if not color:
        return "".join(f"{OPEN}{t}{CLOSE}" if tr else t for t, tr in example_runs)
    parts = []
    for text, trained in example_runs:
        if trained:
            parts.append("\x1b[1;32m" + text.replace("\n", "↵\n") + "\x1b[0m")
        else:
            parts.append("\x1b[2m" + text + "\x1b[0m")
    return "".join(parts)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: left; vertical-align: top; }
pre { white-space: pre-wrap; word-break: break-word; background: #fafafa; padding: 8px;
      border: 1px solid #ddd; margin: 0 0 4px 0; }
.ctx { color: #888; }
.tr { background: #c8f7c5; color: #000; }
.seg { font-size: 0.85em; color: #555; margin-top: 0.8em; }
.legend span { padding: 0 6px; }
.cut { color: #b00; font-weight: bold; }
"""
CUT_LABEL = "response cut at max_seq_len: lost its end token"
# Stats that are shares of a whole: shown as percentages.
_SHARES = ("packing_efficiency", "loss_share", "padding_share")


def _cell(key: str, value) -> str:
    if key in _SHARES and isinstance(value, float):
        return f"{value:.1%}"
    return value if isinstance(value, str) else json.dumps(value)


def html_page(
    title: str, stats: dict, sections: Sequence[tuple[str, list[Run]]], cut: Sequence[bool] = ()
) -> str:
    """A page: the stats as tables (shares as percentages), then each labelled example with
    trained text highlighted; `cut[i]` marks the i-th example as a response cut at
    max_seq_len."""
    rows = []
    for split, s in stats.items():
        rows.append(f"<h2>{html.escape(split)}</h2><table>")
        for k, v in s.items():
            rows.append(f"<tr><th>{html.escape(k)}</th><td>{html.escape(_cell(k, v))}</td></tr>")
        rows.append("</table>")
    body = []
    for i, (label, example_runs) in enumerate(sections):
        spans = "".join(
            f'<span class="{"tr" if tr else "ctx"}">{html.escape(t)}</span>'
            for t, tr in example_runs
        )
        mark = f' <span class="cut">✂ {CUT_LABEL}</span>' if i < len(cut) and cut[i] else ""
        body.append(f'<div class="seg">{html.escape(label)}{mark}</div><pre>{spans}</pre>')
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        '<p class="legend"><span class="tr">trained (loss on these tokens)</span>'
        '<span class="ctx">context (no loss)</span></p>'
        + "".join(rows)
        + "<h2>Examples, as packed into the first batches</h2>"
        + "".join(body)
        + "</body></html>"
    )
