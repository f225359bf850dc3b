"""What the fine-tuning changed: responses to held-out prompts before and after, scored
where answers are checkable, a side-by-side Markdown report, and the loss curve as a PNG.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

from sft_jax import judge as judge_lib
from sft_jax.generate import Generator, Sampling


def respond(
    generator: Generator,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    sampling: Sampling,
    stop: Sequence[str] = (),
    batch_size: int = 8,
) -> list[str]:
    """Response text for each prompt (token ids), cut at the first stop string."""
    out: list[str] = []
    all_ids = [list(p) for p in prompts]
    width = max(len(ids) for ids in all_ids)  # one padded width: one compile for all batches
    for i in range(0, len(all_ids), batch_size):
        ids = all_ids[i : i + batch_size]
        ids += [ids[-1]] * (batch_size - len(ids))  # a full last batch: the same shape again
        news = generator.generate(ids, sampling, stop=stop, tokenizer=tokenizer, min_width=width)
        for new in news[: len(prompts) - i]:
            text = tokenizer.decode(new, skip_special_tokens=True)
            for s in stop:
                text = text.split(s)[0]
            out.append(text.strip())
    return out


def _normal(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


def score(response: str, reference: str) -> dict[str, bool]:
    """exact: the same text (case, spacing and a final period aside); contains: the
    reference appears in the response."""
    return {
        "exact": _normal(response) == _normal(reference),
        "contains": _normal(reference) in _normal(response),
    }


def summarize(records: Sequence[dict]) -> dict[str, float]:
    n = max(len(records), 1)
    out = {
        "exact_match": sum(r["exact"] for r in records) / n,
        "contains": sum(r["contains"] for r in records) / n,
    }
    judged, unscored = judge_lib.mean_score(records)
    if judged is not None:
        out["judge_score"] = judged
    if unscored:
        out["judge_unscored"] = unscored
    return out


def generation_records(
    prompts: Sequence[str], references: Sequence[str], responses: Sequence[str]
) -> list[dict]:
    return [
        {"prompt": p, "reference": r, "response": out, **score(out, r)}
        for p, r, out in zip(prompts, references, responses, strict=True)
    ]


def write_jsonl(path: str, records: Sequence[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _cell(text: str, limit: int = 300) -> str:
    text = text if len(text) <= limit else text[:limit] + "…"
    return text.replace("|", "\\|").replace("\n", "<br>")


def report_markdown(
    before: Sequence[dict],
    after: Sequence[dict],
    loss_before: float | None,
    loss_after: float | None,
    title: str = "Before and after fine-tuning",
    shown: int = 10,
) -> str:
    """Scores, validation loss and the same prompts side by side."""
    b, a = summarize(before), summarize(after)
    lines = [f"# {title}", "", "| | before | after |", "|---|---|---|"]
    if loss_before is not None and loss_after is not None:
        lines.append(f"| validation loss | {loss_before:.4f} | {loss_after:.4f} |")
    lines += [
        f"| exact match ({len(after)} held-out prompts) | {b['exact_match']:.0%} | "
        f"{a['exact_match']:.0%} |",
        f"| reference contained in response | {b['contains']:.0%} | {a['contains']:.0%} |",
    ]
    if "judge_score" in a or "judge_score" in b:
        cell = lambda s: f"{s['judge_score']:.1f}" if "judge_score" in s else "–"
        lines.append(f"| LLM judge score (0–100) | {cell(b)} | {cell(a)} |")
    lines += [
        "",
        "| prompt | reference | before | after |",
        "|---|---|---|---|",
    ]
    for x, y in list(zip(before, after, strict=True))[:shown]:
        mark = lambda r: "✅ " if r["exact"] else ""
        lines.append(
            f"| {_cell(x['prompt'], 200)} | {_cell(x['reference'])} | "
            f"{mark(x)}{_cell(x['response'])} | {mark(y)}{_cell(y['response'])} |"
        )
    return "\n".join(lines) + "\n"


def plot_loss_curve(metrics_path: str, png_path: str) -> str:
    """Train loss and validation loss over steps, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    train, evals = [], []
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r:
                train.append((r["step"], r["loss"]))
            if "eval_loss" in r:
                evals.append((r["step"], r["eval_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss (response tokens)")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("masked cross-entropy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path)
    plt.close(fig)
    return png_path


PromptFn = Callable[[dict], tuple[str, str]]  # row -> (rendered prompt, reference answer)


# --------------------------------------------------------------------------- prompts


def prompts_and_references(
    rows: Sequence[dict], spec, tokenizer
) -> list[tuple[list[int], str, str]]:
    """(prompt ids, the user's request, reference answer) per row. The ids are rendered with
    the run's format and template: exactly the tokens training put before each response
    (`data.prompts.prompt_ids`)."""
    from sft_jax.data import formats, prompts

    fields = formats.Fields.parse(spec.fields)
    out = []
    for row in rows:
        fmt = formats.detect(row, fields) if spec.format == "auto" else spec.format
        messages = formats.to_messages(row, fmt, fields)
        request = next((m.text() for m in reversed(messages[:-1]) if m.role == "user"), "")
        out.append((prompts.prompt_ids(row, spec, tokenizer), request, messages[-1].content))
    return out


def held_out_rows(spec, limit: int) -> list[dict]:
    """Up to `limit` raw rows of the validation split: the separate source, or the same rows
    the held-out fraction of data.train took (the split is a pure function of the seed)."""
    from sft_jax.data import build, sources
    from sft_jax.data.spec import validation_fraction

    if not spec.validation or limit <= 0:
        return []
    fraction = validation_fraction(spec.validation)
    if fraction is None:
        rows = sources.Source(spec.validation, "data.validation").rows()
        return [r for r, _ in zip(_good(rows), range(limit), strict=False)]
    if not fraction:
        return []
    rows = list(sources.Source(spec.train, "data.train").rows())
    held_out = build.held_out_mask(len(rows), fraction, spec.seed)
    return [r for r, h in zip(rows, held_out, strict=True) if h and isinstance(r, dict)][:limit]


def _good(rows):
    return (r for r in rows if isinstance(r, dict))
