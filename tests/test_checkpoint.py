"""Orbax checkpoints: exact round trip, restore onto another mesh, retention."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from sft_jax import checkpoint, run_meta, sharding, train
from sft_jax.model import GPT, GPTConfig
from sft_jax.optim import OptimConfig, make_optimizer
from tests.test_steps import make_batch


def _fns(mesh):
    model = GPT(GPTConfig.preset("tiny-llama", vocab_size=256))
    tx, schedule = make_optimizer(OptimConfig(learning_rate=1e-2), 10)
    return train.build_steps(model, tx, schedule, mesh)


def _trained_state(mesh):
    fns = _fns(mesh)
    with fns.context():
        state = fns.init(jax.random.key(1))
        for i in range(2):
            state, _ = fns.train_step(state, jax.device_put(make_batch(seed=i), fns.batch_sharding))
    return state, fns


def _assert_equal_trees(a, b):
    leaves_a, leaves_b = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(x, y)


def test_save_restore_is_exact_and_lands_on_another_mesh(tmp_path):
    state, fns = _trained_state(sharding.make_mesh(1, 8, 1))
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2)
    ckpt.save(2, state, {"note": "x", "step": 2})
    ckpt.wait()
    assert ckpt.latest_step() == 2

    for mesh in (sharding.make_mesh(2, 1, 4), sharding.make_mesh(1, 1, 1, jax.devices()[:1])):
        other = _fns(mesh)
        target = checkpoint.abstract_with_shardings(other.abstract_state, other.state_shardings)
        restored, meta = ckpt.restore(2, target)
        assert meta == {"note": "x", "step": 2}
        _assert_equal_trees(restored, state)
        kernel = restored.params["layers"]["mlp"]["up_proj"]["kernel"]
        assert kernel.sharding == other.state_shardings.params["layers"]["mlp"]["up_proj"]["kernel"]
    ckpt.close()


def test_keeps_only_the_newest(tmp_path):
    state, _ = _trained_state(sharding.make_mesh(1, 1, 1, jax.devices()[:1]))
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, state, {"step": step})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3]
    ckpt.close()


def test_runs_from_before_the_family_field_still_open_and_resume():
    # Old metadata has no `family`: it follows from the architecture, as it used to.
    for preset in ("tiny", "tiny-llama"):
        cfg = GPTConfig.preset(preset)
        old = json.loads(json.dumps(dataclasses.asdict(cfg)))  # as the meta stores it
        del old["family"]
        assert run_meta.RunMeta.from_json({"model": old}).model == cfg
        run_meta.check_compatible(old, dataclasses.asdict(cfg), "dir")  # no error
    qwen2 = GPTConfig.preset("tiny-llama", family="qwen2", qkv_bias=True)
    old = {k: v for k, v in dataclasses.asdict(qwen2).items() if k != "family"}
    assert run_meta.RunMeta.from_json({"model": old}).model.family == "qwen2"
    with pytest.raises(ValueError, match="family: checkpoint 'llama' vs config 'qwen2'"):
        run_meta.check_compatible(
            dataclasses.asdict(GPTConfig.preset("tiny-llama")), dataclasses.asdict(qwen2), "dir"
        )


def test_runs_from_before_the_gemma_fields_still_resume():
    # Meta written before qk_norm, soft caps, windows … existed: they were at their defaults.
    cfg = GPTConfig.preset("tiny-llama")
    new_fields = (
        "qk_norm",
        "norm_plus_one",
        "sandwich_norms",
        "embed_scale",
        "attn_softcap",
        "final_softcap",
        "sliding_window",
        "global_every",
        "rope_linear_factor",
    )
    old = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in new_fields}
    run_meta.check_compatible(old, dataclasses.asdict(cfg), "dir")  # no error
    windowed = dataclasses.replace(cfg, sliding_window=8)
    with pytest.raises(ValueError, match="sliding_window: checkpoint 0 vs config 8"):
        run_meta.check_compatible(old, dataclasses.asdict(windowed), "dir")


def test_a_workdir_orbax_cannot_write_arrays_to_is_refused_by_name():
    with pytest.raises(ValueError, match=r"workdir s3://b/run: Orbax .* gs://"):
        checkpoint.Checkpointer("s3://b/run")


def _save_run(ckpt, losses: dict, last: int) -> None:
    """Saves of a toy state at steps 1..last, evaluated (eval_loss) at the steps of `losses`."""
    for step in range(1, last + 1):
        record = {"loss": 1.0}
        if step in losses:
            record["eval_loss"] = losses[step]
        ckpt.save(step, {"w": np.full(3, step, np.float32)}, {"step": step}, record=record)
    ckpt.wait()


def test_keep_best_keeps_the_best_step_after_newer_ones_rotate_out(tmp_path):
    best = checkpoint.BestMetric.parse("eval_loss")
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2, writer=True, best=best)
    # The eval loss falls to 2.0 at step 4, then rises again.
    _save_run(ckpt, {2: 3.0, 4: 2.0, 6: 2.5, 8: 2.7, 10: 2.9}, last=10)
    assert ckpt.all_steps() == [4, 9, 10]
    named = {"step": 4, "metric": "eval_loss", "value": 2.0}
    assert ckpt.restore_meta(10)["best"] == named and ckpt.best == named
    assert ckpt.improves({"eval_loss": 1.9}) and not ckpt.improves({"eval_loss": 2.0})
    with pytest.raises(ValueError, match="checkpoint.keep_best: the evaluation has no metric"):
        ckpt.improves({"eval_perplexity": 3.0})
    ckpt.close()
    # A resumed run knows the best (Orbax metrics) and lets it go once a better one is saved.
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2, writer=True, best=best)
    assert ckpt.best == named
    ckpt.save(11, {"w": np.zeros(3, np.float32)}, {}, record={"eval_loss": 1.5})
    ckpt.save(12, {"w": np.zeros(3, np.float32)}, {}, record={"eval_loss": float("nan")})
    ckpt.wait()
    assert ckpt.all_steps() == [11, 12] and ckpt.restore_meta(12)["best"]["step"] == 11
    ckpt.close()


def test_keep_best_higher_is_better_and_bad_names():
    accuracy = checkpoint.BestMetric.parse("max:eval_accuracy")
    assert accuracy == checkpoint.BestMetric("eval_accuracy", higher_is_better=True)
    assert accuracy.improves(0.6, 0.5) and not accuracy.improves(0.4, 0.5)
    assert accuracy.improves(0.6, 0.5, min_delta=0.05) and not accuracy.improves(0.52, 0.5, 0.05)
    assert checkpoint.BestMetric.parse("min:eval_loss") == checkpoint.BestMetric("eval_loss")
    assert checkpoint.BestMetric.parse("") is None
    with pytest.raises(ValueError, match="checkpoint.keep_best='max:'"):
        checkpoint.BestMetric.parse("max:")
