"""Accelerator attention kernels for packed (segment-masked) causal attention, chosen by
`model.attention`:

- "xla": `attention.dot_product_attention`, plain XLA ops (query blocks, causal key ranges).
  Every backend; the CPU path.
- "splash": the TPU Pallas splash-attention kernel (jax.experimental.pallas.ops.tpu),
  causal mask plus segment ids, so packed examples never see each other and no
  [seq, seq] mask is ever built; fully masked blocks are skipped. GQA goes through its
  MQA form, one kernel call per key/value head. On CPU it runs in Pallas interpret mode
  (slow; that is how the tests check it against the XLA path).
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")` on NVIDIA GPUs: cuDNN's
  fused flash attention, causal, with the segment mask as an additive bias (a dense
  [batch, 1, seq, seq] array, and JAX asks cuDNN for its gradient too: see
  `cudnn_attention` for why no segment form is used). cuDNN takes bfloat16/float16 only.
  Elsewhere the same call in its XLA form, which is how the tests exercise it on CPU (on a
  GPU they check the cuDNN kernel itself).
- "auto" (default): splash on TPU, cudnn on GPU in bfloat16/float16, xla otherwise.

Sliding windows (`window`: query i sees key j only if i - j < window, transformers'
sliding window) and soft caps (`softcap`: scaled scores s → softcap·tanh(s / softcap),
before masking, Gemma 2) in each path: xla skips the key blocks wholly outside the window
(a window's cost grows with seq · window, not seq²) and soft-caps in its forward and
backward passes; splash takes its LocalMask (whose empty blocks it skips) and its
`attn_logits_soft_cap`; cudnn takes jax.nn's `local_window_size`, which cuDNN runs as its
own sliding window, but jax.nn has no soft cap: "auto" takes xla on a GPU for a soft-capped
model and "cudnn" is refused for one (`resolve`). The KV-cache path counts the window in
cache slots (the generator left-pads, so slot distance is position distance in a row) and
scores only the window's slots.

`attention(q, k, v, segment_ids=…, implementation=…)` is the one entry point: it builds
whatever mask its implementation takes from the segment ids (none for splash, each query
block's own for xla, a [batch, 1, queries, keys] bool mask for cudnn). Calls with a KV cache
(decoding and prompt prefill) always take the XLA path: the keys are the cache's slots, not
the queries' positions, and one query against the cache leaves nothing to fuse.

Kernels are chosen for `platform()`: JAX's default backend, or the platform that
`target_platform(...)` names while the code is lowered for another one (`sft-jax-plan
--lower tpu` lowers the TPU train step on a CPU machine). Pallas kernels cannot be
partitioned by XLA: on a mesh, splash runs inside `shard_map` over the mesh axes that the
logical rules give the batch and the heads.
"""

from __future__ import annotations

import contextlib
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from sft_jax.attention import attention_mask, dot_product_attention

IMPLEMENTATIONS = ("auto", "xla", "splash", "cudnn")
HALF = ("bfloat16", "float16")  # the dtypes cuDNN's fused attention takes

_TARGETS: list[str] = []  # the platforms target_platform() named, innermost last


@contextlib.contextmanager
def target_platform(name: str):
    """Choose kernels for `name` ("tpu", "cuda" or "gpu", "cpu") instead of the default
    backend while tracing inside: for lowering with `lowering_platforms=(name,)`."""
    _TARGETS.append({"cuda": "gpu", "rocm": "gpu"}.get(name, name))
    try:
        yield
    finally:
        _TARGETS.pop()


def platform() -> str:
    """The platform kernels are traced for."""
    return _TARGETS[-1] if _TARGETS else jax.default_backend()


def resolve(
    name: str,
    backend: str | None = None,
    dtype: str = "bfloat16",
    softcap: float = 0.0,
    sinks: bool = False,
) -> str:
    """The implementation `name` stands for on `backend` (default: JAX's default) when the
    model computes in `dtype` with attention scores soft-capped at `softcap` (0 = off) and
    with attention sinks or not (gpt-oss: the XLA path alone has them)."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"model.attention={name!r}: choose one of {', '.join(IMPLEMENTATIONS)}")
    if sinks and name in ("splash", "cudnn"):
        raise ValueError(
            f"model.attention={name!r} has no attention sinks (gpt-oss's learned per-head "
            "logit); set model.attention='xla' or 'auto', which takes xla for such models"
        )
    if sinks:
        return "xla"
    backend = backend or platform()
    half = jnp.dtype(dtype).name in HALF
    if name == "cudnn" and softcap:
        raise ValueError(
            f"model.attention='cudnn' cannot soft-cap attention scores (the model's "
            f"attn_softcap is {softcap}): jax.nn.dot_product_attention has no soft cap; "
            "set model.attention='xla' or 'auto' (which takes xla on a GPU for such models)"
        )
    if name == "cudnn" and backend == "gpu" and not half:
        raise ValueError(
            f"model.attention='cudnn' needs model.dtype bfloat16 or float16 (got {dtype}): "
            "cuDNN's fused attention has no float32 form; set model.attention='xla' or 'auto'"
        )
    if name != "auto":
        return name
    if backend == "gpu":
        return "cudnn" if half and not softcap else "xla"
    return {"tpu": "splash"}.get(backend, "xla")


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array,
    implementation: str = "auto",
    key_segment_ids: jax.Array | None = None,
    query_offset: jax.Array | int = 0,
    scale: float | None = None,
    window: int = 0,
    softcap: float = 0.0,
    sinks: jax.Array | None = None,
) -> jax.Array:
    """Causal attention within segments (the batch contract: query i sees key j only if
    j <= i and both carry the same non-zero segment id), and with `window` > 0 only the
    last `window` keys (i - j < window, transformers' sliding window).

    q: [batch, queries, heads, head_dim]; k, v: [batch, keys, kv_heads, head_dim];
    segment_ids: [batch, queries] int. Without `key_segment_ids` the keys are the queries'
    own positions and `implementation` (a `model.attention` value) picks the kernel. With
    `key_segment_ids` [batch, keys] the keys are a KV cache's slots, query i at slot
    `query_offset + i` (the window counts slots), and the XLA path runs. `scale` multiplies
    q·k (default 1/sqrt(head_dim)); `softcap` > 0 maps the scaled scores s to
    softcap·tanh(s / softcap) before masking. `window` and `softcap` are static. `sinks`
    [heads] (gpt-oss): a logit per head that every query's softmax includes and whose
    probability is dropped (XLA path only). Returns q's shape and dtype."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    window, softcap = int(window), float(softcap)
    if key_segment_ids is not None:
        return dot_product_attention(
            q,
            k,
            v,
            segment_ids,
            key_segment_ids,
            query_offset,
            scale=scale,
            window=window,
            softcap=softcap,
            sinks=sinks,
        )
    kernel = resolve(implementation, dtype=q.dtype, softcap=softcap, sinks=sinks is not None)
    if kernel == "splash":  # masks by segment ids itself
        return splash_attention(q, k, v, segment_ids, scale=scale, window=window, softcap=softcap)
    if kernel == "cudnn":
        return cudnn_attention(q, k, v, attention_mask(segment_ids), scale=scale, window=window)
    # The XLA path masks each query block itself.
    return dot_product_attention(
        q, k, v, segment_ids, scale=scale, window=window, softcap=softcap, sinks=sinks
    )


def cudnn_attention(q, k, v, mask, scale: float | None = None, window: int = 0):
    """q: [batch, seq, heads, head_dim], k/v: [batch, seq, kv_heads, head_dim] (GQA is
    native), mask: [batch, 1, seq, seq] bool (causal and same segment); scale multiplies
    q·k (default 1/sqrt(head_dim)); window > 0: each query sees its last `window` keys,
    jax.nn's `local_window_size=(window - 1, 0)`, which cuDNN takes as its own sliding
    window (it skips the blocks outside it). There is no soft cap: `resolve` refuses
    'cudnn' for a soft-capped model, and 'auto' takes the XLA path for it.

    Why a dense mask (JAX 0.10): `jax.nn.dot_product_attention` takes no segment ids; its
    only mask-free forms are `is_causal` and one valid length per row
    (`query_seq_lengths`, `key_value_seq_lengths`), which cannot describe packed rows. The
    mask becomes a bias, and JAX always asks cuDNN for that bias's gradient
    (`should_export_dbias` is True). cuDNN's packed ("ragged") layout is reachable only
    through the private `jax._src.cudnn.fused_attention_stablehlo.dot_product_attention`
    (`q_offsets`, `kv_offsets` [batch, max_segments + 1], per-segment lengths): a static
    bound on the segments per row, Hopper or newer only, and softmax statistics of
    [batch · max_segments, heads, seq] float32 per layer kept for the backward pass, so
    at 8192 tokens and 32 heads each allowed segment costs 1 MiB per row and layer. That
    trade is not taken blind: it cannot even be traced without cuDNN present."""
    # Without `implementation`, jax.nn takes its XLA form even on a GPU: name cuDNN there.
    # is_causal lets the kernel skip the blocks above the diagonal; the mask adds the
    # segment boundaries of packed rows on top.
    gpu = platform() == "gpu"
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        mask=mask,
        is_causal=q.shape[1] == k.shape[1],
        scale=1.0 / math.sqrt(q.shape[-1]) if scale is None else scale,
        local_window_size=(window - 1, 0) if window else None,
        implementation="cudnn" if gpu else None,
    )


# Splash wants sequence lengths that are multiples of its blocks; 128 fits the TPU tiles.
SPLASH_BLOCK = 128


def _splash_kernel(seq: int, group: int, interpret: bool, window: int = 0, softcap: float = 0.0):
    # Built afresh for each trace, never cached across traces: the kernel holds arrays of
    # its mask's block layout, and one made under a transformation would leak its tracers.
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    block = min(SPLASH_BLOCK, seq)
    sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    # A window: query i sees keys i - (window - 1) … i (LocalMask's left and right reach).
    one = (
        masks.LocalMask((seq, seq), window_size=(window - 1, 0), offset=0)
        if window
        else masks.CausalMask((seq, seq))
    )
    mask = masks.MultiHeadMask([one for _ in range(group)])
    return splash.make_splash_mqa_single_device(
        mask, block_sizes=sizes, interpret=interpret, attn_logits_soft_cap=softcap or None
    )


def splash_attention(
    q,
    k,
    v,
    segment_ids,
    interpret: bool | None = None,
    *,
    scale: float | None = None,
    window: int = 0,
    softcap: float = 0.0,
):
    """q: [batch, seq, heads, head_dim], k/v: [batch, seq, kv_heads, head_dim],
    segment_ids: [batch, seq] int (0 = padding; padding attends to padding only); scale,
    window and softcap as in `attention` (the window is splash's LocalMask, whose wholly
    masked blocks the kernel skips; softcap its `attn_logits_soft_cap`).

    On a mesh (`jax.set_mesh`) the kernel runs per shard, inside `shard_map` over the mesh
    axes the batch and the heads are split over; `interpret` (default: unless the platform
    is a TPU) runs it in Pallas interpret mode."""
    if interpret is None:
        interpret = platform() != "tpu"
    t = q.shape[1]
    # The TPU kernel takes whole 128-token blocks; interpret mode also takes shorter rows.
    block = min(SPLASH_BLOCK, t) if interpret else SPLASH_BLOCK
    if t % block:
        raise ValueError(
            f"model.attention='splash' needs data.max_seq_len to be a multiple of "
            f"{SPLASH_BLOCK} (got {t}); round it up or set model.attention='xla'"
        )
    local = functools.partial(
        _splash_local, interpret=interpret, scale=scale, window=window, softcap=softcap
    )
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return local(q, k, v, segment_ids)
    batch_axes, head_axes = _splash_axes(mesh, q.shape[0], q.shape[2], k.shape[2])
    qkv = PartitionSpec(batch_axes, None, head_axes, None)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(qkv, qkv, qkv, PartitionSpec(batch_axes, None)),
        out_specs=qkv,
        check_vma=False,
    )(q, k, v, segment_ids)


def _splash_axes(mesh, batch: int, heads: int, kv_heads: int):
    """The mesh axes (or None) that split the batch and the heads for splash's shard_map:
    those the logical rules in force give "batch" and "act_heads", where they divide the
    batch, and both the query and the key/value heads (so each shard keeps whole groups)."""

    def axes(logical: str, *sizes: int):
        spec = nn.logical_to_mesh_axes((logical,))[0]
        names = (spec,) if isinstance(spec, str) else tuple(spec or ())
        n = math.prod(mesh.shape[a] for a in names)
        return names if names and all(s % n == 0 for s in sizes) else None

    return axes("batch", batch), axes("act_heads", heads, kv_heads)


def _splash_local(q, k, v, segment_ids, interpret: bool, scale, window: int, softcap: float):
    """The splash kernel on one shard's (or one device's) whole arrays."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
    )

    b, t, h, d = q.shape
    kv = k.shape[2]
    kernel = _splash_kernel(t, h // kv, interpret, window, softcap)
    q = (q * (1.0 / math.sqrt(d) if scale is None else scale)).astype(q.dtype)
    # [batch, kv_heads, group, seq, head_dim] queries against [batch, kv_heads, seq, head_dim].
    q = jnp.transpose(q.reshape(b, t, kv, h // kv, d), (0, 2, 3, 1, 4))
    k, v = (jnp.transpose(x, (0, 2, 1, 3)) for x in (k, v))

    def one(q, k, v, seg):  # one example, one kv head: q [group, seq, d], k/v [seq, d]
        return kernel(q, k, v, segment_ids=splash.SegmentIds(q=seg, kv=seg))

    per_head = jax.vmap(one, in_axes=(0, 0, 0, None))
    out = jax.vmap(per_head, in_axes=(0, 0, 0, 0))(q, k, v, segment_ids.astype(jnp.int32))
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, h, d)
