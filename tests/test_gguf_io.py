"""GGUF -> Hugging Face Llama tensors: synthetic files (fast) and the real SmolLM2 file (slow),
checked against transformers' own GGUF loader (which dequantizes with the same gguf package)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from sft_jax.hf.gguf_file import open_tensors, read_gguf, read_gguf_config

# Tiny llama: 2 layers, d 32 (Q8_0 needs rows of 32), 4 heads / 2 KV heads (head_dim 8),
# ffn 24, vocab 40.
D, H, KV, F, V, L = 32, 4, 2, 24, 40, 2
HD = D // H


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute, written independently here."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _hf_tensors(tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    r = lambda *s: rng.standard_normal(s).astype(np.float32)
    t = {"model.embed_tokens.weight": r(V, D), "model.norm.weight": r(D)}
    if not tied:
        t["lm_head.weight"] = r(V, D)
    for i in range(L):
        p = f"model.layers.{i}."
        t |= {
            p + "input_layernorm.weight": r(D),
            p + "self_attn.q_proj.weight": r(H * HD, D),
            p + "self_attn.k_proj.weight": r(KV * HD, D),
            p + "self_attn.v_proj.weight": r(KV * HD, D),
            p + "self_attn.o_proj.weight": r(D, H * HD),
            p + "post_attention_layernorm.weight": r(D),
            p + "mlp.gate_proj.weight": r(F, D),
            p + "mlp.up_proj.weight": r(F, D),
            p + "mlp.down_proj.weight": r(D, F),
        }
    return t


_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _write_llama(path: Path, hf: dict[str, np.ndarray], extra: dict | None = None) -> dict:
    """Write `hf` as a llama.cpp-style GGUF; returns the tensors a reader should give back
    (mlp.up_proj is stored as Q8_0, so its expected value is the dequantized one)."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(L)
    w.add_context_length(128)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_vocab_size(V)  # transformers' loader takes the vocab size from metadata only
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(5e5)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    expected = {}
    for name, x in hf.items():
        if name.startswith("model.layers."):
            i, rest = name[len("model.layers.") :].split(".", 1)
            gname = f"blk.{i}.{_TO_GGUF[rest.rsplit('.', 1)[0]]}.weight"
        else:
            gname = {
                "model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight",
            }[name]
        stored = x
        if gname.endswith("attn_q.weight"):
            stored = _permute(x, H)
        elif gname.endswith("attn_k.weight"):
            stored = _permute(x, KV)
        if gname.endswith("ffn_up.weight"):
            q = gguf.quants.quantize(stored, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gname, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            x = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gname, stored)
        expected[name] = x
    for gname, x in (extra or {}).items():  # raw GGUF-named tensors
        w.add_tensor(gname, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.mark.parametrize("tied", [True, False])
def test_synthetic_roundtrip(tmp_path, tied):
    hf = _hf_tensors(tied)
    expected = _write_llama(tmp_path / "m.gguf", hf)
    cfg, tensors = read_gguf(tmp_path / "m.gguf")
    assert cfg == {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": D,
        "intermediate_size": F,
        "num_hidden_layers": L,
        "num_attention_heads": H,
        "num_key_value_heads": KV,
        "head_dim": HD,
        "rms_norm_eps": pytest.approx(1e-6),
        "rope_theta": 5e5,
        "max_position_embeddings": 128,
        "vocab_size": V,
        "tie_word_embeddings": tied,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    assert read_gguf_config(tmp_path / "m.gguf") == cfg
    assert tensors.keys() == hf.keys()
    for name, want in expected.items():
        got = tensors[name]
        assert got.dtype == np.float32 and got.shape == hf[name].shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)
    # The Q8_0 tensor is only approximately the original; everything else is bit-exact.
    np.testing.assert_allclose(
        tensors["model.layers.0.mlp.up_proj.weight"],
        hf["model.layers.0.mlp.up_proj.weight"],
        atol=0.05,
    )
    assert open_tensors(tmp_path / "m.gguf")[1].names() == list(hf)  # file order


def test_rows_are_read_alone_and_a_sharded_import_reads_its_blocks(tmp_path):
    """Any range of rows (inside a head of Q or K too) equals those rows of the original,
    and an import onto a data × fsdp × tensor mesh equals the whole-tensor import."""
    import jax

    from sft_jax import hf, sharding
    from tests.test_hf import _sharded_target

    hf_tensors = _hf_tensors(tied=False)
    expected = _write_llama(tmp_path / "m.gguf", hf_tensors)
    _, tensors = open_tensors(tmp_path / "m.gguf")
    for name in (
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.norm.weight",
    ):
        for rows in (slice(0, 8), slice(3, 13), slice(8, 16)):
            np.testing.assert_array_equal(tensors.rows(name, rows), expected[name][rows], name)

    cfg, whole = hf.load_hf(str(tmp_path / "m.gguf"))
    shardings, shapes = _sharded_target(cfg, sharding.make_mesh(data=2, fsdp=2, tensor=2))
    _, params = hf.load_hf(str(tmp_path / "m.gguf"), shardings=shardings, shapes=shapes)
    for leaf, want in zip(jax.tree.leaves(params), jax.tree.leaves(whole), strict=True):
        np.testing.assert_array_equal(np.asarray(leaf), want)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        read_gguf(tmp_path / "nope.gguf")


def test_non_llama_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"gpt2\.gguf.*architecture 'gpt2'"):
        read_gguf(path)


def test_corrupt_and_truncated_files(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="bad.gguf is not a readable GGUF file"):
        read_gguf(bad)
    _write_llama(tmp_path / "m.gguf", _hf_tensors(tied=True))
    data = (tmp_path / "m.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.gguf"):
        read_gguf(cut)


def test_missing_and_unexpected_tensors(tmp_path):
    hf = _hf_tensors(tied=True)
    del hf["model.layers.1.mlp.down_proj.weight"]
    _write_llama(tmp_path / "m.gguf", hf)
    with pytest.raises(ValueError, match="lacks tensors.*layers.1.mlp.down_proj"):
        read_gguf(tmp_path / "m.gguf")
    # llama3-style rope_freqs would need HF rope_scaling: refuse rather than drop it.
    _write_llama(tmp_path / "r.gguf", _hf_tensors(True), {"rope_freqs.weight": np.ones(2, "f4")})
    with pytest.raises(ValueError, match="unexpected GGUF tensor 'rope_freqs.weight'"):
        read_gguf(tmp_path / "r.gguf")


def test_synthetic_matches_transformers(tmp_path):
    """transformers' own GGUF loader agrees on a tiny file (fast independent reference)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("accelerate")  # transformers requires it for gguf_file=
    transformers = pytest.importorskip("transformers")
    _write_llama(tmp_path / "m.gguf", _hf_tensors(tied=False))
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    _, tensors = read_gguf(tmp_path / "m.gguf")
    sd = ref.state_dict()
    assert sd.keys() == tensors.keys()
    for name, arr in tensors.items():
        torch.testing.assert_close(sd[name], torch.from_numpy(arr), atol=0, rtol=0, msg=name)


# ---- the real 135M file -------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    """(gguf path, our config, our tensors, transformers' GGUF-loaded reference model)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("accelerate")
    transformers = pytest.importorskip("transformers")
    from sft_jax.assets import resolve_asset

    path = Path(resolve_asset("smollm2-135m-instruct-gguf"))
    cfg, tensors = read_gguf(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    ref.eval()
    torch.set_num_threads(1)
    return path, cfg, tensors, ref


@pytest.mark.slow
def test_smollm2_tensors_and_config_match_transformers(smollm2):
    _, cfg, tensors, ref = smollm2
    sd = ref.state_dict()
    assert set(sd) - set(tensors) == {"lm_head.weight"}  # tied: ours omits it
    assert set(tensors) <= set(sd)
    worst = 0.0
    for name, arr in tensors.items():
        assert tuple(sd[name].shape) == arr.shape, name
        worst = max(worst, float(np.abs(sd[name].numpy() - arr).max()))
    assert worst <= 1e-6
    assert sum(a.size for a in tensors.values()) == 134_515_008
    assert cfg["vocab_size"] == 49152 and cfg["num_hidden_layers"] == 30
    assert cfg["tie_word_embeddings"] is True
    rc = ref.config
    for key, value in cfg.items():
        if key == "architectures":  # transformers leaves it None for GGUF; check the class
            assert type(ref).__name__ == value[0]
        elif key == "rope_theta":  # transformers 5 moved it into rope_parameters
            theta = getattr(rc, "rope_parameters", None) or {"rope_theta": rc.rope_theta}
            assert theta["rope_theta"] == value
        elif isinstance(value, float):  # GGUF stores float32; we keep the decimal written
            assert getattr(rc, key) == pytest.approx(value, rel=1e-6), key
        else:
            assert getattr(rc, key) == value, key


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2):
    import torch
    import transformers

    _, cfg, tensors, ref = smollm2
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    result = model.load_state_dict(
        {k: torch.from_numpy(v) for k, v in tensors.items()}, strict=False
    )
    assert list(result.missing_keys) == ["lm_head.weight"] and not result.unexpected_keys
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    ids = torch.tensor([[1, 504, 3156, 314, 1035, 30, 2, 7, 42]])
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
    assert float((got - want).abs().max()) <= 1e-4
    assert got.abs().max() > 1.0  # not a degenerate all-zero model
