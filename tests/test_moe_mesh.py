"""A mixture of experts trains the same on 1 device and with its experts split over the
mesh's `expert` axis (8 faked CPU devices): losses, router losses and parameters after a
few steps, for expert=4 × fsdp=2 and expert=2 × data=2 × fsdp=2 (and with tensor and
gradient accumulation); and the compiled step moves tokens as `moe._expert_parallel` says
(an all-gather and a reduce-scatter over the expert groups per layer) with no
[tokens, experts, d_model] tensor anywhere."""

import re

import jax
import numpy as np
import pytest

from sft_jax import sharding, train
from sft_jax.model import GPT, GPTConfig
from sft_jax.optim import OptimConfig, make_optimizer
from tests.test_steps import VOCAB, make_batch

MOE = GPTConfig(
    family="qwen3_moe",
    vocab_size=VOCAB,
    max_seq_len=64,
    d_model=48,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    d_ff=64,
    head_dim=16,
    positions="rope",
    norm="rmsnorm",
    mlp="swiglu",
    bias=False,
    qk_norm=True,
    tie_embeddings=False,
    n_experts=8,
    experts_per_token=3,
    d_expert=40,
    router_norm_topk=True,
    router_aux_loss_coef=0.05,
    router_z_loss_coef=0.01,
)
STEPS = 3
ROWS, SEQ = 8, 24


def _run(mesh, micro_steps=1, lora_spec=None) -> tuple[list[tuple[float, float, float]], dict]:
    model = GPT(MOE, lora_spec.layers(MOE) if lora_spec else None)
    tx, schedule = make_optimizer(OptimConfig(learning_rate=1e-2, warmup_steps=1), STEPS)
    fns = train.build_steps(model, tx, schedule, mesh, micro_steps)
    out = []
    with fns.context():
        state = fns.init(jax.random.key(0))
        for i in range(STEPS):
            batch = jax.device_put(make_batch(rows=ROWS, seq=SEQ, seed=i), fns.batch_sharding)
            state, m = fns.train_step(state, batch)
            out.append((float(m["loss"]), float(m["router_aux_loss"]), float(m["router_z_loss"])))
    return out, jax.device_get(state.params)


@pytest.fixture(scope="module")
def one_device():
    return _run(sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]))


@pytest.mark.parametrize(
    "sizes",
    [dict(expert=4, fsdp=2, data=1), dict(expert=2, data=2, fsdp=2)],
    ids=["expert4-fsdp2", "expert2-data2-fsdp2"],
)
def test_expert_parallel_training_matches_one_device(one_device, sizes):
    ref, ref_params = one_device
    mesh = sharding.make_mesh(**sizes)
    assert mesh.shape["expert"] == sizes["expert"]
    got, params = _run(mesh)
    print(f"1 device {ref}\n{sizes} {got}")
    np.testing.assert_allclose(got, ref, rtol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), params, ref_params)


def test_expert_parallel_with_tensor_and_accumulation_matches_one_device():
    """expert=2 × fsdp=2 × tensor=2 with two micro-batches: the router losses are each
    micro-batch's, averaged, on the mesh as on one device."""
    ref, ref_params = _run(sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]), 2)
    got, params = _run(sharding.make_mesh(data=1, fsdp=2, tensor=2, expert=2), 2)
    np.testing.assert_allclose(got, ref, rtol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), params, ref_params)


def test_lora_on_attention_router_and_experts_on_the_mesh_matches_one_device():
    """all-linear LoRA (attention, router, the experts' fused gate_up and down adapters,
    per expert) over a frozen base, expert=2 × data=2 × fsdp=2: the adapters train the same
    as on one device."""
    from sft_jax import lora

    spec = lora.LoraSpec(rank=4, alpha=8.0, targets=("all-linear",))
    ref, ref_params = _run(sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]), 1, spec)
    got, params = _run(sharding.make_mesh(data=2, fsdp=2, expert=2), 1, spec)
    np.testing.assert_allclose(got, ref, rtol=2e-5)
    experts = params["layers"]["mlp"]["experts"]
    assert experts["lora_gate_up"]["lora_b"].shape == (2, 8, 4, 2 * MOE.d_expert)
    assert np.abs(experts["lora_down"]["lora_b"]).max() > 0  # trained from zero
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), params, ref_params)


def test_experts_are_split_over_the_expert_axis():
    mesh = sharding.make_mesh(expert=4, fsdp=2)
    model = GPT(MOE)
    tx, schedule = make_optimizer(OptimConfig(learning_rate=1e-2), STEPS)
    fns = train.build_steps(model, tx, schedule, mesh)
    experts = fns.state_shardings.params["layers"]["mlp"]["experts"]
    # [layers, experts, d_model, d_expert]: experts over `expert`, d_model over fsdp.
    assert tuple(experts["gate_proj"].spec)[:3] == (None, "expert", "fsdp")
    # Other weights split their d_model over fsdp × expert, as ZeRO-3 over both.
    q = fns.state_shardings.params["layers"]["self_attn"]["q_proj"]["kernel"]
    assert tuple(q.spec)[:2] == (None, ("fsdp", "expert"))


def test_dispatch_is_an_all_gather_and_a_reduce_scatter_with_no_dense_expert_tensor():
    mesh = sharding.make_mesh(expert=4, fsdp=2)
    model = GPT(MOE)
    tx, schedule = make_optimizer(OptimConfig(learning_rate=1e-2), STEPS)
    fns = train.build_steps(model, tx, schedule, mesh)
    with fns.context():
        state = fns.init(jax.random.key(0))
        batch = jax.device_put(make_batch(rows=ROWS, seq=SEQ), fns.batch_sharding)
        hlo = fns.train_step.lower(state, batch).compile().as_text()
    tokens_per_device = ROWS * SEQ // 8
    gathered = 4 * tokens_per_device  # an expert group's tokens
    # The tokens, gathered over the 4 devices of an expert group: [group tokens, d_model].
    assert re.search(rf"f32\[{gathered},{MOE.d_model}\]\S* all-gather", hlo), "no token all-gather"
    # and the experts' outputs summed back onto each device's own tokens.
    scattered = rf"f32\[{tokens_per_device},{MOE.d_model}\]\S* reduce-scatter"
    assert re.search(scattered, hlo), "no output reduce-scatter"
    # No [tokens·k or tokens, experts, d_model] (nor the transposes) dense dispatch tensor.
    for n in {gathered, gathered * MOE.experts_per_token, ROWS * SEQ, ROWS * SEQ * 3}:
        for shape in (f"{n},{MOE.n_experts},{MOE.d_model}", f"{MOE.n_experts},{n},{MOE.d_model}"):
            assert f"[{shape}]" not in hlo, shape
