"""The accelerator attention paths (sft_jax/kernels.py) against the XLA path, on CPU: the
TPU splash kernel in Pallas interpret mode, jax.nn.dot_product_attention (cuDNN on GPU) in
its XLA form. Packed rows with several examples, padding, and GQA. Run with
JAX_PLATFORMS=cuda on an NVIDIA GPU, the cudnn tests check cuDNN's kernel itself (bf16)."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax import kernels
from sft_jax.attention import attention_mask, dot_product_attention
from sft_jax.model import GPT, GPTConfig

ON_GPU = jax.default_backend() == "gpu"


def _packed(b=2, t=128, h=4, kv=2, d=32, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, d)), dtype) for n in (h, kv, kv))
    seg = np.zeros((b, t), np.int32)
    seg[0, :50], seg[0, 50:110] = 1, 2  # two examples, then padding
    seg[1, :128] = 1
    return q, k, v, jnp.asarray(seg)


def test_resolve():
    assert kernels.resolve("auto", "tpu") == "splash"
    assert kernels.resolve("auto", "gpu") == "cudnn"
    assert kernels.resolve("auto", "gpu", dtype="float32") == "xla"  # cuDNN: half only
    assert kernels.resolve("auto", "cpu") == "xla"
    assert kernels.resolve("splash", "cpu") == "splash"
    assert kernels.resolve("cudnn", "cpu", dtype="float32") == "cudnn"  # jax.nn's XLA form
    with pytest.raises(ValueError, match="model.attention='cudnn' needs model.dtype"):
        kernels.resolve("cudnn", "gpu", dtype="float32")
    with pytest.raises(ValueError, match="model.attention='flash'"):
        kernels.resolve("flash")
    # jax.nn.dot_product_attention has no soft cap: auto takes the XLA path, cudnn refuses.
    assert kernels.resolve("auto", "gpu", softcap=50.0) == "xla"
    assert kernels.resolve("auto", "tpu", softcap=50.0) == "splash"
    with pytest.raises(ValueError, match="'cudnn' cannot soft-cap.*model.attention='xla'"):
        kernels.resolve("cudnn", "gpu", softcap=50.0)
    with pytest.raises(ValueError, match="invalid attention"):
        GPTConfig.preset("tiny", attention="flash")


@pytest.mark.skipif(ON_GPU, reason="cuDNN's bf16 kernel is checked against xla above")
def test_attention_builds_the_mask_its_implementation_takes():
    q, k, v, seg = _packed()
    want = dot_product_attention(q, k, v, seg)
    real = (seg != 0)[:, :, None, None]
    for implementation in ("xla", "cudnn", "auto"):
        got = kernels.attention(q, k, v, segment_ids=seg, implementation=implementation)
        np.testing.assert_allclose(got * real, want * real, atol=2e-5)
    # Keys from a KV cache: query i at slot `query_offset + i`, the XLA path.
    keys = jnp.concatenate([jnp.ones((2, 5), jnp.int32), seg], axis=1)
    kk, vv = (jnp.concatenate([x[:, :5], x], axis=1) for x in (k, v))
    got = kernels.attention(q, kk, vv, segment_ids=seg, key_segment_ids=keys, query_offset=5)
    want = dot_product_attention(q, kk, vv, seg, keys, 5)
    np.testing.assert_array_equal(got, want)


def _shapes(jaxpr):
    """The shape of every value in a jaxpr and in the jaxprs inside it (loops, custom
    gradients, calls)."""
    for eqn in jaxpr.eqns:
        yield from (var.aval.shape for var in eqn.outvars)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    yield from _shapes(inner)


def test_xla_path_builds_no_whole_mask():
    # Value and gradient of the XLA path on 1024-token rows: no value anywhere holds a
    # [seq, seq] pair of axes (a whole mask would be 64 MiB per 8192-token row, and the
    # backward pass would need its transpose as well); each query block builds its own.
    t = 1024
    q, k, v, _ = _packed(b=2, t=t)
    seg = jnp.asarray(np.repeat([[1, 2, 3, 0], [1, 1, 2, 2]], t // 4, axis=1), jnp.int32)
    loss = lambda q, k, v: jnp.sum(
        kernels.attention(q, k, v, segment_ids=seg, implementation="xla") ** 2
    )
    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr
    shapes = list(_shapes(jaxpr))
    assert any(t in shape for shape in shapes)  # the walk did reach the attention
    square = [s for s in shapes if any(a == b == t for a, b in zip(s, s[1:], strict=False))]
    assert not square, f"[.., {t}, {t}, ..]-shaped values: {square[:3]}"


LOCAL = dict(window=40, scale=0.2)


@pytest.mark.parametrize(
    "kernel, options",
    [
        ("splash", {}),
        ("cudnn", {}),
        ("splash", dict(LOCAL, softcap=2.0)),  # LocalMask and attn_logits_soft_cap
        ("cudnn", LOCAL),  # local_window_size; no soft cap in jax.nn (resolve refuses it)
    ],
    ids=["splash", "cudnn", "splash-window-softcap", "cudnn-window"],
)
def test_kernel_equals_xla_path_with_gradients(kernel, options):
    if kernel == "splash" and ON_GPU:
        pytest.skip("Pallas TPU interpret mode is checked on CPU")
    # cuDNN takes half precision only: on a GPU, bf16 inputs against the XLA path in float32
    # on the same (rounded) values.
    gpu_cudnn = kernel == "cudnn" and ON_GPU
    dtype = jnp.bfloat16 if gpu_cudnn else jnp.float32
    q, k, v, seg = _packed(dtype=dtype)
    if options:  # two of splash's 128-query blocks, the second seeing into the first
        q, k, v, _ = _packed(t=256, h=2, kv=1, d=16, dtype=dtype)
        seg = jnp.zeros((2, 256), jnp.int32).at[0, :100].set(1).at[0, 100:230].set(2)
        seg = seg.at[1].set(1)
    mask = attention_mask(seg)
    real = (seg != 0)[:, :, None, None]
    w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32) * real

    def run(f):
        return lambda q, k, v: jnp.sum(f(q, k, v) * w)

    f32 = lambda *xs: [x.astype(jnp.float32) for x in xs]
    ours = lambda q, k, v: dot_product_attention(*f32(q, k, v), seg, **options)
    if kernel == "splash":
        theirs = lambda q, k, v: kernels.splash_attention(q, k, v, seg, interpret=True, **options)
    else:
        theirs = lambda q, k, v: kernels.cudnn_attention(q, k, v, mask, **options)
    # Compiled as one function each (interpret mode op by op is several times slower).
    value_and_grads = lambda f: jax.jit(lambda *x: (f(*x), jax.grad(run(f), (0, 1, 2))(*x)))
    got, got_grads = value_and_grads(theirs)(q, k, v)
    want, want_grads = value_and_grads(ours)(*f32(q, k, v))
    tol = dict(atol=3e-2, rtol=3e-2) if gpu_cudnn else dict(atol=2e-5)
    np.testing.assert_allclose(jnp.asarray(got, jnp.float32) * real, want * real, **tol)
    tol = dict(atol=5e-2, rtol=5e-2) if gpu_cudnn else dict(atol=2e-4, rtol=2e-4)
    for g, e in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(jnp.asarray(g, jnp.float32), e, **tol)


def test_splash_window_skips_blocks_and_lowers_for_tpu():
    # At 1024 tokens in 128-blocks a 256-key window leaves splash 21 query/key blocks to
    # visit (the diagonal and two below it), against 36 under the causal mask alone.
    def blocks(window):
        info = kernels._splash_kernel(1024, 2, True, window).fwd_mask_info
        return int((np.asarray(info.block_mask) > 0).sum())

    assert (blocks(0), blocks(256)) == (36, 21)
    # The Mosaic kernels (forward, dq, dkv) with the window and the soft cap lower for TPU.
    q = jax.ShapeDtypeStruct((1, 512, 4, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 512, 2, 128), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((1, 512), jnp.int32)
    opts = dict(window=256, softcap=50.0, scale=0.0625, implementation="splash")
    loss = lambda q, k, v, s: jnp.sum(kernels.attention(q, k, v, segment_ids=s, **opts))
    with kernels.target_platform("tpu"):
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k, seg)
        text = grad.lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == 3


@pytest.mark.skipif(not ON_GPU, reason="cuDNN runs on NVIDIA GPUs only")
def test_gpu_model_runs_cudnn_fused_attention():
    # The compiled train-shaped forward/backward calls cuDNN's fused attention (a custom call
    # named __cudnn$fmha…), and the bf16 logits match the XLA path's.
    kw = dict(vocab_size=97, dtype="bfloat16")
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 97, (2, 128)), jnp.int32)
    _, _, _, seg = _packed()
    positions = jnp.asarray(np.concatenate([np.arange(50), np.arange(78)])[None].repeat(2, 0))
    models = {a: GPT(GPTConfig.preset("tiny-llama", attention=a, **kw)) for a in ("xla", "auto")}
    params = models["xla"].init(jax.random.key(0), tokens)["params"]

    def loss(model, params):
        out = model.apply({"params": params}, tokens, positions=positions, segment_ids=seg)
        return jnp.sum(out.astype(jnp.float32) * (seg != 0)[..., None]), out

    grad = lambda m: jax.jit(jax.value_and_grad(lambda p: loss(m, p), has_aux=True))
    hlo = grad(models["auto"]).lower(params).compile().as_text()
    assert "__cudnn$fmha" in hlo
    (_, want), _ = grad(models["xla"])(params)
    (_, got), _ = grad(models["auto"])(params)
    real = (seg != 0)[..., None]
    err = jnp.linalg.norm((got - want).astype(jnp.float32) * real)
    assert err / jnp.linalg.norm(want.astype(jnp.float32) * real) < 2e-2


def test_splash_needs_whole_blocks():
    q, k, v, seg = _packed(t=192)
    with pytest.raises(ValueError, match="multiple of 128"):
        kernels.splash_attention(q, k, v, seg[:, :192], interpret=True)


# Gemma 2's attention on tiny-llama: layer 0 local (window 32), layer 1 global, scanned as
# one block with a per-layer flag; soft-capped scores at a scale of its own.
GEMMA_ATTENTION = dict(sliding_window=32, global_every=2, attn_softcap=5.0, query_pre_attn_scalar=8)


@pytest.mark.skipif(ON_GPU, reason="interpret mode is checked on CPU; GPU float32 dots differ")
def test_model_with_splash_equals_xla():
    model_with_splash_equals_xla(**GEMMA_ATTENTION)


def model_with_splash_equals_xla(**attention):
    cfg = GPTConfig.preset("tiny-llama", vocab_size=97, attention="xla", **attention)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 97, (2, 128)), jnp.int32)
    _, _, _, seg = _packed()
    positions = jnp.asarray(np.concatenate([np.arange(50), np.arange(78)])[None].repeat(2, 0))
    model = GPT(cfg)
    params = jax.jit(model.init)(jax.random.key(0), tokens[:1, :8])["params"]
    kw = dict(positions=positions, segment_ids=seg)
    apply = lambda model: jax.jit(lambda p: model.apply({"params": p}, tokens, **kw))
    want = apply(model)(params)
    got = apply(GPT(dataclasses.replace(cfg, attention="splash")))(params)
    real = (seg != 0)[..., None]
    np.testing.assert_allclose(got * real, want * real, atol=1e-4)


@pytest.mark.skipif(ON_GPU, reason="interpret mode is checked on CPU; GPU float32 dots differ")
def test_splash_after_a_scanned_model_trace():
    # The model's layer scan traces the kernel; a later use under grad must not see state
    # from that trace (a kernel cached across traces leaked its tracers here).
    model_with_splash_equals_xla()
    q, k, v, seg = _packed()
    grads = jax.grad(lambda q: jnp.sum(kernels.splash_attention(q, k, v, seg, interpret=True)))(q)
    assert np.isfinite(np.asarray(grads)).all()


@pytest.mark.skipif(ON_GPU, reason="interpret mode is checked on CPU")
@pytest.mark.parametrize("mesh_shape", [(1, 4, 1), (1, 2, 2)])
def test_splash_per_shard_equals_xla_path_on_a_mesh(mesh_shape):
    # On a mesh splash runs inside shard_map over the batch and head axes the rules give:
    # the values and gradients are those of the unsharded XLA path.
    import flax.linen as nn

    from sft_jax import sharding

    devices = jax.devices()[: math.prod(mesh_shape)]
    mesh = sharding.make_mesh(*mesh_shape, devices=devices)
    rules = sharding.activation_rules(mesh, {"act_heads": 4, "act_mlp": 8, "act_vocab": 8})
    q, k, v, seg = _packed(b=4)
    seg = seg.at[2:].set(seg[:2])  # four rows: packed, padded and whole
    real = (seg != 0)[:, :, None, None]  # padding's outputs differ by kernel and are unused
    w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32) * real

    def loss(attend, q, k, v):
        return jnp.sum(attend(q, k, v) * w)

    splash = lambda q, k, v: kernels.splash_attention(q, k, v, seg, interpret=True)
    xla = lambda q, k, v: kernels.attention(q, k, v, segment_ids=seg, implementation="xla")
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        got = jax.jit(jax.value_and_grad(functools.partial(loss, splash), argnums=(0, 1, 2)))(
            q, k, v
        )
        text = jax.jit(splash).lower(q, k, v).as_text()
    want = jax.value_and_grad(functools.partial(loss, xla), argnums=(0, 1, 2))(q, k, v)
    assert "shard_map" in text or "manual" in text
    np.testing.assert_allclose(got[0], want[0], rtol=2e-5)
    for g, w in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-4)
