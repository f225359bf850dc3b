"""Pure train and eval steps, jitted once by `train.py` with shardings and donation.

With LoRA (`model.lora`), the params hold a frozen base and the adapters beside its
kernels (`sft_jax.lora`): gradients are taken with respect to the adapters alone (autodiff
computes none for the base), the optimizer state exists for them alone, and a checkpoint
holds them alone (`saved`), the base coming back from its source (`with_base`).

Gradient accumulation splits the global batch into `micro_steps` micro-batches and sums
gradients of the loss *sum*; the one division by the global loss-token count afterwards
makes loss and gradient exactly those of the whole batch (docs/design.md, "The loss").
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from sft_jax import lora, losses
from sft_jax.model import head_weight, unstack_layers
from sft_jax.model.moe import router_losses

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any
    rng: jax.Array  # base key; each step folds in its step number


def init_state(rng: jax.Array, model: nn.Module, tx: optax.GradientTransformation) -> TrainState:
    """A fresh state. Under `jax.eval_shape` it gives the shapes and logical axis boxes from
    which `sharding.tree_shardings` derives every leaf's sharding."""
    init_rng, state_rng = jax.random.split(rng)
    return state_from_params(init_params(init_rng, model), state_rng, tx, model)


def init_params(rng: jax.Array, model: nn.Module) -> dict:
    """Random parameters of `model` (a GPT), boxed with their logical axis names.

    Unrolled models (scan_layers=False) are initialised in the scanned layout and split
    per layer: XLA then compiles one layer's initialisers instead of n_layers copies, so
    the init's compile time does not grow with depth."""
    tokens = jnp.zeros((1, 8), jnp.int32)
    # Parameters do not depend on the attention kernel: trace the init with the XLA one,
    # which takes any length (TPU splash takes only whole 128-token blocks).
    cfg = dataclasses.replace(model.cfg, attention="xla")
    if cfg.scan_layers:
        return model.clone(cfg=cfg).init(rng, tokens)["params"]
    scanned = dataclasses.replace(cfg, scan_layers=True)
    params = model.clone(cfg=scanned).init(rng, tokens)["params"]
    return unstack_layers(scanned, params)[1]


def random_base(rng: jax.Array, model: nn.Module) -> dict:
    """The frozen base that `init_state(rng, model, …)` gives a LoRA model (unboxed):
    a LoRA run on a random base rebuilds it from its seed."""
    init_rng, _ = jax.random.split(rng)
    base = lora.split(nn.meta.unbox(init_params(init_rng, model)))[0]
    return lora.prepare_base(model.cfg, model.lora, base)


def state_from_params(
    params, rng: jax.Array, tx: optax.GradientTransformation, model: nn.Module | None = None
) -> TrainState:
    """A fresh state around given (e.g. pretrained) params. With LoRA (`model.lora`),
    `params` may be the base alone (fresh adapters join it), and the base is stored as
    LoRA asks (`lora.prepare_base`: its dtype, quantized kernels)."""
    if model is not None and model.lora is not None:
        base, adapters = lora.split(params)
        if not adapters:
            rng, adapter_rng = jax.random.split(rng)
            adapters = nn.meta.unbox(lora.fresh_adapters(model.cfg, model.lora, adapter_rng))
        params = lora.combine(lora.prepare_base(model.cfg, model.lora, base), adapters)
    trained, _ = partition(model, params)
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(trained), rng=rng
    )


def partition(model: nn.Module | None, params) -> tuple[Any, Any]:
    """(trained, frozen) parts of the params: (adapters, base) with LoRA, else (params, None)."""
    if model is None or model.lora is None:
        return params, None
    base, adapters = lora.split(params)
    return adapters, base


def join(trained, frozen):
    """The model's params from `partition`'s parts."""
    return trained if frozen is None else lora.combine(frozen, trained)


def saved(state: TrainState, model: nn.Module) -> TrainState:
    """What a checkpoint holds of `state` (a state, or its shapes or shardings): all of it,
    or with LoRA the adapters (and their optimizer state) without the frozen base."""
    return state.replace(params=partition(model, state.params)[0])


def with_base(saved_state: TrainState, base) -> TrainState:
    """A state restored from a LoRA checkpoint (`saved`) with its frozen base back."""
    return saved_state.replace(params=lora.combine(base, saved_state.params))


def loss_sums(
    params,
    batch: Batch,
    model: nn.Module,
    rng: jax.Array | None = None,
    label_smoothing: float = 0.0,
):
    """(Σ mask·nll, Σ mask) of one (micro-)batch; dropout on when `rng` is given."""
    return _sums(params, batch, model, rng, label_smoothing)[:2]


def _sums(params, batch: Batch, model: nn.Module, rng=None, label_smoothing: float = 0.0):
    """(Σ mask·nll, Σ mask, load-balancing loss, router z-loss) of one (micro-)batch; the
    router losses are 0 for a dense model.

    The logits are never materialised whole: the loss applies the output projection to the
    final hidden states chunk by chunk (`losses.chunked_cross_entropy`), soft-capping them
    there as the model's own logits are (`final_softcap`, Gemma 2)."""
    cfg = model.cfg
    hidden, state = model.apply(
        {"params": params},
        batch["tokens"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
        deterministic=rng is None,
        rngs=None if rng is None else {"dropout": rng},
        method="hidden_states",
        mutable=["intermediates"],  # the router statistics (a dense model sows none)
    )
    loss_sum, count = losses.chunked_cross_entropy(
        hidden,
        head_weight(cfg, params),
        batch["targets"],
        batch["loss_mask"],
        layout=loss_layout(*batch["targets"].shape),
        softcap=cfg.final_softcap,
        label_smoothing=label_smoothing,
    )
    aux = z = jnp.zeros((), jnp.float32)
    if cfg.n_experts:
        aux, z = router_losses(cfg, state["intermediates"])
    return loss_sum, count, aux, z


def _objective(trained, frozen, batch, model, rng, label_smoothing, router_weight):
    """What a micro-batch's gradient is taken of: Σ mask·nll plus `router_weight` × the
    router losses (weighted by their coefficients), and (Σ nll, Σ mask, aux, z) beside."""
    loss_sum, count, aux, z = _sums(join(trained, frozen), batch, model, rng, label_smoothing)
    cfg = model.cfg
    router = cfg.router_aux_loss_coef * aux + cfg.router_z_loss_coef * z
    return loss_sum + router_weight * router, (loss_sum, count, aux, z)


def loss_layout(rows: int, seq: int) -> PartitionSpec | None:
    """How the chunked loss splits a [rows, seq] batch over the mesh in force (None without
    one): rows over the mesh axes the logical rules give "batch" (if they divide the rows),
    positions over the other axes (if they divide the sequence), so that every device
    computes a different part of the loss (the hidden states are the same on every device
    of those other axes, e.g. `tensor`)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return None
    spec = nn.logical_to_mesh_axes(("batch",))[0]
    row_axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
    if rows % math.prod(mesh.shape[a] for a in row_axes):
        row_axes = ()
    seq_axes = tuple(a for a in mesh.axis_names if a not in row_axes and mesh.shape[a] > 1)
    if seq % math.prod(mesh.shape[a] for a in seq_axes):
        seq_axes = ()
    return PartitionSpec(row_axes or None, seq_axes or None)


def _split_micro(batch: Batch, micro_steps: int) -> Batch:
    """[B, T] → [micro_steps, B/micro_steps, T], micro-batch j = rows j, j+k, j+2k …

    Interleaved rather than contiguous: each device's shard of the rows stays on that
    device, so splitting needs no communication."""

    def split(x):
        b = x.shape[0]
        return jnp.swapaxes(x.reshape(b // micro_steps, micro_steps, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    micro_steps: int = 1,
    dropout: bool = False,
    label_smoothing: float = 0.0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a global batch [B, T]. A non-finite loss or gradient leaves the
    state unchanged and reports `finite=False`, so a bad state never exists to be saved."""
    rng = jax.random.fold_in(state.rng, state.step)
    trained, frozen = partition(model, state.params)
    # The router losses are means per micro-batch; the gradient is divided by the global
    # loss-token count at the end, so each micro-batch's is weighted by count / micro_steps
    # to come out as their mean (docs/design.md, "Mixture of experts").
    router_weight = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0) / micro_steps
    grad_fn = jax.value_and_grad(
        lambda trained, mb, mb_rng: _objective(
            trained, frozen, mb, model, mb_rng, label_smoothing, router_weight
        ),
        has_aux=True,
    )

    def micro(carry, xs):
        grads_acc, sums_acc = carry
        mb, i = xs
        (_, sums), grads = grad_fn(trained, mb, jax.random.fold_in(rng, i) if dropout else None)
        grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
        return (grads_acc, jax.tree.map(jnp.add, sums_acc, sums)), None

    if micro_steps == 1:  # no accumulator: a zero-filled float32 copy of the params is not free
        (_, sums), grads = grad_fn(trained, batch, jax.random.fold_in(rng, 0) if dropout else None)
    else:
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trained)
        init = (zeros, (jnp.zeros((), jnp.float32),) * 4)
        micro_batches = _split_micro(batch, micro_steps)
        (grads, sums), _ = jax.lax.scan(micro, init, (micro_batches, jnp.arange(micro_steps)))
    loss_sum, count, aux_sum, z_sum = sums

    denom = jnp.maximum(count, 1.0)
    loss = loss_sum / denom
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, trained)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(carry):
        trained, opt_state = carry
        updates, opt_state = tx.update(grads, opt_state, trained)
        return optax.apply_updates(trained, updates), opt_state

    # A non-finite step keeps the old params and optimizer state (the step still counts).
    # A branch, not a select between new and old: the select would keep both states alive,
    # and XLA copies the whole optimizer state to do it (~0.3 s per GPT-2 step on CPU). Only
    # what the step updates goes through it: a frozen (LoRA) base passes straight by.
    trained, opt_state = jax.lax.cond(
        finite, update, lambda carry: carry, (trained, state.opt_state)
    )
    kept = state.replace(step=state.step + 1, params=join(trained, frozen), opt_state=opt_state)
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "learning_rate": schedule(state.step),
        "tokens": jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32),
        "loss_tokens": count,
        "finite": finite,
    }
    if model.cfg.n_experts:  # logged apart from the LM loss, which they do not enter
        metrics |= {"router_aux_loss": aux_sum / micro_steps, "router_z_loss": z_sum / micro_steps}
    return kept, metrics


def eval_step(params, batch: Batch, *, model: nn.Module) -> dict[str, jax.Array]:
    """Loss sums of one evaluation batch; the caller sums over batches, then divides."""
    loss_sum, count = loss_sums(params, batch, model)
    return {"loss_sum": loss_sum, "loss_tokens": count}
