"""gpt-oss against transformers itself: a tiny random GptOssForCausalLM (attention sinks,
q/k/v/o biases, sliding and full layers alternating with a window shorter than the rows,
YaRN, 5 experts fused, biased and clamped, top-2 of the router's biased logits, untied
head, a padded batch): logits, packed rows, the load-balancing loss, the gradient of
transformers' training loss, export both ways, greedy generation; and the MXFP4 experts of
the published checkpoints, imported as transformers dequantizes them."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import transformers

from sft_jax import hf
from sft_jax.generate import Generator, Sampling
from sft_jax.hf.experts import dequantize_mxfp4
from sft_jax.model import GPT
from sft_jax.model.moe import router_losses
from tests import hf_parity
from tests.hf_parity import VOCAB

WINDOW = 5


def _config(**kw):
    return transformers.GptOssConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=5,
        num_experts_per_tok=2,
        sliding_window=WINDOW,
        max_position_embeddings=128,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "beta_fast": 8.0,
            "beta_slow": 1.0,
            "original_max_position_embeddings": 16,
            "truncate": False,
        },
        swiglu_limit=1.5,  # low enough that the clamps bite on this model's activations
        router_aux_loss_coef=0.3,
        attn_implementation="eager",
        **kw,
    )


@pytest.fixture(scope="module")
def oss(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(_config())
    with torch.no_grad():  # sinks, biases and norms start at constants: perturb everything
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.eval()
    folder = str(tmp_path_factory.mktemp("gpt_oss"))
    model.save_pretrained(folder)
    tokens, mask = hf_parity.batch()
    return model, folder, hf_parity.torch_logits(model, tokens, mask)


def test_config_reads_every_gpt_oss_part(oss):
    model, folder, _ = oss
    cfg = hf.load_config(folder)
    assert cfg.family == "gpt_oss" and cfg.attention_sinks and cfg.router_bias
    assert cfg.qkv_bias and cfg.attn_out_bias and cfg.expert_mlp == "gpt_oss"
    assert cfg.local_layers == (True, False) and cfg.sliding_window == WINDOW
    assert cfg.rope_yarn[0] == 4.0 and cfg.router == "topk_softmax"
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "unrolled"])
def test_imported_logits_equal_transformers(oss, scan_layers):
    _, folder, ref = oss
    cfg, params = hf.load_hf(folder, scan_layers=scan_layers)
    tokens, mask = hf_parity.batch()
    real = mask.astype(bool)
    assert np.abs(hf_parity.our_logits(cfg, params, tokens, mask)[real] - ref[real]).max() <= 1e-4


def test_packed_rows_equal_each_example_alone(oss):
    _, folder, ref = oss
    cfg, params = hf.load_hf(folder)
    assert hf_parity.packed_rows_error(cfg, params, ref) <= 1e-4


def test_export_is_bitwise_and_reloads_in_transformers(oss, tmp_path):
    model, folder, ref = oss
    cfg, params = hf.load_hf(folder)
    original = {k: v.numpy() for k, v in model.state_dict().items()}
    exported = dict(hf.params_to_hf(cfg, params))
    assert exported.keys() == original.keys()
    for name, tensor in exported.items():
        np.testing.assert_array_equal(tensor, original[name], err_msg=name)
    hf.save_hf(cfg, params, str(tmp_path))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert type(reloaded) is transformers.GptOssForCausalLM
    tokens, mask = hf_parity.batch()
    real = mask.astype(bool)
    np.testing.assert_allclose(
        hf_parity.torch_logits(reloaded, tokens, mask)[real], ref[real], atol=1e-5
    )


def test_train_step_gradient_is_transformers_loss_with_its_aux_loss(oss):
    """One SGD step (learning rate 1) moves every parameter, the sinks and all biases
    included, by the gradient of transformers' training loss (cross-entropy + 0.3 × the
    load-balancing loss)."""
    model, folder, _ = oss
    cfg, params = hf.load_hf(folder)
    tokens, mask = hf_parity.batch()
    model.zero_grad()
    out = model(
        input_ids=torch.tensor(tokens),
        attention_mask=torch.tensor(mask),
        labels=torch.tensor(np.where(mask.astype(bool), tokens, -100)),
        output_router_logits=True,
    )
    out.loss.backward()
    want = {name: p.grad.numpy() for name, p in model.named_parameters()}
    grads, metrics = hf_parity.sgd_step(cfg, params, hf_parity.shifted_batch(tokens, mask))
    np.testing.assert_allclose(float(metrics["router_aux_loss"]), out.aux_loss.item(), rtol=1e-5)
    got = dict(hf.params_to_hf(cfg, grads))
    assert got.keys() == want.keys()
    for name, g in got.items():
        np.testing.assert_allclose(g, want[name], atol=2e-6, rtol=1e-4, err_msg=name)
    assert np.abs(got["model.layers.0.self_attn.sinks"]).max() > 1e-4  # the sinks learn


def test_load_balancing_loss_equals_transformers(oss):
    model, folder, _ = oss
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
    np.testing.assert_allclose(
        float(router_losses(cfg, state["intermediates"])[0]), out.aux_loss.item(), rtol=1e-5
    )


def test_greedy_generation_equals_transformers(oss):
    model, folder, _ = oss
    prompts = [[3, 17, 42, 5, 99, 23, 64], [9, 120, 33]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        want = model.generate(
            input_ids=ids,
            attention_mask=attn,
            max_new_tokens=20,
            min_new_tokens=20,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )[:, width:].tolist()
    cfg, params = hf.load_hf(folder)
    assert Generator(cfg, params).generate(prompts, Sampling(max_new_tokens=20)) == want


def test_mxfp4_experts_import_as_transformers_dequantizes_them(tmp_path):
    """A checkpoint whose experts are MXFP4 blocks and scales, as gpt-oss is published:
    our weights equal those transformers' `Mxfp4Config(dequantize=True)` loads, and so do
    the logits."""
    from safetensors.torch import save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    torch.manual_seed(1)
    config = _config()
    model = transformers.GptOssForCausalLM(config)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    e, d, f = 5, 64, 32
    packed = {}
    for layer in range(2):
        prefix = f"model.layers.{layer}.mlp.experts."
        for name, (rows, ins) in {"gate_up_proj": (2 * f, d), "down_proj": (d, f)}.items():
            state.pop(prefix + name)
            blocks = torch.randint(0, 256, (e, rows, ins // 32, 16), dtype=torch.uint8)
            scales = torch.randint(122, 130, (e, rows, ins // 32), dtype=torch.uint8)
            packed[prefix + name] = (blocks, scales)
            state[prefix + name + "_blocks"], state[prefix + name + "_scales"] = blocks, scales
    config.save_pretrained(tmp_path)
    config_json = json.loads((tmp_path / "config.json").read_text())
    config_json["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    (tmp_path / "config.json").write_text(json.dumps(config_json))
    save_file(state, os.path.join(tmp_path, "model.safetensors"), metadata={"format": "pt"})

    cfg, params = hf.load_hf(str(tmp_path))
    experts = params["layers"]["mlp"]["experts"]
    for name, (blocks, scales) in packed.items():
        layer = int(name.split(".")[2])
        want = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).numpy()
        ours = np.asarray(experts[name.rsplit(".", 1)[1]][layer])
        np.testing.assert_array_equal(ours, want, err_msg=name)
        np.testing.assert_array_equal(
            ours, dequantize_mxfp4(blocks.numpy(), scales.numpy()).transpose(0, 2, 1)
        )
    reference = transformers.GptOssForCausalLM.from_pretrained(
        str(tmp_path),
        dtype=torch.float32,
        quantization_config=transformers.Mxfp4Config(dequantize=True),
    ).eval()
    tokens, mask = hf_parity.batch()
    real = mask.astype(bool)
    ref = hf_parity.torch_logits(reference, tokens, mask)
    cfg = dataclasses.replace(cfg, param_dtype="float32")
    assert np.abs(hf_parity.our_logits(cfg, params, tokens, mask)[real] - ref[real]).max() <= 1e-4
