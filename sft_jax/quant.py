"""Quantized storage for a frozen base model (QLoRA): NF4 with one absmax scale per block of
64 values, the scales optionally quantized again (double quantization), and int8 with one
scale per output channel. Dequantization is plain jnp, jittable, meant to run inside the
matmul that uses the weight (`dequantize(q)` then `x · W`), so only the codes stay in memory.

NF4 (Dettmers et al., 2023, "QLoRA", appendix E; bitsandbytes' NF4 table) is 16 values,
quantiles of a standard normal scaled to [-1, 1] with an exact 0: a block of weights is
divided by its absmax and each value stored as the index of its nearest code, two indices
per byte. Blocks run along the tensor's trailing dims (the fewest whose size is a multiple
of the block), so the leading dims (layers, d_model, heads) keep their shape and can be
sharded like the float kernel: q_proj [layers, d_model, heads, head_dim=64] is stored as
codes [layers, d_model, heads, 1, 32] and scales [layers, d_model, heads, 1].

Double quantization (the QLoRA paper's, simplified): the float32 scales minus their mean
are stored as int8 in groups of 256, each group with one float32 scale; 4.127 bits per
weight instead of 4.5. (bitsandbytes uses its 8-bit dynamic code book for these; a linear
int8 code costs the same bits.) The scales' first axis is kept, so a stacked kernel's
leaves all lead with the layers axis and `nn.scan` slices them like float params; the
rest of the scales is grouped, so it is not sharded with the codes (1/32 of their size).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# The QLoRA paper's NF4 code book (appendix E), as bitsandbytes and qwix have it.
NF4_CODE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
# Half the largest gap between neighbouring codes: the worst rounding error, in absmax units.
NF4_MAX_ERROR = float(np.diff(NF4_CODE).max() / 2)
NF4_BLOCK = 64
SCALE_GROUP = 256  # double quantization: scales per int8 group


def _pytree(data: tuple[str, ...], meta: tuple[str, ...]):
    def register(cls):
        return jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)

    return register


@_pytree(data=("codes", "group_scale", "offset"), meta=("row_shape",))
@dataclasses.dataclass(frozen=True)
class QuantizedScales:
    """NF4 block scales, double-quantized: (scales - offset) as int8 in groups of 256. The
    scales' first axis (a stacked kernel's layers) is kept whole, so a scan over layers
    slices these as it slices the codes."""

    codes: Array  # int8 [*first, groups, 256]
    group_scale: Array  # float32 [*first, groups]: each group's absmax / 127
    offset: Array  # float32 [*first]: the mean of the scales (of each row)
    row_shape: tuple[int, ...]  # the scales' shape after the first axis (or all of it)

    def dequantize(self) -> Array:
        first = self.codes.shape[:-2]
        values = self.codes.astype(jnp.float32) * self.group_scale[..., None]
        values = values.reshape(*first, -1)[..., : math.prod(self.row_shape)]
        return (values + self.offset[..., None]).reshape(*first, *self.row_shape)

    @property
    def bits(self) -> int:
        return (self.codes.size * 8) + (self.group_scale.size + self.offset.size) * 32


@_pytree(data=("codes", "scales"), meta=("block_shape", "dtype"))
@dataclasses.dataclass(frozen=True)
class NF4Tensor:
    """A tensor in NF4: code indices packed two per byte (the first in the high nibble) and
    each block's absmax. Only the trailing dims the blocks span are static (`block_shape`),
    so slicing the leading dims (a scan over layers) leaves a valid NF4Tensor."""

    codes: Array  # uint8 [*lead, blocks, block // 2]
    scales: Array | QuantizedScales  # float32 [*lead, blocks], or double-quantized
    block_shape: tuple[int, ...]  # the trailing dims the blocks run along
    dtype: str  # what dequantize returns

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.codes.shape[:-2], *self.block_shape)

    def dequantize(self) -> Array:
        high, low = self.codes >> 4, self.codes & 0xF
        index = jnp.stack([high, low], axis=-1).reshape(*self.codes.shape[:-1], -1)
        scales = self.scales
        if isinstance(scales, QuantizedScales):
            scales = scales.dequantize()
        values = jnp.asarray(NF4_CODE)[index] * scales[..., None]  # [*lead, blocks, block]
        return values.reshape(self.shape).astype(self.dtype)

    @property
    def bits_per_param(self) -> float:
        """Stored bits per weight, scales included."""
        scales = self.scales
        scale_bits = scales.bits if isinstance(scales, QuantizedScales) else scales.size * 32
        return (self.codes.size * 8 + scale_bits) / math.prod(self.shape)


@_pytree(data=("values", "scales"), meta=("dtype",))
@dataclasses.dataclass(frozen=True)
class Int8Tensor:
    """A tensor in int8 with one float32 scale per output channel (absmax / 127)."""

    values: Array  # int8, the tensor's shape
    scales: Array  # float32, the tensor's shape with the input axes of size 1
    dtype: str

    def dequantize(self) -> Array:
        return (self.values.astype(jnp.float32) * self.scales).astype(self.dtype)

    @property
    def bits_per_param(self) -> float:
        return 8 + 32 * self.scales.size / self.values.size


Quantized = NF4Tensor | Int8Tensor


def dequantize(x: Array | Quantized) -> Array:
    """A quantized tensor as floats (jittable); a float array as it is."""
    return x.dequantize() if isinstance(x, NF4Tensor | Int8Tensor) else x


# --------------------------------------------------------------------------- NF4


def _block_layout(shape: tuple[int, ...], block: int) -> tuple[int, ...]:
    """The leading dims kept whole: blocks run along the fewest trailing dims whose size is
    a multiple of `block`."""
    for k in range(len(shape) - 1, -1, -1):
        if math.prod(shape[k:]) % block == 0:
            return shape[:k]
    raise ValueError(
        f"quant: a tensor of shape {shape} ({math.prod(shape)} values) does not split into "
        f"NF4 blocks of {block}; keep it in float or use int8"
    )


def _nearest_code(normalized: Array) -> Array:
    """Index of the nearest NF4 code to each value in [-1, 1]: how many of the midpoints
    between neighbouring codes lie below it."""
    index = jnp.zeros(normalized.shape, jnp.uint8)
    for midpoint in (NF4_CODE[1:] + NF4_CODE[:-1]) / 2:
        index += (normalized > midpoint).astype(jnp.uint8)
    return index


@functools.partial(jax.jit, static_argnames=("block", "double_quant"))
def quantize_nf4(x: Array, block: int = NF4_BLOCK, double_quant: bool = False) -> NF4Tensor:
    """`x` in NF4 with one absmax per `block` values (even), optionally double-quantized."""
    if block % 2:
        raise ValueError(f"quant: NF4 block {block} must be even (two codes per byte)")
    lead = _block_layout(x.shape, block)
    blocks = jnp.asarray(x, jnp.float32).reshape(*lead, -1, block)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)  # [*lead, blocks]
    index = _nearest_code(blocks / jnp.where(absmax > 0, absmax, 1.0)[..., None])
    codes = (index[..., 0::2] << 4) | index[..., 1::2]  # [*lead, blocks, block // 2]
    scales = _double_quantize(absmax) if double_quant else absmax
    return NF4Tensor(codes, scales, tuple(x.shape[len(lead) :]), jnp.dtype(x.dtype).name)


def _double_quantize(scales: Array) -> QuantizedScales:
    """Each row of the scales (the first axis kept) less its mean, in int8 groups of 256."""
    first = scales.shape[:1] if scales.ndim > 1 else ()
    rows = scales.reshape(*first, -1)
    offset = jnp.mean(rows, axis=-1)
    count = rows.shape[-1]
    groups = -(-count // SCALE_GROUP)
    pad = [(0, 0)] * len(first) + [(0, groups * SCALE_GROUP - count)]
    rows = jnp.pad(rows - offset[..., None], pad).reshape(*first, groups, SCALE_GROUP)
    group_scale = jnp.max(jnp.abs(rows), axis=-1) / 127
    codes = jnp.round(rows / jnp.where(group_scale > 0, group_scale, 1.0)[..., None])
    row_shape = tuple(scales.shape[len(first) :])
    return QuantizedScales(codes.astype(jnp.int8), group_scale, offset, row_shape)


# --------------------------------------------------------------------------- int8


@functools.partial(jax.jit, static_argnames=("in_axes",))
def quantize_int8(x: Array, in_axes: tuple[int, ...] = (0,)) -> Int8Tensor:
    """`x` in int8, one absmax scale per output channel: the absmax is taken over
    `in_axes` (a kernel's input dims; (1,) for a stacked [layers, in, out] kernel)."""
    x32 = jnp.asarray(x, jnp.float32)
    scales = jnp.max(jnp.abs(x32), axis=in_axes, keepdims=True) / 127
    values = jnp.round(x32 / jnp.where(scales > 0, scales, 1.0)).astype(jnp.int8)
    return Int8Tensor(values, scales, jnp.dtype(x.dtype).name)


# --------------------------------------------------------------------------- trees


def is_quantized(x) -> bool:
    return isinstance(x, NF4Tensor | Int8Tensor)


def quantize_tree(params, quantize: Callable[[Array], Quantized], where: Callable) -> dict:
    """`params` with each leaf for which `where(path)` holds (path: the tuple of keys)
    replaced by `quantize(leaf)`; e.g. every dense kernel:
    `quantize_tree(params, quantize_nf4, lambda path: path[-1] == "kernel")`."""

    def leaf(path, x):
        keys = tuple(getattr(k, "key", k) for k in path)
        return quantize(x) if where(keys) and not is_quantized(x) else x

    return jax.tree_util.tree_map_with_path(leaf, params, is_leaf=is_quantized)


def dequantize_tree(tree) -> dict:
    """Every quantized leaf as floats (jittable)."""
    return jax.tree.map(dequantize, tree, is_leaf=is_quantized)


def bits_per_param(tree) -> float:
    """Stored bits per value over the quantized leaves of `tree`."""
    leaves = [x for x in jax.tree.leaves(tree, is_leaf=is_quantized) if is_quantized(x)]
    sizes = [math.prod(x.shape if isinstance(x, NF4Tensor) else x.values.shape) for x in leaves]
    bits = sum(x.bits_per_param * n for x, n in zip(leaves, sizes, strict=True))
    return bits / sum(sizes)
