"""sft_jax/cli/export.py (sft-jax-export). Its round trip (a fine-tuned run exported and
loaded by transformers with the run's logits) is tested in test_hf.py."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from sft_jax import checkpoint, runs, steps
from sft_jax.cli import export
from sft_jax.model import GPT, GPTConfig


def test_a_workdir_without_checkpoints_is_one_line(tmp_path, capsys):
    assert export.main(["--workdir", str(tmp_path), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sft-jax-export: ") and "no checkpoints under" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "hf").exists()


@pytest.fixture(scope="module")
def run_with_a_best(tmp_path_factory):
    """A run whose eval loss was best at step 2 of 4 (checkpoint.keep=1), and one without
    checkpoint.keep_best; their params at step s are the init's times s."""
    cfg = GPTConfig(
        vocab_size=256, max_seq_len=32, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=64
    )
    params = jax.jit(lambda rng: nn.meta.unbox(steps.init_params(rng, GPT(cfg))))(jax.random.key(0))
    meta = {"model": dataclasses.asdict(cfg), "tokenizer": "gpt2", "template": "chatml"}
    best = checkpoint.BestMetric("eval_loss")
    workdirs = []
    for keep_best in (best, None):
        workdir = str(tmp_path_factory.mktemp("run"))
        ckpt = checkpoint.Checkpointer(workdir, keep=1, writer=True, best=keep_best)
        for step, loss in ((1, 3.0), (2, 2.0), (3, 2.5), (4, 2.6)):
            scaled = jax.tree.map(lambda p, s=step: p * s, params)
            ckpt.save(step, {"params": scaled}, meta, record={"eval_loss": loss})
        ckpt.close()
        workdirs.append(workdir)
    return (*workdirs, params)


def test_best_exports_the_best_checkpoint(run_with_a_best, tmp_path, capsys):
    workdir, _, params = run_with_a_best
    run = runs.load_run(workdir, best=True)
    assert run.step == 2 and run.best == {"step": 2, "metric": "eval_loss", "value": 2.0}
    for got, want in zip(jax.tree.leaves(run.params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(got, want * 2)
    assert runs.load_run(workdir).step == 4
    out = tmp_path / "hf"
    assert export.main(["--workdir", workdir, "--best", "--out", str(out)]) == 0
    assert f"exported step 2 of {workdir}" in capsys.readouterr().out
    assert (out / "config.json").exists()


def test_best_without_keep_best_or_with_step_is_refused(run_with_a_best, tmp_path, capsys):
    _, workdir, _ = run_with_a_best
    assert export.main(["--workdir", workdir, "--best", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--best: the run in" in err and "checkpoint.keep_best" in err
    with pytest.raises(ValueError, match="give --best or --step, not both"):
        runs.load_run(workdir, step=4, best=True)
    with pytest.raises(SystemExit):  # argparse: not allowed with argument --step
        export.main(["--workdir", workdir, "--best", "--step", "2", "--out", str(tmp_path)])
