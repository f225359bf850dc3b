"""sft_jax.quant: NF4 (code book, rounding bound, packing, double quantization), int8 per
channel, dequantization under jit, and the NF4 model's logits on real SmolLM2 weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax import quant


def _normal(shape, seed=0, heavy=False):
    rng = np.random.default_rng(seed)
    x = rng.standard_t(3, shape) if heavy else rng.standard_normal(shape)
    return jnp.asarray(x, jnp.float32)


def _block_absmax(x: np.ndarray, q: quant.NF4Tensor) -> np.ndarray:
    """Each value's block absmax, in x's shape."""
    lead = q.codes.shape[:-2]
    blocks = np.abs(np.asarray(x)).reshape(*lead, -1, 2 * q.codes.shape[-1]).max(-1)
    return np.repeat(blocks[..., None], 2 * q.codes.shape[-1], -1).reshape(x.shape)


def test_code_book_is_the_qlora_normal_float():
    """Quantiles of N(0, 1) as the QLoRA paper builds them (bitsandbytes' create_normal_map,
    offset 0.9677083): 8 positive, 7 negative and an exact zero, scaled to [-1, 1]."""
    from scipy.stats import norm

    offset = 0.9677083
    positive = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    negative = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    values = np.sort(np.concatenate([positive, [0.0], negative]))
    np.testing.assert_allclose(quant.NF4_CODE, values / values.max(), atol=1e-7)
    assert quant.NF4_MAX_ERROR == pytest.approx((1.0 - 0.6961928) / 2)


@pytest.mark.parametrize("heavy", [False, True])
def test_nf4_round_trip_within_the_code_book_bound(heavy):
    x = _normal((2, 32, 3, 64), heavy=heavy)
    q = quant.quantize_nf4(x)
    assert q.codes.shape == (2, 32, 3, 1, 32) and q.codes.dtype == jnp.uint8
    assert q.scales.shape == (2, 32, 3, 1)  # blocks along head_dim, the rest kept to shard
    err = np.abs(np.asarray(q.dequantize()) - np.asarray(x))
    assert (err <= quant.NF4_MAX_ERROR * _block_absmax(x, q) + 1e-6).all()
    # ... and each value took its nearest code (packed two per byte, high nibble first).
    packed = np.asarray(q.codes)
    index = np.stack([packed >> 4, packed & 0xF], -1).reshape(2, 32, 3, 64)
    normalized = np.asarray(x) / _block_absmax(x, q)
    nearest = np.abs(normalized[..., None] - quant.NF4_CODE).argmin(-1)
    assert (index == nearest).mean() > 0.9999  # ties at midpoints may go either way
    # Values on the code book come back exactly.
    on_codes = jnp.asarray(np.tile(quant.NF4_CODE, 8) * 3.0).reshape(2, 64)
    np.testing.assert_array_equal(quant.quantize_nf4(on_codes).dequantize(), on_codes)


def test_blocks_span_trailing_dims_and_bits_per_param():
    q = quant.quantize_nf4(_normal((64, 4, 16)))  # head_dim 16: a block is 4 heads × 16
    assert q.codes.shape == (64, 1, 32) and q.bits_per_param == 4.5  # 4 + 32 / 64
    dq = quant.quantize_nf4(_normal((30, 576, 1536)), double_quant=True)
    # 4 + 8/64 for int8 scales + 32/(64·256) per group scale (the QLoRA paper's 4.127),
    # and one float32 offset per layer
    per_layer = 576 * 1536
    want = 4 + 8 / 64 + 32 / (64 * 256) + 32 / per_layer
    assert dq.bits_per_param == pytest.approx(want, rel=1e-9)
    with pytest.raises(ValueError, match=r"quant: .*\(3, 5\).*blocks of 64"):
        quant.quantize_nf4(jnp.ones((3, 5)))


def test_double_quantized_scales_bound():
    """Codes are chosen with the exact absmax s; the stored s' is off by at most half an
    int8 step of its group, so |x - x'| ≤ max_error·s + |s - s'|."""
    x = _normal((8, 64, 128), seed=1, heavy=True)
    q = quant.quantize_nf4(x, double_quant=True)
    exact = quant.quantize_nf4(x)
    scales = q.scales.dequantize()  # [8, 64, 2]: per layer, 128 scales in one group of 256
    assert q.scales.codes.shape == (8, 1, 256) and q.scales.offset.shape == (8,)
    step = np.repeat(np.asarray(q.scales.group_scale), 256, -1)[:, :128].reshape(8, 64, 2)
    assert (np.abs(scales - exact.scales) <= step / 2 + 1e-7).all()
    scale_err = np.repeat(np.abs(np.asarray(scales - exact.scales))[..., None], 64, -1)
    err = np.abs(np.asarray(q.dequantize() - x))
    bound = quant.NF4_MAX_ERROR * _block_absmax(x, exact) + scale_err.reshape(x.shape)
    assert (err <= bound + 1e-6).all()


def test_int8_per_output_channel():
    x = _normal((2, 96, 3, 8), heavy=True)  # stacked [layers, in, heads, head_dim]
    q = quant.quantize_int8(x, in_axes=(1,))
    assert q.values.dtype == jnp.int8 and q.scales.shape == (2, 1, 3, 8)
    err = np.abs(np.asarray(q.dequantize() - x))
    assert (err <= np.asarray(q.scales) / 2 + 1e-6).all()
    assert q.bits_per_param == pytest.approx(8 + 32 / 96)


def test_dequantize_under_jit_and_as_a_pytree():
    """A quantized tree is an ordinary jit argument; dequantizing inside the matmul gives
    the eager result."""
    params = {"kernel": _normal((64, 128)), "scale": jnp.ones(128)}
    tree = quant.quantize_tree(params, quant.quantize_nf4, lambda path: path[-1] == "kernel")
    assert isinstance(tree["kernel"], quant.NF4Tensor) and tree["scale"] is params["scale"]
    x = _normal((5, 64), seed=2)

    @jax.jit
    def layer(tree, x):
        p = quant.dequantize_tree(tree)
        return (x @ p["kernel"]) * p["scale"]

    want = x @ tree["kernel"].dequantize()
    np.testing.assert_allclose(layer(tree, x), want, rtol=1e-6, atol=1e-6)
    assert quant.bits_per_param(tree) == 4.5


@pytest.mark.parametrize("scheme", ["nf4+dq", "int8"])  # plain NF4's scales: arrays [layers, …]
def test_quantized_params_scan_over_layers(scheme):
    """A stack of layers under `nn.scan` (as the model's blocks) runs on quantized params
    that a layer dequantizes itself: every leaf leads with the layers axis, so the scan
    slices a valid quantized tensor for each layer."""
    import flax.linen as nn

    class Layer(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            # flax checks a param's shape against its init; a quantized one is read as is
            if self.has_variable("params", "kernel"):
                kernel = self.get_variable("params", "kernel")
            else:
                kernel = self.param("kernel", nn.initializers.normal(0.1), (64, 4, 16))
            y = jnp.einsum("bd,dhk->bhk", x, quant.dequantize(kernel))
            return jnp.tanh(y).reshape(x.shape), None

    stack = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    x = _normal((2, 64), seed=4)
    params = stack().init(jax.random.key(0), x, None)["params"]
    quantize = {
        "nf4+dq": lambda w: quant.quantize_nf4(w, double_quant=True),
        "int8": lambda w: quant.quantize_int8(w, in_axes=(1,)),
    }[scheme]
    tree = quant.quantize_tree(params, quantize, lambda path: path[-1] == "kernel")
    run = lambda p: stack().apply({"params": p}, x, None)[0]
    on_codes, on_floats = jax.jit(lambda t: (run(t), run(quant.dequantize_tree(t))))(tree)
    np.testing.assert_allclose(on_codes, on_floats, atol=1e-6)


# --------------------------------------------------------------------------- real weights

# "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France.
# It is named after the engineer Gustave Eiffel, whose company designed and built the tower
# from 1887 to 1889." in SmolLM2's tokenizer.
EIFFEL = [
    504,
    414,
    46682,
    18669,
    314,
    253,
    34554,
    29,
    1009,
    27672,
    11637,
    335,
    260,
    21633,
    367,
    7621,
    281,
    7042,
    28,
    4649,
    30,
    657,
    314,
    3365,
    990,
    260,
    10776,
    26821,
    1134,
    414,
    46682,
    28,
    3449,
    2727,
    2724,
    284,
    2837,
    260,
    11637,
    429,
    216,
    33,
    40,
    40,
    39,
    288,
    216,
    33,
    40,
    40,
    41,
    30,
]


@pytest.fixture(scope="module")
def smollm2():
    """(cfg, params, logits fn) of SmolLM2-135M-Instruct (the packaged GGUF), loaded once."""
    from sft_jax import hf
    from sft_jax.model import GPT

    cfg, params = hf.load_hf("asset:smollm2-135m-instruct-gguf")
    logits = jax.jit(lambda p: GPT(cfg).apply({"params": p}, jnp.asarray([EIFFEL])))
    return cfg, params, logits


def _compare(want, got) -> dict:
    """|Δlogit| max and mean, top-1 agreement, and the sentence's mean next-token NLL."""
    want, got = np.asarray(want[0], np.float64), np.asarray(got[0], np.float64)
    err = np.abs(got - want)
    targets = np.asarray(EIFFEL[1:])

    def nll(logits):
        logits = logits[:-1] - logits[:-1].max(-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        return -log_probs[np.arange(len(targets)), targets].mean()

    return dict(
        max_err=err.max(),
        mean_err=err.mean(),
        top1=(got.argmax(-1) == want.argmax(-1)).mean(),
        nll=(nll(want), nll(got)),
    )


def _quantized(params, scheme: str) -> dict:
    """Every dense kernel of `params` (stacked [layers, *in, *out]) quantized by `scheme`."""
    kernel = lambda path: path[-1] == "kernel"
    if scheme == "nf4+dq":
        return quant.quantize_tree(
            params, lambda x: quant.quantize_nf4(x, double_quant=True), kernel
        )
    o_proj = lambda path: "o_proj" in path  # its input is (heads, head_dim)
    tree = quant.quantize_tree(params, lambda x: quant.quantize_int8(x, (1, 2)), o_proj)
    return quant.quantize_tree(tree, lambda x: quant.quantize_int8(x, (1,)), kernel)


# scheme: (bits per weight, |Δlogit| max, |Δlogit| mean, top-1 agreement ≥, NLL rise ≤):
# the measured figures (the printed line) with some margin. Measured: NF4 + double quant
# 15.7, 1.96, 0.692, 1.834 → 1.951 nats; int8 1.73, 0.210, 0.942, 1.834 → 1.832. SmolLM2's
# packaged weights are Q4_1 (4-bit, blocks of 32) already, quantized here again.
EXPECTED = {"nf4+dq": (4.128, 20.0, 2.5, 0.6, 0.2), "int8": (8.047, 2.5, 0.3, 0.9, 0.02)}


@pytest.mark.slow
@pytest.mark.parametrize("scheme", sorted(EXPECTED))
def test_smollm2_quantized_logits(smollm2, scheme):
    """Every dense kernel of SmolLM2-135M quantized (the embedding, tied to the head, kept
    in float as QLoRA does): next-token logits on an English sentence against float."""
    cfg, params, logits = smollm2
    tree = _quantized(params, scheme)
    bits = quant.bits_per_param(tree)
    f = _compare(logits(params), logits(jax.jit(quant.dequantize_tree)(tree)))
    print(
        f"\n{scheme}: {bits:.3f} bits/weight, |Δlogit| max {f['max_err']:.3f} mean "
        f"{f['mean_err']:.4f}, top-1 agreement {f['top1']:.3f}, NLL {f['nll'][0]:.3f} → "
        f"{f['nll'][1]:.3f}"
    )
    want_bits, max_err, mean_err, top1, nll_rise = EXPECTED[scheme]
    assert bits == pytest.approx(want_bits, abs=0.001)
    assert f["max_err"] <= max_err and f["mean_err"] <= mean_err and f["top1"] >= top1
    assert f["nll"][1] - f["nll"][0] <= nll_rise
