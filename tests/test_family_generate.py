"""Greedy generation with the KV cache (sft_jax.generate.Generator) against transformers'
`generate(do_sample=False)`, token for token, far past the sliding window: tiny random
Mistral (every layer local), Gemma 2 (local and global layers, attention and final soft
caps), Gemma 3 (local and global layers with their own RoPE bases), Mixtral and Qwen3-MoE
(experts, decoded token by token) models, saved by
transformers and imported with `hf.load_hf`. A batch of prompts of different lengths, so
the generator's left padding meets the window too.

What the test pins: the decode step's window counts cache slots, which is position distance
within a left-padded row; the prefill's window; soft caps in the cached path."""

import pytest
import torch
import transformers

from sft_jax import hf
from sft_jax.generate import Generator, Sampling

VOCAB = 128
WINDOW = 8
NEW = 40  # new tokens: five windows past the longest prompt
PROMPTS = [[3, 17, 42, 5, 99, 23, 64, 11, 7, 88, 15], [9, 120, 33], [1, 2, 3, 4, 5, 6]]
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=12,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    sliding_window=WINDOW,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=None,
    eos_token_id=None,
)


def _mistral():
    return transformers.MistralForCausalLM(
        transformers.MistralConfig(**COMMON, num_hidden_layers=2)
    )


def _gemma2():
    config = transformers.Gemma2Config(
        **COMMON,
        num_hidden_layers=2,
        query_pre_attn_scalar=16,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0,
        attn_implementation="eager",
    )
    return transformers.Gemma2ForCausalLM(config)


def _gemma3():
    config = transformers.Gemma3TextConfig(
        **COMMON,
        num_hidden_layers=3,
        query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
        },
        attn_implementation="eager",
    )
    return transformers.Gemma3ForCausalLM(config)


def _mixtral():
    config = transformers.MixtralConfig(
        **COMMON, num_hidden_layers=2, num_local_experts=5, num_experts_per_tok=2
    )
    return transformers.MixtralForCausalLM(config)


def _qwen3_moe():  # no window: the experts' decode path alone
    config = transformers.Qwen3MoeConfig(
        **COMMON,
        num_hidden_layers=2,
        num_experts=6,
        num_experts_per_tok=3,
        moe_intermediate_size=20,
        norm_topk_prob=True,
    )
    return transformers.Qwen3MoeForCausalLM(config)


def _transformers_greedy(model) -> list[list[int]]:
    """transformers' greedy continuation of PROMPTS, batched with left padding."""
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=NEW,
            min_new_tokens=NEW,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
    return out[:, width:].tolist()


@pytest.mark.parametrize(
    "build",
    [_mistral, _gemma2, _gemma3, _mixtral, _qwen3_moe],
    ids=["mistral", "gemma2", "gemma3", "mixtral", "qwen3_moe"],
)
def test_greedy_generation_equals_transformers_past_the_window(build, tmp_path):
    torch.manual_seed(0)
    model = build()
    # Random init leaves norms at 1 (Gemma's 1 + w at 0) and logits nearly flat: perturb
    # every tensor. (Untied heads: a tied tiny model mostly repeats its last token.)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.eval()
    model.generation_config.eos_token_id = None
    model.save_pretrained(tmp_path)
    cfg, params = hf.load_hf(str(tmp_path))
    if build is not _qwen3_moe:
        assert cfg.sliding_window == WINDOW and any(cfg.local_layers)
    ours = Generator(cfg, params).generate(PROMPTS, Sampling(max_new_tokens=NEW))
    assert ours == _transformers_greedy(model)
    # The continuation is not a loop shorter than the window, which would hide a window bug.
    assert build is _qwen3_moe or all(len(set(row[-2 * WINDOW :])) > WINDOW // 2 for row in ours)
