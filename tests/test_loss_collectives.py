"""The chunked loss on a mesh: no collective inside its chunk loop, and the same gradients.

Left to XLA's partitioner, the loss's chunk loop all-reduced a [vocab, d_model] head gradient
(and, with tensor parallelism, logits-sized partial sums) in every chunk. The real train step
(`train.build_steps`) is compiled on 8 faked devices and its HLO text read: the loop whose
body holds the [.., vocab] logits must hold no collective. One SGD step at learning rate 1
then gives the gradient, compared with autodiff of the unchunked loss on one device.
"""

import re

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from sft_jax import sharding, steps, train
from sft_jax.losses import masked_cross_entropy
from sft_jax.model import GPT, GPTConfig

# A vocabulary size no other dimension of the model or batch shares, so that the loss's
# loop is the one whose body has it in a shape.
VOCAB = 320
COLLECTIVES = ("all-reduce", "reduce-scatter", "all-gather", "collective-permute", "all-to-all")


def computations(hlo: str) -> dict[str, list[str]]:
    """HLO text → {computation name: its instruction lines}."""
    comps, lines = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if head and not line.startswith(" "):
            lines = comps.setdefault(head.group(1), [])
        elif line.strip() == "}":
            lines = None
        elif lines is not None:
            lines.append(line)
    return comps


def called(comps, name: str, seen: set[str]) -> set[str]:
    """`name` and every computation it calls (fusions, reducers, loops, branches)."""
    if name in seen or name not in comps:
        return seen
    seen.add(name)
    for line in comps[name]:
        for group in re.findall(
            r"(?:calls|to_apply|body|condition|branch_computations)=\{?([%\w.\-, ]+)", line
        ):
            for callee in group.split(","):
                called(comps, callee.strip().lstrip("%"), seen)
    return seen


def collectives(lines: list[str]) -> list[str]:
    ops = "|".join(COLLECTIVES)
    return [line.strip() for line in lines if re.search(rf"\s({ops})(-start)?\(", line)]


def loss_loops(comps, tensor: int) -> list[list[str]]:
    """The collectives in each while loop whose own body has the vocabulary (whole, or a
    tensor-parallel shard of it) in a shape."""
    vocab_shape = re.compile(rf"\[[\d,]*\b({VOCAB}|{VOCAB // tensor})\b[\d,]*\]")
    found = []
    for lines in comps.values():
        for line in lines:
            loop = re.search(r" while\(.*body=%?([\w.\-]+)", line)
            if loop and any(vocab_shape.search(x) for x in comps[loop.group(1)]):
                inside = called(comps, loop.group(1), set())
                found.append([c for name in inside for c in collectives(comps[name])])
    return found


def batch(rows=8, seq=512, seed=0):
    """Packed rows: two examples and a tail of padding each, masks of uneven density."""
    rng = np.random.default_rng(seed)
    seg, pos = np.zeros((rows, seq), np.int32), np.zeros((rows, seq), np.int32)
    for r in range(rows):
        a = int(rng.integers(seq // 4, seq // 2))
        b = int(rng.integers(seq // 4, seq - a))
        seg[r, :a], seg[r, a : a + b] = 1, 2
        pos[r, :a], pos[r, a : a + b] = np.arange(a), np.arange(b)
    mask = (rng.random((rows, seq)) < rng.random((rows, 1))) & (seg > 0)
    return {
        "tokens": rng.integers(0, VOCAB, (rows, seq)).astype(np.int32),
        "targets": rng.integers(0, VOCAB, (rows, seq)).astype(np.int32),
        "loss_mask": mask.astype(np.float32),
        "segment_ids": seg,
        "positions": pos,
    }


@pytest.fixture(scope="module")
def case():
    """(model, params as numpy, a batch, the reference gradients): autodiff of
    Σ mask·nll / Σ mask over the whole logits, on one device."""
    model = GPT(GPTConfig.preset("tiny-llama", vocab_size=VOCAB, n_layers=1))
    params = jax.tree.map(np.asarray, nn.meta.unbox(steps.init_params(jax.random.key(0), model)))
    b = batch()

    def loss(p):
        logits = model.apply(
            {"params": p}, b["tokens"], positions=b["positions"], segment_ids=b["segment_ids"]
        )
        total, count = masked_cross_entropy(logits, b["targets"], b["loss_mask"])
        return total / count

    return model, params, b, jax.jit(jax.grad(loss))(params)


@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (2, 2, 2)])
def test_train_step_loss_loop_has_no_collectives_and_same_gradients(case, mesh_shape):
    model, params, b, expected = case
    tx = optax.sgd(1.0)  # the parameter change is the gradient
    mesh = sharding.make_mesh(*mesh_shape)
    fns = train.build_steps(model, tx, optax.constant_schedule(1.0), mesh)
    placed = jax.device_put(params, fns.state_shardings.params)  # donated to the state
    with fns.context():
        state = fns.init_from_params(placed, jax.random.key(1))
        gbatch = {k: jax.device_put(v, fns.batch_sharding) for k, v in b.items()}
        compiled = fns.train_step.lower(state, gbatch).compile()
        new_state, metrics = compiled(state, gbatch)

    comps = computations(compiled.as_text())
    loops = loss_loops(comps, tensor=mesh_shape[2])
    total = sum(len(collectives(lines)) for lines in comps.values())
    print(f"mesh {mesh_shape}: {total} collectives in the step, in the loss loop: {loops}")
    assert len(loops) == 1, "expected exactly one loop over the loss's chunks"
    assert loops[0] == [], f"collectives inside the loss's chunk loop: {loops[0]}"

    assert bool(metrics["finite"])
    got = jax.tree.map(lambda p, q: np.asarray(p) - np.asarray(q), params, new_state.params)
    leaves = zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(expected), strict=True)
    for (path, g), e in leaves:
        np.testing.assert_allclose(
            g, np.asarray(e), atol=2e-6, rtol=1e-3, err_msg=jax.tree_util.keystr(path)
        )
