"""A mixture of experts' expert weights as one stacked tensor per layer and projection.

Published Qwen3-MoE and Mixtral checkpoints (and transformers' `save_pretrained`) store one
tensor per expert (`model.layers.3.mlp.experts.17.gate_proj.weight`, [d_expert, d_model]);
transformers 5 holds them fused in memory and writes that layout with
`save_original_format=False` (`model.layers.3.mlp.experts.gate_up_proj`, [experts,
2·d_expert, d_model], gate rows then up rows; `…experts.down_proj`, [experts, d_model,
d_expert]). `hf.tensors` names an expert leaf with `{e}` for the expert's index and the
"experts" layout ([experts, out, in]); `ExpertsReader` serves such a name from either
layout, reading only the experts (and rows) a block asks for, and finds the router under
its in-memory name too where the two differ (Mixtral's `block_sparse_moe` is `mlp`).

gpt-oss keeps its experts stacked and fused in both (`mlp.experts.gate_up_proj`,
[experts, d_model, 2·d_expert]); its published checkpoints store those two weights in MXFP4
(`…gate_up_proj_blocks` uint8 [experts, 2·d_expert, d_model / 32, 16] and `…_scales`
[experts, 2·d_expert, d_model / 32], output rows first), which this reader dequantizes
block by block as transformers' `convert_moe_packed_tensors` does."""

from __future__ import annotations

import numpy as np

from sft_jax.model.config import GPTConfig

Index = tuple[slice, ...]


# MXFP4's E2M1 values by 4-bit code (OCP Microscaling spec; transformers' FP4_VALUES).
FP4_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    np.float32,
)


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """MXFP4 → float32: blocks uint8 [..., groups, 16] (two 4-bit codes a byte, the low
    nibble first), scales uint8 [..., groups] (a power of two each, biased by 127, for 32
    values) → [..., groups · 32]. Exact: every value is a small float times a power of 2."""
    blocks = np.asarray(blocks, np.uint8)
    values = np.stack([FP4_VALUES[blocks & 0x0F], FP4_VALUES[blocks >> 4]], axis=-1)
    values = values.reshape(*blocks.shape[:-1], 32)
    exponents = np.asarray(scales, np.int32)[..., None] - 127
    return np.ldexp(values, exponents).reshape(*blocks.shape[:-2], -1)


class ExpertsReader:
    """A tensor reader (`shape(name)`, `read(name, index)`) that also reads the stacked
    `{e}` names of `hf.tensors`; every other name goes to `reader` as it is."""

    def __init__(self, reader, cfg: GPTConfig):
        self.reader, self.cfg = reader, cfg
        self.fetches_rows = getattr(reader, "fetches_rows", False)  # see `hf.sharded`

    def _per_expert(self, name: str) -> bool:
        try:
            self.reader.shape(name.format(e=0))
            return True
        except (KeyError, ValueError):
            return False

    def _fused(self, name: str) -> tuple[str, slice | None]:
        """transformers 5's fused tensor holding `name`'s rows, and which of its rows."""
        names = self.cfg.names
        layer, proj = name.split(f".{names.moe}.{names.experts}.{{e}}.")
        proj = proj.removesuffix(".weight")
        prefix = f"{layer}.mlp.experts."
        f = self.cfg.d_expert
        if proj == names.expert_out:
            return prefix + "down_proj", None
        gate = proj == names.expert_in[0]
        return prefix + "gate_up_proj", slice(0, f) if gate else slice(f, 2 * f)

    def _has(self, name: str) -> bool:
        try:
            self.reader.shape(name)
            return True
        except (KeyError, ValueError):
            return False

    def _in_memory_name(self, name: str) -> str:
        """`name`, or transformers 5's in-memory name for it where the checkpoint uses
        those (Mixtral's `block_sparse_moe.gate` is `mlp.gate` there)."""
        if self._has(name):
            return name
        moe = self.cfg.names.moe
        return name.replace(f".{moe}.", ".mlp.", 1) if moe != "mlp" else name

    def _mxfp4(self, name: str) -> bool:
        """Whether `name` (a gpt-oss expert weight) is stored as MXFP4 blocks and scales."""
        return not self._has(name) and self._has(name + "_blocks")

    def shape(self, name: str) -> tuple[int, ...]:
        if self._mxfp4(name):  # blocks [experts, out, in / 32, 16] → [experts, in, out]
            experts, out, groups, _ = self.reader.shape(name + "_blocks")
            return (experts, groups * 32, out)
        if "{e}" not in name:
            return self.reader.shape(self._in_memory_name(name))
        if self._per_expert(name):
            return (self.cfg.n_experts, *self.reader.shape(name.format(e=0)))
        fused, rows = self._fused(name)
        try:
            shape = tuple(self.reader.shape(fused))
        except (KeyError, ValueError):
            raise ValueError(
                f"{name.format(e=0)} (and the other experts' tensors) are missing from the "
                f"checkpoint, and so is transformers 5's fused {fused}"
            ) from None
        return shape if rows is None else (shape[0], rows.stop - rows.start, *shape[2:])

    def read(self, name: str, index: Index) -> np.ndarray:
        if self._mxfp4(name):  # the experts and output rows asked for, whole input rows
            experts, ins, outs = index
            _, _, groups, width = self.reader.shape(name + "_blocks")
            whole = (slice(0, groups), slice(0, width))
            blocks = self.reader.read(name + "_blocks", (experts, outs, *whole))
            scales = self.reader.read(name + "_scales", (experts, outs, whole[0]))
            return dequantize_mxfp4(blocks, scales).transpose(0, 2, 1)[:, ins]
        if "{e}" not in name:
            return self.reader.read(self._in_memory_name(name), index)
        experts, rest = index[0], index[1:]
        if self._per_expert(name):
            return np.stack(
                [
                    self.reader.read(name.format(e=e), rest)
                    for e in range(*experts.indices(self.cfg.n_experts)[:2])
                ]
            )
        fused, rows = self._fused(name)
        if rows is not None:
            start, stop = rest[0].indices(rows.stop - rows.start)[:2]
            rest = (slice(rows.start + start, rows.start + stop), *rest[1:])
        return self.reader.read(fused, (experts, *rest))
