"""Qwen3, Mistral, Gemma 2 and Gemma 3 against transformers itself: tiny random models built
from each family's transformers config class, with odd sizes (head_dim ≠ d_model / n_heads,
grouped-query attention, tied and untied heads) and, where the family has them, sliding
windows shorter than the sequences, local and global layers, and soft caps.

One module-scoped fixture per family builds the transformers model and saves it once.
Greedy generation with the KV cache against transformers' is tests/test_family_generate.py,
a Gemma-shaped model on 8 faked devices against one tests/test_family_mesh.py."""

import numpy as np
import pytest
import torch
import transformers

from sft_jax import hf
from tests import hf_parity
from tests.hf_parity import COMMON, VOCAB


def _qwen3():
    config = transformers.Qwen3Config(
        **COMMON,
        num_hidden_layers=2,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
    )
    return transformers.Qwen3ForCausalLM(config)


def _mistral():
    config = transformers.MistralConfig(
        **COMMON, num_hidden_layers=2, tie_word_embeddings=True, sliding_window=5
    )
    return transformers.MistralForCausalLM(config)


def _gemma2():
    # Local, global, local, global; soft caps small enough to bend the scores and logits.
    config = transformers.Gemma2Config(
        **COMMON,
        num_hidden_layers=4,
        tie_word_embeddings=True,
        sliding_window=4,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0,
        attn_implementation="eager",
    )
    return transformers.Gemma2ForCausalLM(config)


def _gemma3():
    # Every 3rd layer global, with linearly scaled RoPE; the local ones with their own base.
    config = transformers.Gemma3TextConfig(
        **COMMON,
        num_hidden_layers=3,
        tie_word_embeddings=False,
        sliding_window=4,
        query_pre_attn_scalar=20,
        layer_types=["sliding_attention"] * 2 + ["full_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 20000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
        },
        attn_implementation="eager",
    )
    return transformers.Gemma3ForCausalLM(config)


BUILDERS = {"qwen3": _qwen3, "mistral": _mistral, "gemma2": _gemma2, "gemma3": _gemma3}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family(request, tmp_path_factory):
    """(name, transformers model, its folder, its logits on `hf_parity.batch()`)."""
    torch.manual_seed(0)
    model = BUILDERS[request.param]()
    # Random init leaves the norms at 1 (or 0 for Gemma's 1 + w): perturb every tensor.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.eval()
    folder = str(tmp_path_factory.mktemp(request.param))
    model.save_pretrained(folder)
    tokens, mask = hf_parity.batch()
    return request.param, model, folder, hf_parity.torch_logits(model, tokens, mask)


def test_config_is_the_family_s(family):
    name, model, folder, _ = family
    cfg = hf.load_config(folder)
    assert cfg.family == name
    assert cfg.dim_per_head == 16 and cfg.d_model == 48 and cfg.n_kv_heads == 2
    assert cfg.tie_embeddings == model.config.tie_word_embeddings
    local = [t == "sliding_attention" for t in getattr(model.config, "layer_types", None) or []]
    if name == "mistral":
        local = [True] * cfg.n_layers
    assert list(cfg.local_layers) == (local or [False] * cfg.n_layers)


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "unrolled"])
def test_imported_logits_equal_transformers(family, scan_layers):
    _, _, folder, ref = family
    cfg, params = hf.load_hf(folder, scan_layers=scan_layers)
    tokens, mask = hf_parity.batch()
    real = mask.astype(bool)
    assert np.abs(hf_parity.our_logits(cfg, params, tokens, mask)[real] - ref[real]).max() <= 1e-4


def test_packed_rows_equal_each_example_alone(family):
    """Rows of two examples each (positions restart, segment ids differ), both longer than
    the window, give each example's own logits: those transformers gives the example's
    row alone (a causal model's logits of a prefix are the prefix's). Same shape as the
    batch above: the same compiled forward."""
    _, _, folder, ref = family
    cfg, params = hf.load_hf(folder)
    assert hf_parity.packed_rows_error(cfg, params, ref) <= 1e-4


def test_export_is_bitwise_and_reloads_in_transformers(family, tmp_path):
    _, model, folder, ref = family
    cfg, params = hf.load_hf(folder)
    original = {k: v.numpy() for k, v in model.state_dict().items()}
    exported = dict(hf.params_to_hf(cfg, params))
    for name, tensor in exported.items():
        np.testing.assert_array_equal(tensor, original[name], err_msg=name)
    missing = set(original) - set(exported)
    assert missing <= {"lm_head.weight"} and (not missing or cfg.tie_embeddings)
    hf.save_hf(cfg, params, str(tmp_path))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
    reloaded.eval()
    assert type(reloaded) is type(model)
    tokens, mask = hf_parity.batch()
    real = mask.astype(bool)
    np.testing.assert_allclose(
        hf_parity.torch_logits(reloaded, tokens, mask)[real], ref[real], atol=1e-5
    )


def test_fine_tuned_export_gives_the_runs_logits(family, tmp_path):
    _, model, folder, ref = family
    cfg, params = hf.load_hf(folder)
    tuned, losses = hf_parity.fine_tune(cfg, params)
    assert losses[-1] < losses[0]
    hf.save_hf(cfg, tuned, str(tmp_path))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
    reloaded.eval()
    tokens, mask = hf_parity.batch()
    real = mask.astype(bool)
    ours = hf_parity.our_logits(cfg, tuned, tokens, mask)
    assert np.abs(ours[real] - ref[real]).max() > 1e-2  # the run changed the model
    np.testing.assert_allclose(
        hf_parity.torch_logits(reloaded, tokens, mask)[real], ours[real], atol=1e-4
    )


def test_text_part_of_a_multimodal_gemma3_checkpoint(tmp_path):
    """A `gemma3` (image and text) checkpoint: its language model imports, gives
    transformers' text-only logits, and exports as a Gemma3ForCausalLM with them."""
    torch.manual_seed(0)
    text = transformers.Gemma3TextConfig(
        **COMMON, num_hidden_layers=2, sliding_window=4, sliding_window_pattern=2
    )
    vision = transformers.SiglipVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    config = transformers.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        boi_token_index=VOCAB - 3,
        eoi_token_index=VOCAB - 2,
        image_token_index=VOCAB - 1,
    )
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(tmp_path / "src"))
    tokens, mask = hf_parity.batch()
    ref = hf_parity.torch_logits(model, tokens, mask)
    cfg, params = hf.load_hf(str(tmp_path / "src"))
    assert cfg.family == "gemma3" and cfg.local_layers == (True, False)
    real = mask.astype(bool)
    assert np.abs(hf_parity.our_logits(cfg, params, tokens, mask)[real] - ref[real]).max() <= 1e-4
    hf.save_hf(cfg, params, str(tmp_path / "out"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert type(reloaded) is transformers.Gemma3ForCausalLM
    np.testing.assert_allclose(
        hf_parity.torch_logits(reloaded, tokens, mask)[real], ref[real], atol=1e-5
    )
