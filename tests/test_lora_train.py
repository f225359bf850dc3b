"""LoRA and QLoRA training, against PEFT and transformers: tiny random GPT-2 and Llama
models trained a few steps with adapters, then loaded by `peft.PeftModel.from_pretrained`
over their base (and as the merged export) with the run's own logits; the frozen base and
the optimizer state checked leaf by leaf; 1 device against a mesh of 8; PEFT's own
adapters as a run's start; the config and resume errors.

The whole-run path (config → checkpoints → resume → `sft-jax-export --adapter`) is
tests/test_lora_run.py."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch
import transformers

from sft_jax import config as config_lib
from sft_jax import hf, lora, peft_adapter, quant, run_meta, sharding, steps, train
from sft_jax.model import GPT, GPTConfig
from sft_jax.optim import OptimConfig, make_optimizer
from tests import hf_parity
from tests.test_steps import VOCAB, make_batch

SEQ = 12


def _gpt2():
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=48, n_layer=2, n_head=4
    )
    return transformers.GPT2LMHeadModel(config)


def _llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=80,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def base(request, tmp_path_factory):
    """(cfg, params, folder) of a tiny random transformers model saved as an HF folder."""
    torch.manual_seed(0)
    model = {"gpt2": _gpt2, "llama": _llama}[request.param]()
    folder = str(tmp_path_factory.mktemp(f"base_{request.param}"))
    model.save_pretrained(folder)
    cfg, params = hf.load_hf(folder)
    return cfg, jax.tree.map(jnp.asarray, params), folder


def _batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, (2, SEQ))
    mask = np.ones((2, SEQ), np.int64)
    mask[1, 9:] = 0  # right padding in the second row
    return hf_parity.train_batch(tokens, mask), mask.astype(bool)


def _logits(model, params, batch):
    return np.asarray(
        model.apply({"params": params}, batch["tokens"], segment_ids=batch["segment_ids"])
    )


def _torch_logits(model, batch):
    tokens = torch.tensor(np.asarray(batch["tokens"]), dtype=torch.long)
    mask = torch.tensor(np.asarray(batch["segment_ids"]), dtype=torch.long)
    with torch.no_grad():
        return model(input_ids=tokens, attention_mask=mask).logits.numpy()


def _paths(tree) -> list[str]:
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_lora_run_loads_in_peft_with_its_logits(base, tmp_path):
    """A LoRA run: step 0 is the base model bitwise; only the adapters have optimizer
    state and change; the PEFT adapter folder over the base, and the merged export, give
    the run's logits in transformers."""
    peft = pytest.importorskip("peft")
    cfg, params, folder = base
    spec = lora.LoraSpec(rank=4, alpha=8.0)  # all-linear
    model = GPT(cfg, spec.layers(cfg))
    tx = optax.adam(1e-2)
    state = steps.state_from_params(params, jax.random.key(0), tx, model)
    batch, real = _batch()
    np.testing.assert_array_equal(
        _logits(model, state.params, batch), _logits(GPT(cfg), params, batch)
    )
    adapter_paths = _paths(lora.split(state.params)[1])
    moments = [p for p in _paths(state.opt_state) if "lora_" in p]
    assert len(moments) == 2 * len(adapter_paths)  # Adam's mu and nu of each adapter
    assert len(_paths(state.opt_state)) == len(moments) + 1  # + the step count: no base

    step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, schedule=lambda s: 0.0))
    losses = []
    for _ in range(3):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    frozen, adapters = lora.split(state.params)
    jax.tree.map(np.testing.assert_array_equal, frozen, params)  # the base bitwise unchanged

    ours = _logits(model, state.params, batch)
    assert np.abs(ours[real] - _logits(GPT(cfg), params, batch)[real]).max() > 1e-2
    adapter_dir = str(tmp_path / "adapter")
    peft_adapter.write_peft_adapter(cfg, spec, adapters, adapter_dir, folder)
    reference = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(folder), adapter_dir
    ).eval()
    np.testing.assert_allclose(_torch_logits(reference, batch)[real], ours[real], atol=1e-4)

    hf.save_hf(cfg, lora.merge(frozen, adapters, spec), str(tmp_path / "merged"))
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    np.testing.assert_allclose(_torch_logits(merged, batch)[real], ours[real], atol=1e-4)


def test_run_starts_from_a_peft_adapter(base, tmp_path):
    """`lora.init_from`: a run starts from an adapter PEFT wrote (random B, so it does
    something), giving PEFT's logits at step 0; a folder that is not what `lora.*` says
    is refused naming the key."""
    peft = pytest.importorskip("peft")
    cfg, params, folder = base
    torch.manual_seed(1)
    targets = ["c_attn"] if cfg.family == "gpt2" else ["q_proj", "down_proj"]
    peft_config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False
    )
    reference = peft.get_peft_model(
        transformers.AutoModelForCausalLM.from_pretrained(folder), peft_config
    )
    reference.save_pretrained(str(tmp_path / "adapter"))

    c = ml_collections.ConfigDict(
        {
            "lora": dict(
                rank=4, alpha=8.0, targets=",".join(targets), init_from=str(tmp_path / "adapter")
            )
        }
    )
    spec = config_lib.lora_spec(c)
    model = GPT(cfg, spec.layers(cfg))
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    fns = train.build_steps(model, optax.adam(1e-3), lambda s: 0.0, mesh)
    with fns.context():
        state = fns.init_from_params(params, jax.random.key(0))
        state = train._with_peft_adapters(state, str(tmp_path / "adapter"), fns, spec)
    batch, real = _batch()
    ours = _logits(model, state.params, batch)
    np.testing.assert_allclose(_torch_logits(reference.eval(), batch)[real], ours[real], atol=1e-4)

    c.lora.alpha = 16.0
    with fns.context(), pytest.raises(ValueError, match="lora.alpha: 16.0 in the config.*has 8.0"):
        train._with_peft_adapters(state, str(tmp_path / "adapter"), fns, config_lib.lora_spec(c))


TINY_LLAMA = GPTConfig.preset(
    "tiny-llama", vocab_size=VOCAB, max_seq_len=64, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128
)


def _mesh_run(mesh, spec: lora.LoraSpec):
    """(losses, adapters, fns, final state) of 4 steps on two alternating batches."""
    model = GPT(TINY_LLAMA, spec.layers(TINY_LLAMA))
    tx, schedule = make_optimizer(OptimConfig(learning_rate=2e-2, warmup_steps=1), 4)
    fns = train.build_steps(model, tx, schedule, mesh)
    losses = []
    with fns.context():
        state = fns.init(jax.random.key(0))
        for i in range(4):
            batch = jax.device_put(make_batch(rows=8, seq=32, seed=i % 2), fns.batch_sharding)
            state, metrics = fns.train_step(state, batch)
            losses.append(float(metrics["loss"]))
    return losses, jax.device_get(lora.split(state.params)[1]), fns, state


def test_qlora_on_a_mesh_matches_one_device():
    """A QLoRA run (the base's block kernels in NF4, sharded like the kernels they stand
    for; embeddings and norms float) on 1 device and on a (2, 2, 2) mesh: the same losses
    and adapters, and the loss falls."""
    spec = lora.LoraSpec(rank=4, alpha=8.0, quantize="nf4")
    one = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    ref_losses, ref_adapters, _, _ = _mesh_run(one, spec)
    losses, adapters, fns, state = _mesh_run(sharding.make_mesh(2, 2, 2), spec)
    print(f"QLoRA losses: 1 device {ref_losses}, mesh (2, 2, 2) {losses}")
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), adapters, ref_adapters)
    assert losses[2] < losses[0] and losses[3] < losses[1]  # the same two batches, lower

    base = lora.split(state.params)[0]
    assert base["embed_tokens"]["embedding"].dtype == jnp.float32
    kernel = base["layers"]["mlp"]["down_proj"]["kernel"]
    assert isinstance(kernel, quant.NF4Tensor)
    assert 4.1 < quant.bits_per_param({"k": kernel}) < 4.3  # tiny: scale groups half empty
    q_proj = lora.split(fns.state_shardings.params)[0]["layers"]["self_attn"]["q_proj"]
    assert tuple(q_proj["kernel"].codes.spec)[:2] == (None, "fsdp")  # [layers, d_model, …]


def test_bad_lora_config_names_the_key():
    c = ml_collections.ConfigDict({"lora": {"rank": 4, "targets": "q_proj,wq"}})
    with pytest.raises(ValueError, match="lora.targets: 'wq' is not a dense layer.*valid: q_proj"):
        config_lib.lora_spec(c).layers(TINY_LLAMA)
    with pytest.raises(ValueError, match="lora.alpha"):
        config_lib.lora_spec(ml_collections.ConfigDict({"lora": {"rank": 0, "alpha": 32.0}}))
    with pytest.raises(ValueError, match="unknown lora keys \\['rnak'\\]"):
        config_lib.lora_spec(ml_collections.ConfigDict({"lora": {"rnak": 4}}))
    with pytest.raises(ValueError, match="lora.quantize"):
        config_lib.lora_spec(ml_collections.ConfigDict({"lora": {"rank": 4, "quantize": "nf3"}}))


def test_resume_refuses_lora_changes_naming_the_key():
    model = dataclasses.asdict(TINY_LLAMA)
    spec = dataclasses.asdict(lora.LoraSpec(rank=4))
    base = {"init_from": "hf:a", "seed": 0}
    full = {"model": model, "base": base}
    with_lora = {**full, "lora": spec}
    run_meta.check_resumable(with_lora, {**with_lora, "lora": {**spec, "dropout": 0.1}}, "d")
    with pytest.raises(ValueError, match="lora.rank: .*full fine-tuning run.*set lora.rank=0"):
        run_meta.check_resumable(full, with_lora, "d")
    with pytest.raises(ValueError, match="lora.rank: .*a LoRA run; set lora.rank=4"):
        run_meta.check_resumable(with_lora, full, "d")
    with pytest.raises(ValueError, match="lora.alpha: checkpoint 16.0 vs config 32.0"):
        run_meta.check_resumable(with_lora, {**with_lora, "lora": {**spec, "alpha": 32.0}}, "d")
    other_base = {**with_lora, "base": {"init_from": "hf:b", "seed": 0}}
    with pytest.raises(ValueError, match="model.init_from: .*'hf:a', not 'hf:b'"):
        run_meta.check_resumable(with_lora, other_base, "d")


def test_a_frozen_base_counts_no_weight_gradient_flops():
    """MFU of a LoRA run counts 4 FLOPs per frozen weight (forward, input gradient), not 6."""
    cfg = GPTConfig.preset("smollm2-135m")
    attention = cfg.flops_per_token(512) - 6 * (
        cfg.num_params(False) + cfg.vocab_size * cfg.d_model
    )
    frozen = cfg.flops_per_token(512, frozen_layers=True)
    assert frozen == attention + 4 * (cfg.num_params(False) + cfg.vocab_size * cfg.d_model)


def test_nf4_blocks_cut_from_the_fsdp_axis_keep_its_name():
    """o_proj and down_proj run their NF4 blocks along d_model, the axis fsdp splits: the
    block axis takes the name `embed`, so the codes shard as the kernel's rows did (not
    replicated on every device: 0.875 GiB of down_proj codes per device for Llama-3.1-8B)."""
    cfg = dataclasses.replace(TINY_LLAMA, d_model=256, n_heads=4, n_kv_heads=2, d_ff=256)
    layers = lora.LoraSpec(rank=4, quantize="nf4").layers(cfg)
    boxed = jax.eval_shape(lambda: steps.init_params(jax.random.key(0), GPT(cfg)))
    base = jax.eval_shape(lambda: lora.prepare_base(cfg, layers, boxed))
    block = base["layers"]
    down = block["mlp"]["down_proj"]["kernel"]  # [layers, d_ff, d_model] → 4 blocks of d_model
    assert down.codes.names == ("layers", "mlp", "embed", None)
    o_proj = block["self_attn"]["o_proj"]["kernel"]  # [layers, heads, head_dim, d_model]
    assert o_proj.codes.names == ("layers", "heads", "head_dim", "embed", None)
    assert block["self_attn"]["q_proj"]["kernel"].codes.names[:2] == ("layers", "embed")
