"""Scoring, the before/after report and the loss-curve plot."""

import json

from sft_jax import evaluate


def test_score_exact_and_contains():
    assert evaluate.score("Paris.", "paris") == {"exact": True, "contains": True}
    assert evaluate.score("The capital is Paris", "Paris") == {"exact": False, "contains": True}
    assert evaluate.score("Lyon", "Paris") == {"exact": False, "contains": False}


def test_report_puts_the_same_prompts_side_by_side():
    before = evaluate.generation_records(["Add 2 and 3."], ["5"], ["The answer is 5"])
    after = evaluate.generation_records(["Add 2 and 3."], ["5"], ["5"])
    md = evaluate.report_markdown(before, after, 2.5, 0.4)
    assert "| validation loss | 2.5000 | 0.4000 |" in md
    assert "| exact match (1 held-out prompts) | 0% | 100% |" in md
    assert "| Add 2 and 3. | 5 | The answer is 5 | ✅ 5 |" in md


def test_loss_curve_png(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "eval_loss": 3.0}, {"step": 5, "loss": 2.0}, {"step": 10, "loss": 1.0,
            "eval_loss": 1.5}]  # fmt: skip
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    png = evaluate.plot_loss_curve(str(metrics), str(tmp_path / "loss.png"))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
