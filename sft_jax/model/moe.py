"""The mixture-of-experts MLP (Qwen3-MoE, Mixtral, gpt-oss): a router picks
`experts_per_token` of `n_experts` experts for each token, and the token's output is their
outputs weighted.

Dropless by default: every (token, expert) slot is computed. The slots are sorted by expert
so that each expert's rows are contiguous, and one grouped matmul (`grouped_matmul`) runs
each expert's weights over its own rows; no `[tokens, experts, …]` tensor exists. Padding
(segment 0) is routed nowhere: its slots sort past every group and come back as zeros, and
it never counts in the router's statistics.

The router's statistics for the auxiliary losses (per-expert selection counts and softmax
sums over real tokens, the z-loss sum and the token count) are sown into the
"intermediates" collection as one vector per layer (`router_stats`); `router_losses` turns
the sum over layers into transformers' load-balancing loss and the ST-MoE z-loss."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from sft_jax import kernels
from sft_jax.model.config import LORA_RANK_AXIS, GPTConfig
from sft_jax.model.layers import LoraLayers, Sublayer, dense_init, logical_param, swiglu

Array = jax.Array

ROUTER_STATS = "router_stats"


def route(cfg: GPTConfig, logits: Array) -> tuple[Array, Array, Array]:
    """Router logits [tokens, experts] (float32) → (weights [tokens, k], experts [tokens, k],
    the softmax over all experts [tokens, experts]) by the family's rule."""
    probs = jax.nn.softmax(logits, axis=-1)
    k = cfg.experts_per_token
    if cfg.router == "softmax_topk":
        weights, experts = jax.lax.top_k(probs, k)
    else:  # topk_softmax (gpt-oss): the softmax over the k chosen logits only
        top, experts = jax.lax.top_k(logits, k)
        weights = jax.nn.softmax(top, axis=-1)
    if cfg.router_norm_topk:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts, probs


def router_stats(cfg: GPTConfig, logits: Array, experts: Array, probs: Array, real: Array):
    """One layer's statistics over real tokens: [counts (E), softmax sums (E), Σ lse², n]."""
    weight = real.astype(jnp.float32)
    counts = jnp.zeros(cfg.n_experts, jnp.float32).at[experts].add(weight[:, None])
    prob_sums = weight @ probs
    z = weight @ jnp.square(jax.nn.logsumexp(logits, axis=-1))
    return jnp.concatenate([counts, prob_sums, jnp.stack([z, jnp.sum(weight)])])


def router_losses(cfg: GPTConfig, intermediates) -> tuple[Array, Array]:
    """(load-balancing loss, z-loss) from the sown per-layer `router_stats`, summed over
    layers as transformers' `load_balancing_loss_func` pools them: E · Σ_e f_e · P_e with
    f_e the fraction of (layer, token) pairs' choices that went to expert e (each token
    choosing k, so uniform routing gives k) and P_e the mean router probability."""
    e = cfg.n_experts
    leaves = [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(intermediates)
        if any(getattr(k, "key", None) == ROUTER_STATS for k in path)
    ]
    total = sum(jnp.sum(leaf.reshape(-1, 2 * e + 2), axis=0) for leaf in leaves)
    n = jnp.maximum(total[-1], 1.0)
    counts, prob_sums = total[:e] / n, total[e : 2 * e] / n
    return e * jnp.sum(counts * prob_sums), total[2 * e] / n


def _capacity_slots(cfg: GPTConfig, slot_expert: Array, e: int) -> Array:
    """`slot_expert` (ids 0..e-1, e = none) with the slots past each expert's capacity sent
    nowhere: at most ceil(factor · slots / n_experts) slots per expert, the earliest kept."""
    capacity = math.ceil(cfg.moe_capacity_factor * slot_expert.shape[0] / cfg.n_experts)
    order = jnp.argsort(slot_expert, stable=True)
    sizes = jnp.zeros(e + 1, jnp.int32).at[slot_expert].add(1)
    starts = jnp.cumsum(sizes) - sizes
    rank = jnp.arange(slot_expert.shape[0]) - starts[slot_expert[order]]
    keep = jnp.zeros(slot_expert.shape, bool).at[order].set(rank < capacity)
    return jnp.where(keep, slot_expert, e)


def _block_rows(rows: int, groups: int) -> int:
    """Rows per block of the blocked matmul: a power of two near rows / (2·groups), so that
    the padding of each group to whole blocks adds about a quarter of the rows."""
    target = max(8, rows // (2 * groups))
    return min(512, 1 << (target.bit_length() - 1))


def _blocked_matmul(lhs: Array, rhs: Array, group_sizes: Array) -> Array:
    """`ragged_dot` as batched matmuls over blocks of rows that each belong to one group:
    each group's rows are copied into whole blocks (zero-padded), each block is multiplied
    by its group's weights, and the rows are read back. Costs about 1.25× the grouped FLOPs
    and 3× the weights in gathered copies, where XLA:CPU lowers `ragged_dot` to a dense
    matmul over every group (groups × the FLOPs)."""
    m, k = lhs.shape
    g = rhs.shape[0]
    bm = _block_rows(m, g)
    n_blocks = -(-(m + g * (bm - 1)) // bm)
    r = n_blocks * bm
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    padded = (group_sizes + bm - 1) // bm * bm
    padded_ends = jnp.cumsum(padded)
    padded_starts = padded_ends - padded
    i = jnp.arange(m)
    group = jnp.searchsorted(ends, i, side="right")  # g: past every group
    valid = group < g
    group = jnp.minimum(group, g - 1)
    dest = jnp.where(valid, padded_starts[group] + i - starts[group], r)
    blocks = jnp.zeros((r, k), lhs.dtype).at[dest].set(lhs, mode="drop")
    block_group = jnp.searchsorted(padded_ends, jnp.arange(n_blocks) * bm, side="right")
    weights = rhs[jnp.minimum(block_group, g - 1)]  # [blocks, k, n]
    out = jnp.einsum("bmk,bkn->bmn", blocks.reshape(n_blocks, bm, k), weights)
    out = out.reshape(r, -1)[jnp.minimum(dest, r - 1)]
    return jnp.where(valid[:, None], out, 0).astype(lhs.dtype)


def grouped_matmul(lhs: Array, rhs: Array, group_sizes: Array, impl: str = "auto") -> Array:
    """lhs [rows, in] · rhs[g] [in, out] for the g-th contiguous run of `group_sizes[g]`
    rows; rows past the groups give zeros. `impl`: "ragged" (`lax.ragged_dot`), "blocked"
    (`_blocked_matmul`), "auto" (blocked on CPU, ragged elsewhere: the platform traced for,
    `kernels.platform`, so a TPU compile on a CPU host gets ragged)."""
    if impl == "auto":
        impl = "blocked" if kernels.platform() == "cpu" else "ragged"
    group_sizes = group_sizes.astype(jnp.int32)
    if impl == "blocked":
        return _blocked_matmul(lhs, rhs, group_sizes)
    return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=lhs.dtype)


GPT_OSS_ALPHA = 1.702  # gpt-oss's gate: gate·σ(1.702·gate)
# LoRA on the experts (PEFT's target_parameters `mlp.experts.gate_up_proj` and `…down_proj`):
# the adapters' module names beside the experts' weights, and their leaves in `w` below.
EXPERT_ADAPTERS = {"gate_up_proj": "lora_gate_up", "down_proj": "lora_down"}


def expert_mlps(
    cfg: GPTConfig, rows: Array, group_sizes: Array, row_expert: Array, w: dict, scale=0.0
):
    """Rows sorted by expert (`group_sizes` rows each; `row_expert`: each row's expert,
    for the biases) → each row through its own expert's MLP. `w`: the stacked weights,
    named as the family names them (`Experts`), and any LoRA adapters of the experts
    (`lora_gate_up.a` [experts, d_model, r], `….b` [experts, r, 2·d_expert]; `lora_down.*`),
    whose output `scale` multiplies: PEFT's fused gate_up adapter, gate columns first
    (Qwen3-MoE, Mixtral) or interleaved as gpt-oss's weight is."""
    names = cfg.names

    def matmul(x, weight):
        return grouped_matmul(x, weight, group_sizes, cfg.moe_matmul)

    def adapted(x, which: str):
        a, b = w.get(f"{which}.a"), w.get(f"{which}.b")
        return 0.0 if a is None else scale * matmul(matmul(x, a), b)

    gate_up_delta = adapted(rows, EXPERT_ADAPTERS["gate_up_proj"])
    if cfg.expert_mlp == "swiglu":
        gate, up = (matmul(rows, w[n]) for n in names.expert_in)
        if not isinstance(gate_up_delta, float):
            f = cfg.d_expert
            gate, up = gate + gate_up_delta[:, :f], up + gate_up_delta[:, f:]
        h = swiglu(gate, up)
        return matmul(h, w[names.expert_out]) + adapted(h, EXPERT_ADAPTERS["down_proj"])
    # gpt-oss: one biased projection, gate and up interleaved; clamped; biased down.
    (fused,), out = names.expert_in, names.expert_out
    gate_up = matmul(rows, w[fused]) + w[fused + "_bias"][row_expert] + gate_up_delta
    gate, up = gate_up[:, ::2], gate_up[:, 1::2]
    limit = cfg.swiglu_limit
    gate = jnp.minimum(gate, limit)
    up = jnp.clip(up, -limit, limit)
    h = (up + 1) * gate * jax.nn.sigmoid(GPT_OSS_ALPHA * gate)
    down = matmul(h, w[out]) + w[out + "_bias"][row_expert]
    return down + adapted(h, EXPERT_ADAPTERS["down_proj"])


def mix(cfg: GPTConfig, tokens, experts, weights, real, w: dict, first: Array | int = 0, scale=0.0):
    """Σ over each token's slots of weight · expert(token), for the experts held here:
    those of the stacked weights `w` (its leading axis), numbered from `first`. tokens
    [N, d_model]; experts, weights [N, k]; real [N] (padding goes to no expert). Slots of
    other experts give nothing."""
    n, k = experts.shape
    held = next(iter(w.values())).shape[0]
    local = experts - first
    here = real[:, None] & (local >= 0) & (local < held)
    slot_expert = jnp.where(here, local, held).reshape(-1)  # `held`: no expert here
    if cfg.moe_capacity_factor:
        slot_expert = _capacity_slots(cfg, slot_expert, held)
    order = jnp.argsort(slot_expert, stable=True)
    group_sizes = jnp.zeros(held + 1, jnp.int32).at[slot_expert].add(1)[:held]
    row_expert = jnp.minimum(slot_expert[order], held - 1)
    out = expert_mlps(cfg, tokens[order // k], group_sizes, row_expert, w, scale)
    out = jnp.where((slot_expert[order] < held)[:, None], out, 0)  # biases: experts' rows only
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))
    out = out[inverse].reshape(n, k, -1)
    return jnp.einsum("tkd,tk->td", out, weights.astype(out.dtype))


def _expert_parallel(cfg: GPTConfig, mesh, tokens, experts, weights, real, w: dict, scale):
    """`mix` with the experts split over the mesh's `expert` axis: each device gathers the
    tokens of its expert group (all-gather over `expert`), runs them through the experts
    it holds, and the partial outputs are summed back onto the tokens' own devices
    (reduce-scatter). Per layer and device that moves ep × its tokens' d_model values each
    way, where an all-to-all of token slots moves about k × its tokens' (both less
    (ep − 1) / ep): no more for ep ≤ k, with static shapes and no dropped tokens. The
    weights enter whole on the expert axis (gathered over fsdp, as FSDP gathers a layer)."""
    batch = nn.logical_to_mesh_axes(("batch",))[0]
    rows, split = PartitionSpec(batch), PartitionSpec("expert")

    def body(tokens, experts, weights, real, w):
        gathered = [
            jax.lax.all_gather(x, "expert", axis=0, tiled=True)
            for x in (tokens, experts, weights, real)
        ]
        first = jax.lax.axis_index("expert") * next(iter(w.values())).shape[0]
        y = mix(cfg, *gathered, w, first, scale)
        return jax.lax.psum_scatter(y, "expert", scatter_dimension=0, tiled=True)

    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(rows, rows, rows, rows, split),
        out_specs=rows,
    )(tokens, experts, weights, real, w)


def _splits_over_experts(n_tokens: int) -> bool:
    """Whether the mesh in force has an expert axis and `n_tokens` split evenly over the
    batch axes (`_expert_parallel`'s layout). Otherwise (no mesh; a trace of a token or
    two, as an init is) the experts run as `mix` under the compiler's own partitioning:
    the same result."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.shape.get("expert", 1) == 1:
        return False
    batch = nn.logical_to_mesh_axes(("batch",))[0]
    axes = (batch,) if isinstance(batch, str) else tuple(batch or ())
    return n_tokens % math.prod(mesh.shape[a] for a in axes) == 0


class ExpertAdapter(nn.Module):
    """A LoRA adapter per expert on a stacked expert weight [experts, in, out]: A
    [experts, in, r] (Kaiming-uniform over `in`, as PEFT's lora_A; or N(0, 1/r²)), B
    [experts, r, out] zero, float32."""

    experts: int
    features_in: int
    features_out: int
    axes: tuple[str, str]  # the logical names of in and out
    lora: LoraLayers

    @nn.compact
    def __call__(self) -> tuple[Array, Array]:
        lora, axes = self.lora, self.axes
        if lora.gaussian:
            a_init = nn.initializers.normal(stddev=1.0 / lora.rank)
        else:
            a_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", 1, 2, (0,))
        a = self.param(
            "lora_a",
            logical_param(a_init, "expert", axes[0], LORA_RANK_AXIS),
            (self.experts, self.features_in, lora.rank),
            jnp.float32,
        )
        b = self.param(
            "lora_b",
            logical_param(nn.initializers.zeros, "expert", LORA_RANK_AXIS, axes[1]),
            (self.experts, lora.rank, self.features_out),
            jnp.float32,
        )
        return a, b


class Experts(nn.Module):
    """`n_experts` MLPs, their weights stacked on a leading expert axis (split over the
    mesh's `expert` axis when it has one: `_expert_parallel`): SwiGLU with separate gate,
    up and down weights, or gpt-oss's fused, biased, clamped form; with LoRA adapters on
    the fused gate_up and on down where `lora` names them (`EXPERT_ADAPTERS`)."""

    cfg: GPTConfig
    lora: LoraLayers | None = None

    @nn.compact
    def __call__(self, tokens: Array, experts: Array, weights: Array, real: Array) -> Array:
        cfg, names = self.cfg, self.cfg.names
        e, d, f = cfg.n_experts, cfg.d_model, cfg.d_expert
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)

        def weight(name: str, shape, axes, init=None):
            init = logical_param(init or dense_init(), *axes)
            return self.param(name, init, shape, pdt).astype(dt)

        zeros = nn.initializers.zeros
        if cfg.expert_mlp == "swiglu":
            gate_name, up_name = names.expert_in
            w = {
                gate_name: weight(gate_name, (e, d, f), ("expert", "embed", "mlp")),
                up_name: weight(up_name, (e, d, f), ("expert", "embed", "mlp")),
            }
        else:
            (fused,) = names.expert_in
            w = {
                fused: weight(fused, (e, d, 2 * f), ("expert", "embed", "mlp")),
                fused + "_bias": weight(fused + "_bias", (e, 2 * f), ("expert", "mlp"), zeros),
            }
        out = names.expert_out
        w[out] = weight(out, (e, f, d), ("expert", "mlp", "embed"))
        if cfg.expert_mlp == "gpt_oss":
            w[out + "_bias"] = weight(out + "_bias", (e, d), ("expert", None), zeros)
        shapes = {
            "gate_up_proj": (d, 2 * f, ("embed", "mlp")),
            "down_proj": (f, d, ("mlp", "embed")),
        }
        scale = 0.0
        for proj, name in EXPERT_ADAPTERS.items():
            lora = self.lora and self.lora.on(names.moe, names.experts, name)
            if lora:
                n_in, n_out, axes = shapes[proj]
                a, b = ExpertAdapter(e, n_in, n_out, axes, lora, name=name)()
                w[f"{name}.a"], w[f"{name}.b"], scale = a.astype(dt), b.astype(dt), lora.scale
        if _splits_over_experts(tokens.shape[0]):
            mesh = jax.sharding.get_abstract_mesh()
            return _expert_parallel(cfg, mesh, tokens, experts, weights, real, w, scale)
        return mix(cfg, tokens, experts, weights, real, w, scale=scale)


class MoE(Sublayer):
    """The router and the experts: [batch, seq, d_model] → the same, each token the
    router-weighted sum of its experts' outputs (zeros for padding)."""

    @nn.compact
    def __call__(self, x: Array, segment_ids: Array) -> Array:
        cfg, names = self.cfg, self.cfg.names
        b, t, d = x.shape
        tokens = x.reshape(b * t, d)
        real = segment_ids.reshape(-1) > 0
        router = self.dense((cfg.n_experts,), ("embed", None), cfg.router_bias, names.router)
        logits = router(tokens).astype(jnp.float32)
        weights, experts, probs = route(cfg, logits)
        self.sow("intermediates", ROUTER_STATS, router_stats(cfg, logits, experts, probs, real))
        y = Experts(cfg, self.lora, name=names.experts)(tokens, experts, weights, real)
        return y.reshape(b, t, d)
