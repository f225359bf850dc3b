"""What the fine-tuning changed: validation loss, responses to held-out prompts before and
after, scored where answers are checkable, a side-by-side Markdown report, and the loss
curve as a PNG. `Evaluation` owns all of it for one run.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Sequence

import jax
import numpy as np
from absl import logging
from etils import epath

from sft_jax import data as data_lib
from sft_jax import judge as judge_lib
from sft_jax import paths
from sft_jax.generate import Generator, Sampling, end_token_ids


class Evaluation:
    """The run's evaluations: validation loss over the held-out rows, and generations for
    held-out prompts before and after training with the report that compares them.

    `eval_fn(params, local_batch)` gives `{loss_sum, loss_tokens}` summed over the global
    batch of which `local_batch` is this process's part.
    """

    def __init__(
        self,
        workdir: str,
        eval_cfg,
        seed: int,
        spec,
        tokenizer,
        model_cfg,
        validation_rows,
        eval_fn: Callable,
        batch_size: int,
        max_batches: int = 0,
        process_rows=None,  # positions in each batch of this process's rows (None: all)
        lora=None,  # the params' LoRA adapters (model.LoraLayers), if any
        validation_sources=None,  # a mixture's validation rows by source: eval_loss/<name>
    ):
        self.workdir = workdir
        self.validation_rows = validation_rows
        self.validation_sources = validation_sources or {}
        self._cfg, self._seed = eval_cfg, seed
        self._tokenizer, self._model_cfg, self._lora = tokenizer, model_cfg, lora
        self._spec = spec  # the run's template, for the harness's prompts
        self._eval_fn, self._batch_size = eval_fn, batch_size
        self._max_batches = max_batches  # 0 = every batch of the split
        self._process_rows = process_rows
        self._judge = judge_lib.from_config(eval_cfg, os.environ)
        self._prompts: list[tuple[list[int], str, str]] = []
        # Generation prompts are host-local rows: single-process runs only.
        if eval_cfg.generations > 0 and jax.process_count() > 1:
            logging.warning(
                "eval.generations=%d skipped: before/after generations run in single-process "
                "runs only; answer held-out prompts after training with sft-jax-generate "
                "--workdir %s",
                eval_cfg.generations,
                workdir,
            )
        elif eval_cfg.generations > 0:
            spec = data_lib.first_source_spec(spec)  # A mixture's prompts: its first source's.
            rows = data_lib.held_out_rows(spec, eval_cfg.generations)
            self._prompts = data_lib.prompts_and_references(rows, spec, tokenizer)
        self._before: list[dict] | None = None

    def validation_loss(self, params) -> dict[str, float]:
        """Token-weighted validation loss over every held-out row once, or over the first
        `max_batches` batches ({} without held-out rows); for a mixture also each source's,
        as eval_loss/<name> (the overall loss is then theirs together)."""
        if self.validation_rows is None:
            return {}
        parts = self.validation_sources or {"": self.validation_rows}
        # Every batch of every source is dispatched before the host waits once for the sums.
        outs = jax.device_get({name: self._dispatch(params, rows) for name, rows in parts.items()})
        sums = {
            name: (
                sum(float(o["loss_sum"]) for o in out),
                sum(float(o["loss_tokens"]) for o in out),
            )
            for name, out in outs.items()
        }
        loss_sum = sum(s for s, _ in sums.values())
        count = sum(c for _, c in sums.values())
        loss = loss_sum / max(count, 1.0)
        per_source = {f"eval_loss/{n}": s / max(c, 1.0) for n, (s, c) in sums.items() if n}
        return {
            "eval_loss": loss,
            "eval_perplexity": float(np.exp(min(loss, 50.0))),
            "eval_loss_tokens": count,
            **per_source,
        }

    def _dispatch(self, params, rows) -> list:
        """The eval step's sums for each batch of `rows` (or its first `max_batches`)."""
        batches = data_lib.eval_batches(rows, self._batch_size, self._process_rows)
        if self._max_batches:
            batches = itertools.islice(batches, self._max_batches)
        return [self._eval_fn(params, local) for local in batches]

    def generations_before(self, params) -> None:
        """Answer the held-out prompts with the starting weights (kept for the report), and
        score the harness tasks."""
        if self._prompts:
            self._before = self._generate(params, "before")
        self._harness(params, "before")

    def _harness(self, params, name: str) -> None:
        """lm-evaluation-harness's scores of `eval.harness_tasks`, saved in the workdir."""
        e = self._cfg
        if not e.harness_task_list:
            return
        if jax.process_count() > 1:
            logging.warning(
                "eval.harness_tasks skipped: single-process runs only; score the "
                "checkpoint with sft-jax-eval --workdir %s",
                self.workdir,
            )
            return
        from sft_jax import harness  # needs the optional lm-eval (the eval extra)

        harness.evaluate_run(
            self.workdir,
            name,
            self._model_cfg,
            params,
            self._tokenizer,
            self._spec,
            e.harness_task_list,
            include_path=e.harness_include_path or None,
            limit=e.harness_limit or None,
            num_fewshot=None if e.harness_num_fewshot < 0 else e.harness_num_fewshot,
            apply_chat_template=e.harness_chat_template,
            batch_size=e.harness_batch_size,
            seed=self._seed,
            lora=self._lora,
        )

    def finish(self, params) -> None:
        """After training: the same prompts again, the before/after report, the loss curve."""
        metrics_path = paths.join(self.workdir, "metrics.jsonl")
        report = ""
        if self._prompts:
            after = self._generate(params, "after")
            before = self._before or self._saved_before()
            if before is not None:
                report = report_markdown(before, after, *_first_and_last_eval_loss(metrics_path))
                print(report.split("\n\n| prompt")[0])  # the figures; the rest is in the file
        self._harness(params, "after")
        if self._cfg.harness_task_list:
            from sft_jax import harness  # needs the optional lm-eval (the eval extra)

            benchmarks = harness.report_markdown(self.workdir)
            print(benchmarks)
            report = f"{report}\n{benchmarks}" if report else benchmarks
        if report and jax.process_index() == 0:
            epath.Path(self.workdir, "report.md").write_text(report, encoding="utf-8")
        if jax.process_index() == 0 and epath.Path(metrics_path).exists():
            plot_loss_curve(metrics_path, paths.join(self.workdir, "loss_curve.png"))

    def _generate(self, params, name: str) -> list[dict]:
        generator = Generator(
            self._model_cfg, params, end_token_ids(self._tokenizer), lora=self._lora
        )
        sampling = Sampling(max_new_tokens=self._cfg.max_new_tokens, seed=self._seed)
        ids = [ids for ids, _, _ in self._prompts]
        responses = respond(generator, self._tokenizer, ids, sampling)
        records = generation_records(
            [request for _, request, _ in self._prompts],
            [reference for _, _, reference in self._prompts],
            responses,
        )
        if self._judge is not None:
            self._judge.score_records(records)
        write_jsonl(paths.join(self.workdir, f"generations_{name}.jsonl"), records)
        logging.info("generations %s training: %s", name, summarize(records))
        return records

    def _saved_before(self) -> list[dict] | None:
        """A resumed run answered the prompts "before" in an earlier process: read its file."""
        path = epath.Path(self.workdir, "generations_before.jsonl")
        if not path.exists():
            return None
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _first_and_last_eval_loss(metrics_path: str) -> tuple[float | None, float | None]:
    if not epath.Path(metrics_path).exists():
        return None, None
    lines = epath.Path(metrics_path).read_text(encoding="utf-8").splitlines()
    losses = [r["eval_loss"] for r in map(json.loads, lines) if "eval_loss" in r]
    return (losses[0], losses[-1]) if losses else (None, None)


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
    """One JSON object per line, to a local path or a bucket URL."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    epath.Path(path).write_text(text, encoding="utf-8")


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
    for line in epath.Path(metrics_path).read_text(encoding="utf-8").splitlines():
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
    png = epath.Path(paths.resolve(png_path))
    png.parent.mkdir(parents=True, exist_ok=True)
    with png.open("wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return png_path


PromptFn = Callable[[dict], tuple[str, str]]  # row -> (rendered prompt, reference answer)
