"""Schedule shape, clipping, the weight-decay mask, and each optimizer: it trains, decays
what the mask says, and matches its reference (torch, transformers, optax's own Muon)."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec
from optax.contrib import MuonDimensionNumbers

from sft_jax import sharding, steps
from sft_jax.model import GPT, GPTConfig
from sft_jax.optim import (
    OPTIMIZERS,
    OptimConfig,
    make_optimizer,
    make_schedule,
    muon_dimension_numbers,
    weight_decay_mask,
)


def test_warmup_then_cosine_to_the_end_ratio():
    s = make_schedule(
        OptimConfig(learning_rate=1.0, warmup_steps=10, end_learning_rate_ratio=0.1), 110
    )
    np.testing.assert_allclose([float(s(i)) for i in (0, 5, 10)], [0.0, 0.5, 1.0], atol=1e-6)
    np.testing.assert_allclose(float(s(60)), 0.1 + 0.9 * 0.5, atol=1e-6)  # half-way down
    np.testing.assert_allclose(float(s(110)), 0.1, atol=1e-6)


def test_linear_and_constant_decay():
    lin = make_schedule(
        OptimConfig(learning_rate=2.0, warmup_steps=0, decay="linear", end_learning_rate_ratio=0.0),
        100,
    )
    np.testing.assert_allclose([float(lin(0)), float(lin(50)), float(lin(100))], [2.0, 1.0, 0.0])
    const = make_schedule(OptimConfig(learning_rate=2.0, warmup_steps=4, decay="constant"), 100)
    np.testing.assert_allclose([float(const(2)), float(const(99))], [1.0, 2.0])


def test_bad_schedule_settings_name_the_key():
    with pytest.raises(ValueError, match="optim.decay"):
        make_schedule(OptimConfig(decay="exp"), 10)
    with pytest.raises(ValueError, match="optim.warmup_steps"):
        make_schedule(OptimConfig(warmup_steps=20), 10)


PARAMS = {
    "wte": {"embedding": jnp.ones((4, 2))},
    "wpe": jnp.ones((3, 2)),
    "h": {
        "ln_1": {"scale": jnp.ones(2), "bias": jnp.ones(2)},
        "mlp": {"c_fc": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}},
    },
    "lm_head": {"kernel": jnp.ones((2, 4))},
}


def test_decay_mask_skips_norms_biases_and_embeddings():
    mask = weight_decay_mask(PARAMS)
    assert mask["h"]["mlp"]["c_fc"]["kernel"] and mask["lm_head"]["kernel"]
    assert not any(
        [
            mask["wte"]["embedding"],
            mask["wpe"],
            mask["h"]["ln_1"]["scale"],
            mask["h"]["ln_1"]["bias"],
            mask["h"]["mlp"]["c_fc"]["bias"],
        ]
    )
    assert weight_decay_mask(PARAMS, decay_embeddings=True)["wte"]["embedding"]


def test_weight_decay_applies_only_where_masked():
    tx, _ = make_optimizer(
        OptimConfig(learning_rate=0.1, weight_decay=0.5, decay="constant", grad_clip_norm=0.0), 10
    )
    zero_grads = jax.tree.map(jnp.zeros_like, PARAMS)
    updates, _ = tx.update(zero_grads, tx.init(PARAMS), PARAMS)
    # With zero gradients only decay moves a parameter: -lr * wd * p = -0.05.
    np.testing.assert_allclose(updates["h"]["mlp"]["c_fc"]["kernel"], -0.05, rtol=1e-6)
    np.testing.assert_allclose(updates["h"]["mlp"]["c_fc"]["bias"], 0.0)
    np.testing.assert_allclose(updates["wte"]["embedding"], 0.0)


def test_global_norm_clipping_happens_before_adam():
    tx, _ = make_optimizer(
        OptimConfig(learning_rate=1.0, decay="constant", grad_clip_norm=1.0, b1=0.5), 10
    )
    p = {"w": {"kernel": jnp.zeros(4)}}
    g = {"w": {"kernel": jnp.asarray([3.0, 4.0, 0.0, 0.0])}}  # global norm 5
    _, state = tx.update(g, tx.init(p), p)
    # Adam's first moment after one step is (1 - b1) · the clipped gradient g / 5.
    mu = optax.tree_utils.tree_get(state, "mu")
    np.testing.assert_allclose(mu["w"]["kernel"], [0.3, 0.4, 0.0, 0.0], atol=1e-6)


# --- The optimizers (optim.name) -----------------------------------------------------------

L, D, HEADS, HEAD_DIM, FF, VOCAB = 2, 8, 2, 4, 16, 32


def model_like_params(seed=0, lora=False):
    """A tree shaped as a scanned Llama's: kernels [layers, *in, *out] with heads kept, and
    (lora=True) only the LoRA adapters of q_proj and o_proj, as sft_jax.lora lays them out."""
    rng = np.random.default_rng(seed)  # numpy: jax.random would compile once per shape
    normal = lambda *shape: jnp.asarray(0.3 * rng.normal(size=shape), jnp.float32)  # noqa: E731
    if lora:
        return {
            "layers": {
                "self_attn": {
                    "q_proj": {"lora_a": normal(L, D, 3), "lora_b": normal(L, 3, HEADS, HEAD_DIM)},
                    "o_proj": {"lora_a": normal(L, HEADS, HEAD_DIM, 3), "lora_b": normal(L, 3, D)},
                }
            }
        }
    return {
        "embed_tokens": {"embedding": normal(VOCAB, D)},
        "layers": {
            "input_layernorm": {"scale": 1.0 + normal(L, D)},
            "self_attn": {
                "q_proj": {"kernel": normal(L, D, HEADS, HEAD_DIM)},
                "o_proj": {"kernel": normal(L, HEADS, HEAD_DIM, D)},
            },
            "mlp": {"up_proj": {"kernel": normal(L, D, FF), "bias": normal(L, FF)}},
        },
        "lm_head": {"kernel": normal(D, VOCAB)},
    }


def toy_loss(params, tokens, targets):
    """Next-token cross-entropy of a small residual net over `model_like_params`."""
    x = params["embed_tokens"]["embedding"][tokens]
    blocks = params["layers"]
    for i in range(L):
        h = x * blocks["input_layernorm"]["scale"][i]
        q = jnp.einsum("td,dhk->thk", h, blocks["self_attn"]["q_proj"]["kernel"][i])
        x = x + jnp.einsum("thk,hkd->td", jnp.tanh(q), blocks["self_attn"]["o_proj"]["kernel"][i])
        up = blocks["mlp"]["up_proj"]
        x = x + jnp.tanh(x @ up["kernel"][i] + up["bias"][i]).mean(-1, keepdims=True)
    logits = x @ params["lm_head"]["kernel"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def test_unknown_optimizer_names_the_key_and_the_choices():
    with pytest.raises(ValueError, match=r"optim.name.*'adam'.*adamw.*muon"):
        make_optimizer(OptimConfig(name="adam"), 10)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_lowers_the_loss(name):
    lr = {"lion": 3e-3, "sgd": 0.3}.get(name, 1e-2)
    tx, _ = make_optimizer(OptimConfig(name=name, learning_rate=lr, decay="constant"), 30)
    rng = np.random.default_rng(0)
    tokens, targets = (jnp.asarray(rng.integers(0, VOCAB, 24)) for _ in range(2))
    params = model_like_params()

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(toy_loss)(params, tokens, targets)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    state, losses = tx.init(params), []
    for _ in range(30):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_decays_kernels_and_lora_adapters_only(name):
    cfg = OptimConfig(
        name=name, learning_rate=0.1, weight_decay=0.5, decay="constant", grad_clip_norm=0.0
    )
    tx, _ = make_optimizer(cfg, 10)
    for params in (model_like_params(), model_like_params(lora=True)):
        updates = run_updates(tx, params, [jax.tree.map(jnp.zeros_like, params)])
        # With zero gradients only decay moves a parameter: -lr · wd · p.
        decays = weight_decay_mask(params)
        for update, p, decayed in zip(
            *map(jax.tree.leaves, (updates, params, decays)), strict=True
        ):
            np.testing.assert_allclose(update, -0.05 * p if decayed else 0.0, atol=1e-7)
    assert all(jax.tree.leaves(weight_decay_mask(model_like_params(lora=True))))


def test_muon_takes_each_layers_matmul_as_one_matrix():
    """Muon on stacked kernels ([layers, *in, *out], heads kept) and LoRA adapters equals
    optax's own Muon on each layer's 2-D (in, out) matrix; the embedding, norms, biases and
    head go to AdamW."""
    cfg = OptimConfig(name="muon", learning_rate=0.02, decay="constant", grad_clip_norm=0.0)
    tx, _ = make_optimizer(cfg, 10)
    is_dims = lambda x: x is None or isinstance(x, MuonDimensionNumbers)  # noqa: E731
    for lora in (False, True):
        params = model_like_params(lora=lora)
        grads = [model_like_params(seed, lora=lora) for seed in (1, 2)]
        ours = jax.tree.leaves(run_updates(tx, params, grads))
        dims = jax.tree.leaves(muon_dimension_numbers(params), is_leaf=is_dims)
        # Every leaf as optax would see it: each layer's (in, out) matrix for Muon's (one
        # tree, so one run of optax's Muon), as it is for AdamW's.
        as_matrices, adamw_leaves = [], []
        for i, (p, d) in enumerate(zip(jax.tree.leaves(params), dims, strict=True)):
            if d is None:
                adamw_leaves.append(i)
                continue
            assert d.reduction_axis[0] == 1 and d.output_axis[-1] == p.ndim - 1  # layers first
            fan_in = math.prod(p.shape[a] for a in d.reduction_axis)
            as_matrices.append((i, lambda x, fan_in=fan_in: x.reshape(L, fan_in, -1)))
        pick = lambda tree, leaves: [jax.tree.leaves(tree)[i] for i in leaves]  # noqa: E731

        def to_2d(tree, as_matrices=as_matrices):
            return [m(jax.tree.leaves(tree)[i])[k] for i, m in as_matrices for k in range(L)]

        expected = run_updates(
            optax.contrib.muon(0.02, consistent_rms=0.2), to_2d(params), [to_2d(g) for g in grads]
        )
        got = [m(ours[i])[k] for i, m in as_matrices for k in range(L)]
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
        if adamw_leaves:
            expected = run_updates(
                optax.adamw(0.02, weight_decay=0.0),
                pick(params, adamw_leaves),
                [pick(g, adamw_leaves) for g in grads],
            )
            for g, e in zip([ours[i] for i in adamw_leaves], expected, strict=True):
                np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-7)


@functools.partial(jax.jit, static_argnums=0)
def run_updates(tx, params, grads_per_step):
    """The update of the last of these steps (params left as they are)."""
    state = tx.init(params)
    for grads in grads_per_step:
        updates, state = tx.update(grads, state, params)
    return updates


def test_muon_dimension_numbers_of_unrolled_gpt2_layers():
    params = {
        "h_0": {
            "attn": {
                "c_attn": {"kernel": jnp.zeros((8, 3, 2, 4))},
                "c_proj": {"kernel": jnp.zeros((2, 4, 8)), "bias": jnp.zeros(8)},
            },
            "mlp": {"c_proj": {"kernel": jnp.zeros((32, 8))}},
        },
        "wte": {"embedding": jnp.zeros((16, 8))},
    }
    dims = muon_dimension_numbers(params)["h_0"]
    assert dims["attn"]["c_attn"]["kernel"] == MuonDimensionNumbers((0,), (1, 2, 3))
    assert dims["attn"]["c_proj"]["kernel"] == MuonDimensionNumbers((0, 1), (2,))
    assert dims["attn"]["c_proj"]["bias"] is None
    assert dims["mlp"]["c_proj"]["kernel"] == MuonDimensionNumbers((0,), (1,))
    assert muon_dimension_numbers(params)["wte"]["embedding"] is None


def torch_reference(name: str, params: dict, grads: list[dict], **kwargs) -> dict:
    """params after torch's (or transformers') optimizer `name` took these gradients: the
    kernel decayed, the bias not (its own param group)."""
    import torch
    from transformers.optimization import Adafactor

    tensors = {k: torch.tensor(np.asarray(v), requires_grad=True) for k, v in params.items()}
    groups = [
        {"params": [tensors["kernel"]], "weight_decay": kwargs.pop("weight_decay")},
        {"params": [tensors["bias"]], "weight_decay": 0.0},
    ]
    make = {
        "adamw": torch.optim.AdamW,
        "sgd": torch.optim.SGD,
        "adafactor": functools.partial(Adafactor, scale_parameter=False, relative_step=False),
    }[name]
    opt = make(groups, **kwargs)
    for g in grads:
        for k, t in tensors.items():
            t.grad = torch.tensor(np.asarray(g[k]))
        opt.step()
    return {k: t.detach().numpy() for k, t in tensors.items()}


@pytest.mark.parametrize(
    "name, ours, theirs",
    [
        ("adamw", {}, {"betas": (0.9, 0.999), "eps": 1e-8}),
        ("sgd", {"momentum": 0.9}, {"momentum": 0.9}),
        ("sgd", {"momentum": 0.8, "nesterov": True}, {"momentum": 0.8, "nesterov": True}),
        ("adafactor", {}, {}),
    ],
)
def test_optimizers_match_torch_and_transformers(name, ours, theirs):
    # A kernel with both dims ≥ 128, so that optax factors its second moment as
    # transformers' Adafactor does every matrix.
    rng = np.random.default_rng(0)
    draw = lambda: {"kernel": rng.normal(size=(128, 130)), "bias": rng.normal(size=130)}  # noqa: E731
    params, grads = draw(), [draw() for _ in range(3)]
    cfg = OptimConfig(
        name=name,
        learning_rate=0.01,
        weight_decay=0.1,
        decay="constant",
        grad_clip_norm=0.0,
        **ours,
    )
    tx, _ = make_optimizer(cfg, 10)
    p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    state = tx.init(p)
    for g in grads:
        updates, state = tx.update(jax.tree.map(jnp.float32, g), state, p)
        p = optax.apply_updates(p, updates)
    expected = torch_reference(name, params, grads, lr=0.01, weight_decay=0.1, **theirs)
    for k in params:
        np.testing.assert_allclose(p[k], expected[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_state_takes_the_params_shardings(name):
    """Shardings derive from the boxed state of `steps.init_state` (as train.py does): a
    moment of the shape of its param is split like it (fsdp over 8 devices), a factored
    Adafactor moment (the MLP's, d_model and d_ff ≥ 128) or a Muon partition's placeholder
    is not boxed (replicated)."""
    model = GPT(GPTConfig.preset("tiny-llama", vocab_size=256, d_model=128, d_ff=256))
    tx, _ = make_optimizer(OptimConfig(name=name), 10)
    boxed = jax.eval_shape(lambda rng: steps.init_state(rng, model, tx), jax.random.key(0))
    mesh = AbstractMesh((1, 8, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    shardings = sharding.tree_shardings(boxed, mesh)
    params = nn.meta.unbox(boxed.params)
    state = jax.tree_util.tree_leaves_with_path(nn.meta.unbox(boxed.opt_state))
    like_params = 0
    for (path, leaf), s in zip(state, jax.tree.leaves(shardings.opt_state), strict=True):
        # The param's keys (not those of Muon's partition: inner_states["muon"], …).
        keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        keys = keys[1:] if keys[:1] in (("muon",), ("adamw",)) else keys
        if not keys:  # a step count
            continue
        param_spec = sharding.get_path(shardings.params, keys).spec
        if leaf.shape == sharding.get_path(params, keys).shape:
            like_params += 1
            assert s.spec == param_spec, keys
        else:
            assert s.spec == PartitionSpec(*[None] * leaf.ndim), keys
    if name == "adafactor":  # the factored params have no moment of their shape
        assert 0 < like_params < len(jax.tree.leaves(params))
    else:
        assert like_params >= len(jax.tree.leaves(params))  # at least one moment each
    q_spec = sharding.get_path(shardings.params, ("layers", "self_attn", "q_proj", "kernel")).spec
    assert "fsdp" in jax.tree.leaves(tuple(q_spec))
