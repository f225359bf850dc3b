"""Scoring, the before/after report and the loss-curve plot."""

import functools
import json

from sft_jax import evaluate
from tests.run_config import parse


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
    rows = [
        {"step": 0, "eval_loss": 3.0},
        {"step": 5, "loss": 2.0},
        {"step": 10, "loss": 1.0, "eval_loss": 1.5},
    ]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    png = evaluate.plot_loss_curve(str(metrics), str(tmp_path / "loss.png"))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_evaluation_alone_validation_loss_and_before_after_report(tmp_path):
    import jax
    import numpy as np

    from configs import tiny
    from sft_jax import config as config_lib
    from sft_jax import data as data_lib
    from sft_jax import losses, train
    from sft_jax.model import GPT

    c = tiny.get_config()
    c.data.train, c.data.validation = "synthetic:mix:200", "0.1"
    c.eval.generations, c.eval.max_new_tokens = 2, 2
    c.train.progress_bar = False
    s = train.setup(parse(c), str(tmp_path))
    batch = 8
    # The run's evaluation settings; each Evaluation below adds its rows and loss function.
    evaluation = functools.partial(
        evaluate.Evaluation,
        str(tmp_path),
        config_lib.eval_config(c),
        c.seed,
        s.data_spec,
        s.tokenizer,
        s.model_cfg,
        batch_size=batch,
    )
    eval_fn = lambda p, local: s.fns.eval_step(
        p, train.global_batch(local, s.fns.batch_sharding, batch)
    )
    ev = evaluation(s.splits.validation, eval_fn=eval_fn)
    capped = evaluation(s.splits.validation, eval_fn=eval_fn, max_batches=1)  # train.eval_steps
    with s.fns.context():
        got = ev.validation_loss(s.state.params)
        got_capped = capped.validation_loss(s.state.params)
    # The reference: the unsharded model and the loss contract, batch by batch.
    params = jax.device_get(s.state.params)
    sums = []
    for b in data_lib.eval_batches(s.splits.validation, batch):
        logits = GPT(s.model_cfg).apply(
            {"params": params}, b["tokens"], positions=b["positions"], segment_ids=b["segment_ids"]
        )
        loss_sum, n = losses.masked_cross_entropy(logits, b["targets"], b["loss_mask"])
        sums.append((float(loss_sum), float(n)))
    total, count = (sum(x) for x in zip(*sums, strict=True))
    assert len(sums) > 1 and got["eval_loss_tokens"] == count > 0
    np.testing.assert_allclose(got["eval_loss"], total / count, rtol=1e-5)
    assert got_capped["eval_loss_tokens"] == sums[0][1]
    np.testing.assert_allclose(got_capped["eval_loss"], sums[0][0] / sums[0][1], rtol=1e-5)

    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 0, "eval_loss": 3.5}\n{"step": 9, "loss": 1.0, "eval_loss": 1.25}\n'
    )
    ev.generations_before(s.state.params)
    # A resumed run's Evaluation never answered "before": it reads the earlier process's file.
    resumed = evaluation(None, eval_fn=None)
    assert resumed.validation_loss(s.state.params) == {}
    resumed.finish(s.state.params)
    assert "| validation loss | 3.5000 | 1.2500 |" in (tmp_path / "report.md").read_text()
    # The run that answered "before" holds those records itself: the file is not needed.
    (tmp_path / "generations_before.jsonl").unlink()
    (tmp_path / "report.md").unlink()
    ev.finish(s.state.params)
    report = (tmp_path / "report.md").read_text()
    assert "| exact match (2 held-out prompts) |" in report
    assert {"generations_after.jsonl", "loss_curve.png"} <= {p.name for p in tmp_path.iterdir()}
    s.checkpointer.close()
