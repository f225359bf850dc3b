"""What a user does with a mixture of experts, end to end: `python -m sft_jax.main` with
`model.init_from` a Qwen3-MoE folder (written by transformers) and `mesh.expert=2` on the 8
faked devices, a few steps, then the run's Hugging Face export loaded by transformers gives
the run's own logits, and the router losses are in metrics.jsonl beside the LM loss."""

import json

import numpy as np
import pytest
import torch
import transformers

from sft_jax import hf
from tests import hf_parity
from tests.test_train import _main

pytestmark = pytest.mark.slow


def _qwen3_moe():
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(
        vocab_size=50304,  # the GPT-2 tokenizer's 50257 ids fit
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=48,
        norm_topk_prob=True,
        router_aux_loss_coef=0.01,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return transformers.Qwen3MoeForCausalLM(config).eval()


def test_main_trains_a_qwen3_moe_folder_with_expert_parallelism_and_exports_it(tmp_path):
    model = _qwen3_moe()
    source = tmp_path / "source"
    model.save_pretrained(source)
    workdir = tmp_path / "run"
    done = _main(
        workdir,
        f"--config.model.init_from=hf:{source}",
        "--config.model.tokenizer=gpt2",
        "--config.mesh.expert=2",
        "--config.mesh.fsdp=-1",
        "--config.train.steps=4",
        "--config.train.log_every=2",
        "--config.train.eval_every=0",
        "--config.checkpoint.save_every=4",
        "--config.export.hf_dir=hf",
        "--config.optim.learning_rate=1e-2",
        "--config.optim.warmup_steps=1",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "'expert': 2" in done.stderr  # the mesh it logged
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    trained = [r for r in records if "router_aux_loss" in r]
    assert trained and all(r["router_aux_loss"] > 0 and np.isfinite(r["loss"]) for r in trained)

    exported = transformers.AutoModelForCausalLM.from_pretrained(workdir / "hf").eval()
    assert type(exported) is transformers.Qwen3MoeForCausalLM
    tokens = np.random.default_rng(0).integers(0, 50257, (2, 12))
    mask = np.ones_like(tokens)
    cfg, params = hf.load_hf(str(workdir / "hf"))
    ours = hf_parity.our_logits(cfg, params, tokens, mask)
    np.testing.assert_allclose(hf_parity.torch_logits(exported, tokens, mask), ours, atol=1e-4)
    assert np.abs(ours - hf_parity.torch_logits(model, tokens, mask)).max() > 1e-3  # it trained


def test_lora_on_experts_trains_with_expert_parallelism_and_exports_for_peft(tmp_path):
    """all-linear LoRA on a Qwen3-MoE (attention, router, and the experts' stacked weights
    as PEFT's target_parameters) under mesh.expert=2: PEFT loads the run's adapter folder
    over the source model and gives the logits of the run's merged export."""
    import peft

    model = _qwen3_moe()
    source = tmp_path / "source"
    model.save_pretrained(source)
    workdir = tmp_path / "run"
    done = _main(
        workdir,
        f"--config.model.init_from=hf:{source}",
        "--config.model.tokenizer=gpt2",
        "--config.mesh.expert=2",
        "--config.lora.rank=4",
        "--config.lora.targets=all-linear",
        "--config.train.steps=3",
        "--config.train.eval_every=0",
        "--config.checkpoint.save_every=3",
        "--config.export.hf_dir=hf",
        "--config.export.adapter_dir=adapter",
        "--config.optim.learning_rate=1e-2",
        "--config.optim.warmup_steps=1",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    written = json.loads((workdir / "adapter" / "adapter_config.json").read_text())
    assert written["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    tokens = np.random.default_rng(1).integers(0, 50257, (2, 12))
    mask = np.ones_like(tokens)
    before = hf_parity.torch_logits(model, tokens, mask)  # PEFT wraps the model in place below
    adapted = peft.PeftModel.from_pretrained(model, str(workdir / "adapter")).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(workdir / "hf").eval()
    want = hf_parity.torch_logits(merged, tokens, mask)
    np.testing.assert_allclose(hf_parity.torch_logits(adapted, tokens, mask), want, atol=1e-4)
    assert np.abs(want - before).max() > 1e-4  # the adapters changed the model
