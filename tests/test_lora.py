"""sft_jax.lora: the spec and its errors, targets per family, init, merge, and PEFT adapter
folders, against PEFT itself on tiny random transformers models."""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sft_jax import hf, lora, peft_adapter
from sft_jax.matmul import dense_matmul
from sft_jax.model import GPT, GPTConfig

TINY = GPTConfig.preset("tiny", vocab_size=256, max_seq_len=64)
TINY_LLAMA = GPTConfig.preset("tiny-llama", vocab_size=256, max_seq_len=64)


# --------------------------------------------------------------------------- spec


@pytest.mark.parametrize(
    "fields, key",
    [
        (dict(rank=-1), "lora.rank"),
        (dict(rank=0, alpha=32.0), "lora.alpha"),
        (dict(rank=8, alpha=0.0), "lora.alpha"),
        (dict(rank=8, dropout=1.0), "lora.dropout"),
        (dict(rank=8, init="pissa"), "lora.init"),
        (dict(rank=8, targets=()), "lora.targets"),
    ],
)
def test_bad_spec_names_the_key(fields, key):
    with pytest.raises(ValueError, match=key):
        lora.LoraSpec(**fields)


def test_spec_from_config_block_and_scale():
    block = ml_collections.ConfigDict(
        dict(rank=16, alpha=32, dropout=0.05, targets="q_proj, v_proj", use_rslora=False)
    )
    spec = lora.LoraSpec.from_config(block)
    assert spec == lora.LoraSpec(16, 32.0, 0.05, ("q_proj", "v_proj"), False, "kaiming")
    assert spec.scale == 2.0
    assert lora.LoraSpec(rank=16, alpha=32, use_rslora=True).scale == 8.0  # 32 / √16
    assert not lora.LoraSpec.from_config({}).enabled  # rank 0 by default: full fine-tuning


# --------------------------------------------------------------------------- targets


def test_targets_follow_peft_names():
    def names(cfg, *targets):
        spec = lora.LoraSpec(rank=4, targets=targets)
        return [m.name for m in lora.resolve_targets(cfg, spec)]

    # GPT-2: `c_proj` is both layers of that name, as in PEFT; qualified names pick one.
    assert names(TINY, "c_proj") == ["attn.c_proj", "mlp.c_proj"]
    assert names(TINY, "c_attn", "mlp.c_proj") == ["attn.c_attn", "mlp.c_proj"]
    assert names(TINY, "all-linear") == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert names(TINY_LLAMA, "v_proj", "q_proj") == ["self_attn.q_proj", "self_attn.v_proj"]
    assert len(names(TINY_LLAMA, "all-linear")) == 7
    # ... and the fewest names that select them, for adapter_config.json.
    chosen = lora.resolve_targets(TINY, lora.LoraSpec(rank=4, targets=("c_attn", "attn.c_proj")))
    assert lora.target_names(TINY, chosen) == ["c_attn", "attn.c_proj"]
    everything = lora.resolve_targets(TINY, lora.LoraSpec(rank=4))
    assert lora.target_names(TINY, everything) == ["c_attn", "c_proj", "c_fc"]


@pytest.mark.parametrize(
    "cfg, bad, valid",
    [
        (TINY, "q_proj", "c_attn, c_proj, c_fc, attn.c_proj, mlp.c_proj, all-linear"),
        (TINY_LLAMA, "c_attn", "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"),
    ],
)
def test_unknown_target_lists_the_family_names(cfg, bad, valid):
    with pytest.raises(ValueError, match="lora.targets") as e:
        lora.resolve_targets(cfg, lora.LoraSpec(rank=4, targets=(bad,)))
    assert f"'{bad}' is not a dense layer of the {cfg.family} family" in str(e.value)
    assert valid in str(e.value)


def test_adapters_keep_head_structure_and_axes():
    spec = lora.LoraSpec(rank=4, targets=("q_proj", "o_proj"))
    axes = lora.adapter_axes(TINY_LLAMA, spec)["layers"]["self_attn"]
    assert axes["q_proj"] == {
        "lora_a": ("layers", "embed", "lora_rank"),
        "lora_b": ("layers", "lora_rank", "heads", "head_dim"),
    }
    assert axes["o_proj"]["lora_a"] == ("layers", "heads", "head_dim", "lora_rank")
    adapters = lora.init_adapters(TINY_LLAMA, spec, jax.random.key(0))["layers"]["self_attn"]
    assert adapters["q_proj"]["lora_b"].shape == (2, 4, 4, 16)  # [layers, r, heads, head_dim]
    assert adapters["o_proj"]["lora_a"].shape == (2, 4, 16, 4)  # [layers, heads, head_dim, r]


# --------------------------------------------------------------------------- init, merge


def test_init_is_peft_kaiming_uniform_with_zero_b():
    """A ~ U(±1/√fan_in) as torch's kaiming_uniform_(a=√5) draws PEFT's lora_A; B = 0."""
    torch = pytest.importorskip("torch")
    spec = lora.LoraSpec(rank=8, targets=("c_fc", "attn.c_proj"))
    adapters = lora.init_adapters(TINY, spec, jax.random.key(0))["h"]
    for module, fan_in in (("mlp", 64), ("attn", 64)):  # c_fc: d_model; c_proj: heads·hd
        name = "c_fc" if module == "mlp" else "c_proj"
        a, b = (np.asarray(adapters[module][name][k]) for k in ("lora_a", "lora_b"))
        ref = torch.empty(8, fan_in)
        torch.nn.init.kaiming_uniform_(ref, a=math.sqrt(5))
        bound = 1 / math.sqrt(fan_in)
        assert float(ref.abs().max()) <= bound
        assert 0.9 * bound < np.abs(a).max() <= bound
        assert abs(a.std() - bound / math.sqrt(3)) < 0.1 * bound  # uniform's std
        assert not b.any()
        assert not np.array_equal(a[0], a[1])  # each layer drawn on its own


def test_step_zero_merge_is_the_base_model_bitwise():
    tokens = jnp.zeros((1, 4), jnp.int32)
    shapes = nn.meta.unbox(jax.eval_shape(GPT(TINY_LLAMA).init, jax.random.key(1), tokens))
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32), shapes["params"])
    spec = lora.LoraSpec(rank=4)
    adapters = lora.init_adapters(TINY_LLAMA, spec, jax.random.key(2))
    merged = jax.jit(lora.merge, static_argnums=2)(params, adapters, spec)
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(merged), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("in_dims", [1, 2])
def test_lora_output_is_the_merged_layer(in_dims):
    """x·W + scale·(x·A)·B (the forward the integration runs) = x·(W + scale·A·B)."""
    rng = np.random.default_rng(3)
    normal = lambda *shape: rng.standard_normal(shape, np.float32)
    in_shape, out_shape = ((64,), (4, 16)) if in_dims == 1 else ((4, 16), (64,))
    x = normal(2, 5, *in_shape)
    w, a, b = normal(*in_shape, *out_shape) / 10, normal(*in_shape, 3) / 10, normal(3, *out_shape)

    @jax.jit
    def both(x, w, a, b):
        adapted = dense_matmul(x, w, in_dims) + lora.lora_output(x, a, b, 2.5, in_dims)
        return adapted, dense_matmul(x, lora.merged_kernel(w, a, b, 2.5), in_dims)

    np.testing.assert_allclose(*both(x, w, a, b), atol=1e-5)
    stacked = lora.merged_kernel(jnp.stack([w, w]), jnp.stack([a, -a]), jnp.stack([b, b]), 2.5)
    np.testing.assert_allclose(stacked[1], lora.merged_kernel(w, -a, b, 2.5), atol=1e-6)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_adapted_forward_and_gradients_match_the_merged_model(scan_layers):
    """The adapted model (base + scale·(x·A)·B inside each targeted Dense, never merged)
    gives the merged model's logits, and the adapters' gradients are autodiff's of the
    merged formulation."""
    cfg = GPTConfig.preset("tiny-llama", vocab_size=256, max_seq_len=64, scan_layers=scan_layers)
    spec = lora.LoraSpec(rank=4, alpha=8, targets=("q_proj", "o_proj", "down_proj"))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 8)))
    shapes = nn.meta.unbox(jax.eval_shape(GPT(cfg).init, jax.random.key(0), tokens))["params"]
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32) / 8, shapes)
    adapters = jax.tree.map(
        lambda x: rng.standard_normal(x.shape, np.float32) / 8,
        lora.init_adapters(cfg, spec, jax.random.key(0)),
    )  # B random too: the adapters do something
    adapted_model = GPT(cfg, spec.layers(cfg))

    def losses(adapters):
        adapted = adapted_model.apply({"params": lora.combine(params, adapters)}, tokens)
        merged = GPT(cfg).apply({"params": lora.merge(params, adapters, spec)}, tokens)
        return jnp.mean(adapted**2), jnp.mean(merged**2), adapted - merged

    @jax.jit  # one compile: both losses and both gradients
    def check(adapters):
        grads = [jax.grad(lambda a, i=i: losses(a)[i])(adapters) for i in (0, 1)]
        return losses(adapters), grads

    (adapted, merged, diff), (grad_adapted, grad_merged) = check(adapters)
    assert abs(float(adapted - merged)) < 1e-5 and float(jnp.abs(diff).max()) < 1e-4
    for x, y in zip(jax.tree.leaves(grad_adapted), jax.tree.leaves(grad_merged), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    down_b = grad_adapted["layers" if scan_layers else "layers_1"]["mlp"]["down_proj"]["lora_b"]
    assert float(jnp.abs(down_b).max()) > 0


def test_adapter_axes_shard_on_a_mesh():
    """With `lora_rank` replicated, B of q_proj splits over heads like the kernel, A's input
    over fsdp like the kernel's."""
    from sft_jax import sharding

    spec = lora.LoraSpec(rank=4, targets=("q_proj",))
    axes = lora.adapter_axes(TINY_LLAMA, spec)
    shapes = jax.eval_shape(lambda: lora.init_adapters(TINY_LLAMA, spec, jax.random.key(0)))
    boxed = jax.tree.map(
        lambda names, x: nn.LogicallyPartitioned(x, names),
        axes,
        shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )
    mesh = sharding.make_mesh(fsdp=4, tensor=2)
    shardings = sharding.tree_shardings(boxed, mesh)["layers"]["self_attn"]["q_proj"]
    assert tuple(shardings["lora_a"].spec) == (None, "fsdp", None)
    assert tuple(shardings["lora_b"].spec) == (None, None, "tensor", None)


def test_merge_over_a_quantized_base():
    """QLoRA's merged export: an NF4 kernel is dequantized, then W + scale·A·B."""
    from sft_jax import quant

    rng = np.random.default_rng(5)
    w, a, b = (rng.standard_normal(s, np.float32) for s in ((64, 128), (64, 4), (4, 128)))
    q = quant.quantize_nf4(w, double_quant=True)
    spec = lora.LoraSpec(rank=4, alpha=8)
    merged = lora.merge({"l": {"kernel": q}}, {"l": {"lora_a": a, "lora_b": b}}, spec)
    want = lora.merged_kernel(q.dequantize(), a, b, 2.0)
    np.testing.assert_array_equal(merged["l"]["kernel"], want)


# --------------------------------------------------------------------------- PEFT folders


def _tiny_hf(family: str):
    import transformers

    if family == "llama":
        config = transformers.LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
    elif family == "gpt_oss":
        config = transformers.GptOssConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=4,
            max_position_embeddings=64,
            attn_implementation="eager",
        )
    elif family == "mixtral":
        config = transformers.MixtralConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=3,
            num_experts_per_tok=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
    elif family == "qwen3_moe":  # adapters on a mixture of experts' attention
        config = transformers.Qwen3MoeConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_experts=6,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
    else:
        config = transformers.GPT2Config(
            vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64
        )
    return transformers.AutoModelForCausalLM.from_config(config).eval()


# (family, PEFT target_modules, use_rslora, our scan_layers, dropout, target_parameters):
# stacked and per-layer adapters. A MoE router ("gate") and the experts' stacked weights are
# parameters PEFT wraps (ParamWrapper), which take no dropout; with both experts' weights
# adapted PEFT nests one wrapper in the other, with one alone it does not.
PEFT_CASES = {
    "llama": (["q_proj", "v_proj", "o_proj", "down_proj"], True, True, 0.1, []),
    "gpt2": (["c_attn", "attn.c_proj", "c_fc"], False, False, 0.1, []),
    "qwen3_moe": (
        ["q_proj", "k_proj", "o_proj", "gate"],
        False,
        True,
        0.0,
        ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    ),
    "gpt_oss": (
        ["q_proj"],
        True,
        False,
        0.0,
        ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    ),
    "mixtral": (["v_proj"], False, True, 0.0, ["mlp.experts.down_proj"]),
}


@pytest.mark.parametrize("family", sorted(PEFT_CASES))
def test_peft_adapter_round_trip(family, tmp_path):
    """An adapter PEFT saved (random A and B) read and merged over our import of its base
    gives PeftModel's logits; the folder we write back loads in PEFT with the same logits."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import transformers

    targets, rslora, scan, dropout, parameters = PEFT_CASES[family]
    torch.manual_seed(0)
    base = _tiny_hf(family)
    base.save_pretrained(tmp_path / "base")
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=targets,
        use_rslora=rslora,
        lora_dropout=dropout,
        target_parameters=parameters or None,
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.2)
    model.save_pretrained(tmp_path / "peft")
    tokens = np.random.default_rng(0).integers(0, 256, (2, 12))
    with torch.no_grad():
        want = model.eval()(torch.from_numpy(tokens)).logits.numpy()

    cfg, params = hf.load_hf(str(tmp_path / "base"), scan_layers=scan)
    spec, adapters, _ = peft_adapter.read_peft_adapter(str(tmp_path / "peft"), cfg)
    assert (spec.rank, spec.alpha, spec.dropout, spec.use_rslora) == (4, 8.0, dropout, rslora)
    assert list(spec.targets) == targets + parameters
    merged_logits = lambda p, a: GPT(cfg).apply({"params": lora.merge(p, a, spec, cfg)}, tokens)
    ours = jax.jit(merged_logits)(params, adapters)  # one compile, not one per op
    np.testing.assert_allclose(ours, want, atol=1e-4)
    # The adapters in the model (not merged) compute the same: attention's, the router's
    # and the experts' (through the grouped matmuls).
    adapted = GPT(cfg, spec.layers(cfg)).apply({"params": lora.combine(params, adapters)}, tokens)
    np.testing.assert_allclose(adapted, want, atol=1e-4)

    peft_adapter.write_peft_adapter(cfg, spec, adapters, str(tmp_path / "ours"), "some/base")
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["fan_in_fan_out"] == (family == "gpt2")
    assert written["base_model_name_or_path"] == "some/base"
    assert (written["peft_type"], written["task_type"]) == ("LORA", "CAUSAL_LM")
    fresh = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    again = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "ours")).eval()
    with torch.no_grad():
        got = again(torch.from_numpy(tokens)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize(
    "preset, want",
    [
        (
            "tiny-moe",
            [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate",
                "mlp.experts.gate_up_proj",
                "mlp.experts.down_proj",
            ],
        ),
        ("gpt-oss-20b", ["q_proj", "k_proj", "v_proj", "o_proj"]),
    ],
)
def test_all_linear_on_a_mixture_of_experts_is_peft_s(preset, want):
    """PEFT's all-linear on transformers' Qwen3-MoE adapts attention, the router and the
    experts' stacked weights (as target_parameters), on gpt-oss attention alone."""
    from sft_jax.model import PRESETS

    cfg = PRESETS[preset]
    modules = lora.resolve_targets(cfg, lora.LoraSpec(rank=4, targets=("all-linear",)))
    assert lora.target_names(cfg, modules) == want


# --------------------------------------------------------------------------- bad folders


def _write_q_proj_adapter(folder) -> None:
    spec = lora.LoraSpec(rank=2, targets=("q_proj",))
    adapters = lora.init_adapters(TINY_LLAMA, spec, jax.random.key(0))
    peft_adapter.write_peft_adapter(TINY_LLAMA, spec, adapters, str(folder))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(peft_type="IA3"), "peft_type='IA3'; only LORA"),
        (dict(use_dora=True), "use_dora=True is not supported"),
        (dict(rank_pattern={"q_proj": 8}), "rank_pattern"),
        (dict(r=3), r"expected \(3, 64\)"),
        (dict(target_parameters=["mlp.experts.gate_up_proj"]), "adapts no parameters of a llama"),
    ],
)
def test_unsupported_peft_folders_are_refused(change, message, tmp_path):
    _write_q_proj_adapter(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text()) | change
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        peft_adapter.read_peft_adapter(str(tmp_path), TINY_LLAMA)


def test_partial_or_foreign_tensors_are_refused(tmp_path):
    _write_q_proj_adapter(tmp_path)
    from safetensors.numpy import load_file, save_file

    path = str(tmp_path / "adapter_model.safetensors")
    tensors = load_file(path)
    one_layer = {k: v for k, v in tensors.items() if ".layers.0." in k}
    save_file(one_layer, path)
    with pytest.raises(
        ValueError, match=r"self_attn.q_proj is adapted in some layers but not \[1\]"
    ):
        peft_adapter.read_peft_adapter(str(tmp_path), TINY_LLAMA)
    save_file(tensors | {"base_model.model.lm_head.lora_A.weight": np.zeros((2, 64))}, path)
    with pytest.raises(ValueError, match="lm_head.lora_A.weight"):
        peft_adapter.read_peft_adapter(str(tmp_path), TINY_LLAMA)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="no adapter_model.safetensors"):
        peft_adapter.read_peft_adapter(str(tmp_path), TINY_LLAMA)
