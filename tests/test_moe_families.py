"""Qwen3-MoE and Mixtral against transformers itself: tiny random models with odd shapes
(5 and 3 experts, top-k 1, 2 and 3, grouped-query attention, a sliding window shorter than
the rows, tied and untied heads, a padded batch): logits, packed rows, the router's
load-balancing loss, export both ways. The shared helpers are tests/test_families.py's."""

import jax
import numpy as np
import pytest
import torch
import transformers

from sft_jax import hf
from sft_jax.model import GPT
from sft_jax.model.moe import router_losses
from tests import hf_parity
from tests.hf_parity import COMMON, VOCAB


def _qwen3_moe_top3():
    config = transformers.Qwen3MoeConfig(
        **COMMON,
        num_hidden_layers=2,
        tie_word_embeddings=False,
        num_experts=5,
        num_experts_per_tok=3,
        moe_intermediate_size=24,
        norm_topk_prob=True,
        router_aux_loss_coef=0.01,
    )
    return transformers.Qwen3MoeForCausalLM(config)


def _qwen3_moe_top1():
    config = transformers.Qwen3MoeConfig(
        **COMMON,
        num_hidden_layers=2,
        tie_word_embeddings=True,
        num_experts=6,
        num_experts_per_tok=1,
        moe_intermediate_size=20,
        norm_topk_prob=False,
    )
    return transformers.Qwen3MoeForCausalLM(config)


def _mixtral():
    config = transformers.MixtralConfig(
        **COMMON,
        num_hidden_layers=2,
        tie_word_embeddings=False,
        num_local_experts=3,
        num_experts_per_tok=2,
        sliding_window=5,
    )
    return transformers.MixtralForCausalLM(config)


BUILDERS = {
    "qwen3_moe-top3": _qwen3_moe_top3,
    "qwen3_moe-top1": _qwen3_moe_top1,
    "mixtral": _mixtral,
}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family(request, tmp_path_factory):
    """(family, transformers model, its folder, its logits on `hf_parity.batch()`)."""
    torch.manual_seed(0)
    model = BUILDERS[request.param]()
    with torch.no_grad():  # norms start at 1: perturb every tensor
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.eval()
    folder = str(tmp_path_factory.mktemp(request.param))
    model.save_pretrained(folder)
    tokens, mask = hf_parity.batch()
    return request.param.split("-")[0], model, folder, hf_parity.torch_logits(model, tokens, mask)


def test_config_is_the_family_s(family):
    name, model, folder, _ = family
    cfg = hf.load_config(folder)
    c = model.config
    assert cfg.family == name
    assert cfg.n_experts == getattr(c, "num_experts", None) or c.num_local_experts
    assert cfg.experts_per_token == c.num_experts_per_tok
    assert cfg.router_norm_topk == (name == "mixtral" or c.norm_topk_prob)
    assert cfg.router_aux_loss_coef == c.router_aux_loss_coef
    assert cfg.sliding_window == (5 if name == "mixtral" else 0)
    # The parameter count is transformers' own, and the active count that of k experts.
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    per_expert = 3 * cfg.d_model * cfg.d_expert
    inactive = cfg.n_layers * (cfg.n_experts - cfg.experts_per_token) * per_expert
    assert cfg.num_params(active=True) == cfg.num_params() - inactive


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "unrolled"])
def test_imported_logits_equal_transformers(family, scan_layers):
    _, _, folder, ref = family
    cfg, params = hf.load_hf(folder, scan_layers=scan_layers)
    tokens, mask = hf_parity.batch()
    real = mask.astype(bool)
    assert np.abs(hf_parity.our_logits(cfg, params, tokens, mask)[real] - ref[real]).max() <= 1e-4


@pytest.mark.parametrize("matmul", ["ragged", "blocked"])
def test_both_grouped_matmuls_give_transformers_logits(family, matmul):
    import dataclasses

    _, _, folder, ref = family
    cfg, params = hf.load_hf(folder)
    cfg = dataclasses.replace(cfg, moe_matmul=matmul)
    tokens, mask = hf_parity.batch()
    real = mask.astype(bool)
    assert np.abs(hf_parity.our_logits(cfg, params, tokens, mask)[real] - ref[real]).max() <= 1e-4


def test_packed_rows_equal_each_example_alone(family):
    _, _, folder, ref = family
    cfg, params = hf.load_hf(folder)
    assert hf_parity.packed_rows_error(cfg, params, ref) <= 1e-4


def test_load_balancing_loss_equals_transformers(family):
    """transformers' aux_loss (output_router_logits=True, the padded batch's attention
    mask) is ours over real tokens; padding changes neither."""
    _, model, folder, _ = family
    tokens, mask = hf_parity.batch()
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(tokens),
            attention_mask=torch.tensor(mask),
            output_router_logits=True,
        )
    cfg, params = hf.load_hf(folder)
    _, state = GPT(cfg).apply(
        {"params": params}, tokens, segment_ids=mask, mutable=["intermediates"]
    )
    aux, z = router_losses(cfg, state["intermediates"])
    np.testing.assert_allclose(float(aux), float(out.aux_loss), rtol=1e-5)
    # The z-loss: mean over real (layer, token) pairs of logsumexp(router logits)².
    lse = [torch.logsumexp(r.float(), -1) for r in out.router_logits]
    real = torch.tensor(mask).reshape(-1).bool()
    want = torch.cat([x[real] for x in lse]).square().mean()
    np.testing.assert_allclose(float(z), float(want), rtol=1e-5)
    # Padding tokens route nowhere and count nowhere: change them, nothing changes.
    other = np.where(mask.astype(bool), tokens, (tokens + 7) % VOCAB)
    _, state2 = GPT(cfg).apply(
        {"params": params}, other, segment_ids=mask, mutable=["intermediates"]
    )
    assert float(router_losses(cfg, state2["intermediates"])[0]) == float(aux)


def test_export_is_bitwise_and_reloads_in_transformers(family, tmp_path):
    _, model, folder, ref = family
    cfg, params = hf.load_hf(folder)
    original = {k: v.numpy() for k, v in model.state_dict().items()}
    exported = dict(hf.params_to_hf(cfg, params))
    # transformers holds the experts fused in memory and saves them one tensor per expert:
    # ours are the saved names, equal to the fused tensors' rows.
    saved = dict(_safetensors(folder))
    assert exported.keys() == saved.keys()
    for name, tensor in exported.items():
        np.testing.assert_array_equal(tensor, saved[name], err_msg=name)
    prefix = "model.layers.1.mlp.experts."
    gate_up = original[prefix + "gate_up_proj"]
    f = cfg.d_expert
    moe = cfg.names.moe
    gate, up = cfg.names.expert_in
    np.testing.assert_array_equal(
        exported[f"model.layers.1.{moe}.experts.2.{gate}.weight"], gate_up[2, :f]
    )
    np.testing.assert_array_equal(
        exported[f"model.layers.1.{moe}.experts.2.{up}.weight"], gate_up[2, f:]
    )
    hf.save_hf(cfg, params, str(tmp_path))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert type(reloaded) is type(model)
    tokens, mask = hf_parity.batch()
    real = mask.astype(bool)
    np.testing.assert_allclose(
        hf_parity.torch_logits(reloaded, tokens, mask)[real], ref[real], atol=1e-5
    )


def test_transformers_fused_layout_imports(family, tmp_path):
    """A folder saved with save_original_format=False (transformers 5's fused
    gate_up_proj / down_proj) gives the same params as the per-expert one."""
    _, model, folder, _ = family
    model.save_pretrained(str(tmp_path), save_original_format=False)
    assert any(k.endswith("experts.gate_up_proj") for k, _ in _safetensors(str(tmp_path)))
    cfg, fused = hf.load_hf(str(tmp_path))
    _, per_expert = hf.load_hf(folder)
    jax.tree.map(np.testing.assert_array_equal, fused, per_expert)


def _safetensors(folder):
    import os

    from safetensors.numpy import load_file

    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            yield from load_file(os.path.join(folder, f)).items()


def test_fine_tuned_export_gives_the_runs_logits(family, tmp_path):
    _, _, folder, ref = family
    cfg, params = hf.load_hf(folder)
    tuned, losses = hf_parity.fine_tune(cfg, params)
    assert losses[-1] < losses[0]
    hf.save_hf(cfg, tuned, str(tmp_path))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    tokens, mask = hf_parity.batch()
    real = mask.astype(bool)
    ours = hf_parity.our_logits(cfg, tuned, tokens, mask)
    assert np.abs(ours[real] - ref[real]).max() > 1e-2
    np.testing.assert_allclose(
        hf_parity.torch_logits(reloaded, tokens, mask)[real], ours[real], atol=1e-4
    )


def _hf_names_of_torch_grads(model, cfg) -> dict:
    """transformers' gradients under the saved (per-expert) names that `params_to_hf` uses."""
    names = cfg.names
    out = {}
    for name, p in model.named_parameters():
        g = p.grad.numpy()
        if ".mlp.experts." in name:
            layer, what = name.split(".mlp.experts.")
            base = f"{layer}.{names.moe}.{names.experts}"
            f = cfg.d_expert
            for e in range(g.shape[0]):
                if what == "gate_up_proj":
                    out[f"{base}.{e}.{names.expert_in[0]}.weight"] = g[e, :f]
                    out[f"{base}.{e}.{names.expert_in[1]}.weight"] = g[e, f:]
                else:
                    out[f"{base}.{e}.{names.expert_out}.weight"] = g[e]
        else:
            out[name.replace(".mlp.gate.", f".{names.moe}.{names.router}.")] = g
    return out


def test_train_step_gradient_is_transformers_loss_with_its_aux_loss(family):
    """One SGD step (learning rate 1) of `steps.train_step` moves every parameter by the
    gradient of transformers' training loss: the token-mean cross-entropy plus
    router_aux_loss_coef × its load-balancing loss (output_router_logits=True)."""
    import dataclasses

    name, model, folder, _ = family
    cfg, params = hf.load_hf(folder)
    cfg = dataclasses.replace(cfg, router_aux_loss_coef=0.3)  # large enough to matter
    tokens, mask = hf_parity.batch()
    labels = np.where(mask.astype(bool), tokens, -100)
    model.zero_grad()
    coef, model.router_aux_loss_coef = model.router_aux_loss_coef, 0.3  # read by forward
    try:
        out = model(
            input_ids=torch.tensor(tokens),
            attention_mask=torch.tensor(mask),
            labels=torch.tensor(labels),
            output_router_logits=True,
        )
        out.loss.backward()
    finally:
        model.router_aux_loss_coef = coef
    want = _hf_names_of_torch_grads(model, cfg)

    grads, metrics = hf_parity.sgd_step(cfg, params, hf_parity.shifted_batch(tokens, mask))
    np.testing.assert_allclose(
        float(metrics["loss"]) + 0.3 * float(metrics["router_aux_loss"]), out.loss.item(), rtol=1e-5
    )
    np.testing.assert_allclose(float(metrics["router_aux_loss"]), out.aux_loss.item(), rtol=1e-5)
    got = dict(hf.params_to_hf(cfg, grads))
    if cfg.tie_embeddings:
        want.pop("lm_head.weight", None)  # tied: named_parameters lists it once
    assert got.keys() == want.keys()
    for k, g in got.items():
        np.testing.assert_allclose(g, want[k], atol=2e-6, rtol=1e-4, err_msg=k)
    # The router's gradient has an aux-loss part: without it, it differs.
    no_aux = dataclasses.replace(cfg, router_aux_loss_coef=0.0)
    grads0, _ = hf_parity.sgd_step(no_aux, params, hf_parity.shifted_batch(tokens, mask))
    router = lambda g: g[cfg.names.layers][cfg.names.moe][cfg.names.router]["kernel"]
    assert np.abs(router(grads) - router(grads0)).max() > 1e-4


def test_router_losses_are_the_mean_over_micro_batches(family):
    """With gradient accumulation each micro-batch's router losses are its own (as each
    device batch's are in transformers' Trainer), averaged: the metric equals the mean of
    the two halves' losses computed alone."""
    import functools

    import jax.numpy as jnp
    import optax

    from sft_jax import steps

    _, _, folder, _ = family
    cfg, params = hf.load_hf(folder)
    batch = hf_parity.train_batch(*hf_parity.batch())
    tx = optax.sgd(0.0)
    state = steps.state_from_params(jax.tree.map(jnp.asarray, params), jax.random.key(0), tx)
    step = functools.partial(
        steps.train_step, model=GPT(cfg), tx=tx, schedule=lambda s: 0.0, micro_steps=2
    )
    _, metrics = jax.jit(step)(state, batch)
    halves = []
    for row in (0, 1):  # micro-batch j holds rows j, j + 2, …
        _, st = GPT(cfg).apply(
            {"params": params},
            batch["tokens"][row : row + 1],
            segment_ids=batch["segment_ids"][row : row + 1],
            mutable=["intermediates"],
        )
        halves.append(float(router_losses(cfg, st["intermediates"])[0]))
    np.testing.assert_allclose(float(metrics["router_aux_loss"]), np.mean(halves), rtol=1e-5)
