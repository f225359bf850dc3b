"""The GPT: packed rows equal separate examples, padding isolated, numerics options agree."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax import model as model_lib
from sft_jax.attention import attention_mask
from sft_jax.model import GPT, PRESETS, GPTConfig

VOCAB = 512


def _init(cfg, seq=16):
    model = GPT(cfg)
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, seq), jnp.int32))["params"])
    return model, params


def _tokens(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, shape), jnp.int32)


FAMILIES = [
    pytest.param(dict(preset="tiny"), id="gpt2"),
    pytest.param(dict(preset="tiny-llama"), id="llama-gqa"),
    pytest.param(dict(preset="tiny-llama", qkv_bias=True, tie_embeddings=True), id="qwen2-like"),
    pytest.param(dict(preset="tiny", scan_layers=False), id="gpt2-unscanned"),
]


@pytest.mark.parametrize("kw", FAMILIES)
def test_packed_row_equals_each_example_alone(kw):
    kw = dict(kw)
    cfg = GPTConfig.preset(kw.pop("preset"), vocab_size=VOCAB, **kw)
    model, params = _init(cfg)
    a, b = _tokens((1, 11), 1), _tokens((1, 7), 2)
    alone_a = model.apply({"params": params}, a)
    alone_b = model.apply({"params": params}, b)
    # Row: a, then b, then 6 padding positions holding arbitrary tokens.
    row = jnp.concatenate([a, b, _tokens((1, 6), 3)], axis=1)
    segments = jnp.asarray([[1] * 11 + [2] * 7 + [0] * 6])
    positions = jnp.asarray([list(range(11)) + list(range(7)) + [0] * 6])
    packed = model.apply({"params": params}, row, positions=positions, segment_ids=segments)
    assert packed.dtype == jnp.float32
    np.testing.assert_allclose(packed[:, :11], alone_a, atol=2e-5)
    np.testing.assert_allclose(packed[:, 11:18], alone_b, atol=2e-5)
    assert np.isfinite(np.asarray(packed)).all()  # padding queries see nothing, yet no NaN


def test_long_packed_row_equals_each_example_alone():
    # 256 positions: the blocked attention path, an example straddling a block boundary.
    cfg = GPTConfig.preset("tiny-llama", vocab_size=VOCAB)
    model, params = _init(cfg)
    a, b = _tokens((1, 150), 1), _tokens((1, 90), 2)
    row = jnp.concatenate([a, b, _tokens((1, 16), 3)], axis=1)
    segments = jnp.asarray([[1] * 150 + [2] * 90 + [0] * 16])
    positions = jnp.asarray([list(range(150)) + list(range(90)) + [0] * 16])
    packed = model.apply({"params": params}, row, positions=positions, segment_ids=segments)
    np.testing.assert_allclose(packed[:, :150], model.apply({"params": params}, a), atol=2e-5)
    np.testing.assert_allclose(packed[:, 150:240], model.apply({"params": params}, b), atol=2e-5)


def test_attention_mask_contract():
    seg = jnp.asarray([[1, 1, 2, 2, 0]])
    m = np.asarray(attention_mask(seg))[0, 0]
    expected = np.array(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 0]], bool
    )
    np.testing.assert_array_equal(m, expected)


def test_scan_and_unrolled_layers_compute_the_same_function():
    cfg = GPTConfig.preset("tiny-llama", vocab_size=VOCAB)
    model, params = _init(cfg)
    unrolled = GPT(GPTConfig.preset("tiny-llama", vocab_size=VOCAB, scan_layers=False))
    layers = {f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], params["layers"]) for i in range(2)}
    params_u = {k: v for k, v in params.items() if k != "layers"} | layers
    x = _tokens((2, 12))
    np.testing.assert_allclose(
        model.apply({"params": params}, x), unrolled.apply({"params": params_u}, x), atol=1e-5
    )


def test_grouped_query_attention_equals_repeated_kv_heads():
    """GQA with 2 KV heads = full multi-head attention whose K/V heads are repeated."""
    gqa_cfg = GPTConfig.preset("tiny-llama", vocab_size=VOCAB)
    mha_cfg = GPTConfig.preset("tiny-llama", vocab_size=VOCAB, n_kv_heads=4)
    gqa, p = _init(gqa_cfg)
    mha = GPT(mha_cfg)
    p_mha = jax.tree.map(lambda x: x, p)
    for name in ("k_proj", "v_proj"):
        k = p["layers"]["self_attn"][name]["kernel"]  # [layers, embed, kv_heads, head_dim]
        p_mha["layers"]["self_attn"][name]["kernel"] = jnp.repeat(k, 2, axis=2)
    x = _tokens((2, 10))
    np.testing.assert_allclose(
        gqa.apply({"params": p}, x), mha.apply({"params": p_mha}, x), atol=1e-5
    )


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_changes_memory_not_gradients(remat):
    base = GPTConfig.preset("tiny", vocab_size=VOCAB)
    model, params = _init(base)
    remat_model = GPT(GPTConfig.preset("tiny", vocab_size=VOCAB, remat=remat))
    x = _tokens((2, 12))

    def loss(m):
        return lambda p: jnp.mean(m.apply({"params": p}, x) ** 2)

    g0 = jax.grad(loss(model))(params)
    g1 = jax.grad(loss(remat_model))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g0, g1)


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_mlp_activation_is_recomputed_not_kept(monkeypatch, grad_scratch_bytes, preset):
    # The down projection recomputes GELU / SwiGLU in the backward pass: the same gradients
    # as keeping the activation's output, and the compiled gradient of a scanned 4-layer
    # model keeps about one [layers, tokens, d_ff] float32 stack less.
    x = _tokens((2, 256), seed=1)
    fields = dict(vocab_size=VOCAB, n_layers=4, d_ff=1024)
    model, params = _init(GPTConfig.preset(preset, **fields))
    grad = lambda: jax.jit(jax.grad(lambda p: jnp.mean(model.apply({"params": p}, x) ** 2)))
    ours, ours_bytes = grad()(params), grad_scratch_bytes(preset, x, **fields)
    monkeypatch.setattr(model_lib.layers, "recompute_input", lambda project: project)
    same = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    jax.tree.map(same, ours, grad()(params))
    stack = fields["n_layers"] * x.size * fields["d_ff"] * 4
    assert ours_bytes < grad_scratch_bytes(preset, x, **fields) - 0.75 * stack


def test_bfloat16_compute_keeps_float32_params_and_logits():
    cfg = GPTConfig.preset("tiny", vocab_size=VOCAB, dtype="bfloat16")
    model, params = _init(cfg)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    x = _tokens((1, 8))
    logits = model.apply({"params": params}, x)
    ref = GPT(GPTConfig.preset("tiny", vocab_size=VOCAB)).apply({"params": params}, x)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, ref, atol=0.1)  # bf16 rounding, same function


def test_every_parameter_has_logical_axes():
    for name in ("tiny", "tiny-llama"):
        boxed = jax.eval_shape(
            GPT(GPTConfig.preset(name)).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32)
        )["params"]
        leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
        assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
        assert all(len(x.names) == x.value.ndim for x in leaves)


@pytest.mark.parametrize(
    "name,expected_millions",
    [
        ("gpt2", 124.4),
        ("gpt2-medium", 354.8),
        ("gpt2-large", 774.0),
        ("gpt2-xl", 1557.6),
        ("smollm2-135m", 134.5),
        # The model cards' counts: Qwen3 0.6B (0.44B without embeddings) and 8.2B; Mistral
        # 7B v0.3 7,248,023,552; Llama 3.1 8,030,261,248 and 70,553,706,496; Gemma 2 2B
        # 2,614,341,888; Gemma 3 1B 999,885,952; Gemma 3 4B 4.3B with its 0.42B vision tower.
        ("qwen3-0.6b", 596.0),
        ("qwen3-8b", 8190.7),
        ("mistral-7b", 7248.0),
        ("llama3.1-8b", 8030.3),
        ("llama3.1-70b", 70553.7),
        ("gemma2-2b", 2614.3),
        ("gemma3-1b", 999.9),
        ("gemma3-4b", 3880.3),
        # Mixtures of experts: Qwen3-30B-A3B "30.5B, 3.3B activated" (model card),
        # Mixtral 8x7B 46,702,792,704 (transformers' count of the published checkpoint).
        ("qwen3-30b-a3b", 30532.1),
        ("mixtral-8x7b", 46702.8),
        # gpt-oss's model card: 20.91B and 116.83B.
        ("gpt-oss-20b", 20914.8),
        ("gpt-oss-120b", 116829.2),
    ],
)
def test_real_size_presets_have_the_published_parameter_counts(name, expected_millions):
    cfg = PRESETS[name]
    boxed = jax.eval_shape(GPT(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    count = sum(x.size for x in jax.tree.leaves(nn.meta.unbox(boxed)))
    assert count == cfg.num_params()
    assert abs(count / 1e6 - expected_millions) < 0.1, count


@pytest.mark.parametrize(
    "name,active_billions,counts_lookup",
    [
        ("qwen3-30b-a3b", 3.3, True),
        ("mixtral-8x7b", 12.9, True),
        # OpenAI's active counts (3.61B, 5.13B) leave out the embedding lookup.
        ("gpt-oss-20b", 3.61, False),
        ("gpt-oss-120b", 5.13, False),
    ],
)
def test_mixtures_of_experts_count_their_active_parameters(name, active_billions, counts_lookup):
    cfg = PRESETS[name]
    active = cfg.num_params(active=True) - (0 if counts_lookup else cfg.vocab_size * cfg.d_model)
    assert abs(active / 1e9 - active_billions) < 0.06


def test_sliding_window_saves_the_attention_flops_it_skips():
    """Gemma 2 2B at 8192 tokens: its 13 local layers' queries see 3072 keys on average
    (the first 4096 see 1 … 4096, the rest 4096 each), the 13 global ones 4096 (the causal
    half); everything else is the same."""
    gemma = GPTConfig.preset("gemma2-2b")
    no_window = dataclasses.replace(gemma, sliding_window=0, global_every=0)
    q_dim = gemma.n_heads * gemma.dim_per_head
    saved = no_window.flops_per_token(8192) - gemma.flops_per_token(8192)
    assert saved == 12 * 13 * (4096 - 3072) * q_dim
    assert gemma.flops_per_token(4096) == no_window.flops_per_token(4096)  # window ≥ row


def test_bad_config_messages_name_the_field():
    with pytest.raises(ValueError, match="n_kv_heads"):
        GPTConfig.preset("tiny-llama", n_kv_heads=3)
    with pytest.raises(ValueError, match="model.preset"):
        GPTConfig.preset("gpt5")
    with pytest.raises(ValueError, match="invalid family='falcon'"):
        GPTConfig.preset("tiny-llama", family="falcon")
    with pytest.raises(ValueError, match="qk_norm=False does not fit the qwen3 family"):
        GPTConfig.preset("tiny-llama", family="qwen3")
    with pytest.raises(ValueError, match="sandwich_norms=True does not fit the llama family"):
        GPTConfig.preset("tiny-llama", sandwich_norms=True)
    with pytest.raises(ValueError, match="global_every=2 needs a sliding_window"):
        GPTConfig.preset("tiny-llama", global_every=2)
    with pytest.raises(ValueError, match="need positions='rope'"):
        GPTConfig.preset("tiny", rope_local_theta=100.0)
    with pytest.raises(ValueError, match="invalid remat='attention'"):
        GPTConfig.preset("tiny", remat="attention")
    with pytest.raises(ValueError, match="gpt2 family has no grouped-query attention"):
        GPTConfig.preset("tiny", n_kv_heads=2)


def test_family_names_the_parameters():
    # The family, not the architecture fields, decides the names: the same shapes under
    # GPT-2's and Llama's names.
    gpt2 = GPTConfig.preset("tiny", vocab_size=VOCAB)
    assert gpt2.family == "gpt2" and GPTConfig.preset("tiny-llama").family == "llama"
    shapes = lambda cfg: jax.eval_shape(
        GPT(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32)
    )["params"]
    assert set(shapes(gpt2)) == {"wte", "wpe", "h", "ln_f"}
    assert set(shapes(gpt2)["h"]) == {"ln_1", "attn", "ln_2", "mlp"}
    llama = GPTConfig.preset("tiny-llama", vocab_size=VOCAB)
    assert set(shapes(llama)) == {"embed_tokens", "layers", "norm", "lm_head"}
    assert set(shapes(llama)["layers"]["mlp"]) == {"gate_proj", "up_proj", "down_proj"}


def test_hidden_states_are_what_the_head_turns_into_logits():
    cfg = GPTConfig.preset("tiny-llama", vocab_size=VOCAB)
    model, params = _init(cfg)
    x = _tokens((2, 12))
    hidden = model.apply({"params": params}, x, method="hidden_states")
    assert hidden.shape == (2, 12, cfg.d_model)
    logits = hidden @ model_lib.head_weight(cfg, params).T
    np.testing.assert_allclose(logits, model.apply({"params": params}, x), atol=1e-5)
