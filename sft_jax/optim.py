"""The optimizer: optax AdamW with warmup then decay, global-norm clipping and a
weight-decay mask.

Gradient accumulation is not an optax wrapper here: `optax.MultiSteps` averages
micro-batch means, which breaks the token-weighted loss contract when micro-batches carry
different numbers of loss tokens. `steps.train_step` sums gradients of loss *sums* over
micro-batches and divides once by the global loss-token count instead.
"""

from __future__ import annotations

import dataclasses

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 3e-4  # peak, reached at the end of warmup
    warmup_steps: int = 0
    decay: str = "cosine"  # "cosine" | "linear" | "constant" after warmup
    end_learning_rate_ratio: float = 0.1  # final lr = ratio · peak (cosine / linear)
    weight_decay: float = 0.0
    decay_embeddings: bool = False  # norms and biases are never decayed
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip_norm: float = 1.0  # 0 = no clipping


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


def weight_decay_mask(params, decay_embeddings: bool = False):
    """True for the leaves AdamW decays: dense kernels (and embeddings if asked);
    never norm scales or biases."""

    def decays(path, _) -> bool:
        # The last dict key is the parameter name, also when a flax metadata box
        # (logical partitioning) wraps the leaf.
        name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
        return name == "kernel" or (decay_embeddings and name in ("embedding", "wpe"))

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(
    cfg: OptimConfig, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(cfg, total_steps)
    parts = [optax.clip_by_global_norm(cfg.grad_clip_norm)] if cfg.grad_clip_norm > 0 else []
    parts.append(
        optax.adamw(
            schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=lambda p: weight_decay_mask(p, cfg.decay_embeddings),
        )
    )
    return optax.chain(*parts), schedule
