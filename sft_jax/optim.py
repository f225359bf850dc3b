"""The optimizer: one of optax's (AdamW, Adafactor, Lion, SGD with momentum, Muon) after
warmup then decay, global-norm clipping and a weight-decay mask that every one of them
applies.

Gradient accumulation is not an optax wrapper here: `optax.MultiSteps` averages
micro-batch means, which breaks the token-weighted loss contract when micro-batches carry
different numbers of loss tokens. `steps.train_step` sums gradients of loss *sums* over
micro-batches and divides once by the global loss-token count instead.

Weight decay is decoupled and scaled by the learning rate in every optimizer (p ← p − lr·wd·p,
as torch's AdamW and transformers' Adafactor do), except SGD, whose decay is torch SGD's L2
term added to the gradient before the momentum.
"""

from __future__ import annotations

import dataclasses
import math
import re

import flax.linen as nn
import jax
import optax
from optax.contrib import MuonDimensionNumbers, scale_by_muon

from sft_jax.model.families import FAMILIES

OPTIMIZERS = ("adamw", "adafactor", "lion", "sgd", "muon")
# Leaves decayed like dense kernels: the kernels and the LoRA adapters' two matrices.
MATRIX_LEAVES = ("kernel", "lora_a", "lora_b")
# Muon's updates scaled to AdamW's RMS (Liu et al. 2025, "Muon is Scalable for LLM
# Training"): 0.2·√max(fan_in, fan_out), so optim.learning_rate and weight_decay carry over.
MUON_CONSISTENT_RMS = 0.2


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"  # one of OPTIMIZERS
    learning_rate: float = 3e-4  # peak, reached at the end of warmup
    warmup_steps: int = 0
    decay: str = "cosine"  # "cosine" | "linear" | "constant" after warmup
    end_learning_rate_ratio: float = 0.1  # final lr = ratio · peak (cosine / linear)
    weight_decay: float = 0.0
    decay_embeddings: bool = False  # norms and biases are never decayed
    b1: float = 0.9  # AdamW's and Lion's (and Muon's AdamW part's)
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip_norm: float = 1.0  # 0 = no clipping
    momentum: float = 0.9  # SGD's
    nesterov: bool = False  # SGD's
    muon_momentum: float = 0.95  # Muon's (Nesterov) momentum on the blocks' kernels


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then the chosen decay until `total_steps`."""
    if cfg.decay not in ("cosine", "linear", "constant"):
        raise ValueError(
            f"optim.decay: unknown schedule {cfg.decay!r}; use cosine, linear or constant"
        )
    if cfg.warmup_steps > total_steps:
        raise ValueError(
            f"optim.warmup_steps={cfg.warmup_steps} exceeds the run's {total_steps} steps; "
            "lower it (or set optim.warmup_steps=0)"
        )
    peak, end = cfg.learning_rate, cfg.learning_rate * cfg.end_learning_rate_ratio
    warmup = optax.linear_schedule(0.0, peak, cfg.warmup_steps)
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    if cfg.decay == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak if peak else 0.0)
    elif cfg.decay == "linear":
        after = optax.linear_schedule(peak, end, decay_steps)
    else:
        after = optax.constant_schedule(peak)
    return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def _dict_keys(path) -> list[str]:
    # The dict keys of a leaf's path, also when a flax metadata box (logical partitioning)
    # wraps the leaf or an optax MaskedNode stands in a subtree.
    return [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]


def weight_decay_mask(params, decay_embeddings: bool = False):
    """True for the leaves that are decayed: dense kernels and LoRA adapters (and embeddings
    if asked); never norm scales or biases."""

    def decays(path, _) -> bool:
        name = _dict_keys(path)[-1]
        return name in MATRIX_LEAVES or (decay_embeddings and name in ("embedding", "wpe"))

    return jax.tree_util.tree_map_with_path(decays, params)


_LAYER_STACKS = frozenset(family.layers for family in FAMILIES.values())
_ATTENTION_OUTPUTS = frozenset((family.attn, family.attn_out) for family in FAMILIES.values())


def muon_dimension_numbers(params):
    """Per leaf, how Muon sees it as matrices (`MuonDimensionNumbers`), or None for the
    leaves AdamW updates instead: embeddings, the head, norms and biases.

    Muon takes the dense kernels of the blocks and their LoRA adapters. A kernel is
    [*in, *out] with the heads kept (q_proj [d_model, heads, head_dim], o_proj
    [heads, head_dim, d_model]) and, with scan_layers, a layers axis in front: the matrix
    is the layer's matmul (in, out), one per layer (the layers axis is a batch axis)."""

    def dims(path, leaf) -> MuonDimensionNumbers | None:
        keys = _dict_keys(path)
        stack = re.fullmatch(r"(.+?)(_\d+)?", keys[0])
        if keys[-1] not in MATRIX_LEAVES or stack[1] not in _LAYER_STACKS:
            return None
        stacked = 0 if stack[2] else 1  # `{layers}_{i}`: one unrolled layer
        attention_out = tuple(keys[-3:-1]) in _ATTENTION_OUTPUTS
        fan_in = 2 if attention_out and keys[-1] != "lora_b" else 1  # lora_b's is the rank
        split = stacked + fan_in
        return MuonDimensionNumbers(tuple(range(stacked, split)), tuple(range(split, leaf.ndim)))

    return jax.tree_util.tree_map_with_path(dims, params)


def _scale_to_adamw_rms(dimension_numbers) -> optax.GradientTransformation:
    """Muon's orthogonal updates times 0.2·√max(fan_in, fan_out) (MUON_CONSISTENT_RMS)."""

    def scale(update, dims):
        fan_in = math.prod(update.shape[a] for a in dims.reduction_axis)
        fan_out = math.prod(update.shape[a] for a in dims.output_axis)
        return update * (MUON_CONSISTENT_RMS * math.sqrt(max(fan_in, fan_out)))

    def update_fn(updates, state, params=None):
        del params
        is_dims = lambda x: isinstance(x, MuonDimensionNumbers)  # noqa: E731
        scaled = jax.tree.map(scale, updates, dimension_numbers(updates), is_leaf=is_dims)
        return scaled, state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def _muon(cfg: OptimConfig, schedule, mask) -> optax.GradientTransformation:
    """Muon on the blocks' kernels (`muon_dimension_numbers`), AdamW on the rest, both with
    the same learning rate and masked decoupled weight decay."""
    dims = muon_dimension_numbers
    muon = optax.chain(
        scale_by_muon(beta=cfg.muon_momentum, nesterov=True, weight_dimension_numbers=dims),
        _scale_to_adamw_rms(dims),
        optax.add_decayed_weights(cfg.weight_decay, mask),
        optax.scale_by_learning_rate(schedule),
    )
    adamw = optax.adamw(schedule, cfg.b1, cfg.b2, cfg.eps, weight_decay=cfg.weight_decay, mask=mask)

    def labels(params):
        is_dims = lambda x: x is None or isinstance(x, MuonDimensionNumbers)  # noqa: E731
        return jax.tree.map(
            lambda d: "adamw" if d is None else "muon", dims(params), is_leaf=is_dims
        )

    return optax.partition({"muon": muon, "adamw": adamw}, labels)


def _boxes_that_fit(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` whose init, given params in flax logical-partitioning boxes (`steps.init_state`
    under `jax.eval_shape`, from which `sharding.tree_shardings` derives the shardings),
    keeps a box around a state leaf only where the leaf has the param's rank. optax copies
    the param's box onto every state leaf made from it, also onto Adafactor's factored
    moments (a row and a column of the param) and onto the MaskedNode that stands for a
    leaf the other part of Muon's partition updates; those are left unboxed (replicated)."""

    def fits(box) -> bool:
        names = getattr(box, "names", None)
        return names is None or getattr(box.value, "ndim", None) == len(names)

    def init(params):
        is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
        state = tx.init(params)
        return jax.tree.map(
            lambda x: x if not is_box(x) or fits(x) else x.value, state, is_leaf=is_box
        )

    return optax.GradientTransformation(init, tx.update)


def _adafactor(cfg: OptimConfig, schedule, mask) -> optax.GradientTransformation:
    """transformers' Adafactor as it is used for fine-tuning (scale_parameter=False,
    relative_step=False): the learning rate is absolute, updates are clipped to RMS 1, and
    the decay is decoupled and scaled by the learning rate (optax.adafactor's is not)."""
    return optax.chain(
        optax.scale_by_factored_rms(),
        optax.clip_by_block_rms(1.0),
        optax.add_decayed_weights(cfg.weight_decay, mask),
        optax.scale_by_learning_rate(schedule),
    )


def _optimizer(cfg: OptimConfig, schedule) -> optax.GradientTransformation:
    mask = lambda p: weight_decay_mask(p, cfg.decay_embeddings)  # noqa: E731
    if cfg.name == "adamw":
        return optax.adamw(
            schedule, cfg.b1, cfg.b2, cfg.eps, weight_decay=cfg.weight_decay, mask=mask
        )
    if cfg.name == "adafactor":
        return _adafactor(cfg, schedule, mask)
    if cfg.name == "lion":
        return optax.lion(schedule, cfg.b1, cfg.b2, weight_decay=cfg.weight_decay, mask=mask)
    if cfg.name == "sgd":
        # torch.optim.SGD's weight_decay: an L2 term in the gradient, before the momentum.
        return optax.chain(
            optax.add_decayed_weights(cfg.weight_decay, mask),
            optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov),
        )
    return _muon(cfg, schedule, mask)


def check(cfg: OptimConfig) -> None:
    """Fail on an unknown optim.name (config.check: before the run builds its data)."""
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"optim.name: unknown optimizer {cfg.name!r}; use one of {OPTIMIZERS}")


def make_optimizer(
    cfg: OptimConfig, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(the optimizer `cfg.name` after global-norm clipping, its learning-rate schedule)."""
    check(cfg)
    schedule = make_schedule(cfg, total_steps)
    parts = [optax.clip_by_global_norm(cfg.grad_clip_norm)] if cfg.grad_clip_norm > 0 else []
    parts.append(_optimizer(cfg, schedule))
    return _boxes_that_fit(optax.chain(*parts)), schedule
