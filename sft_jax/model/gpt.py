"""The GPT network: embeddings, the stack of blocks (scanned or unrolled), the final norm
and the head; NEFTune noise; unstacking a scanned model's layers."""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from sft_jax.model.blocks import block_class
from sft_jax.model.config import LAYERS_AXIS, GPTConfig
from sft_jax.model.layers import (
    LoraLayers,
    dense_init,
    dense_layer,
    logical_param,
    norm_layer,
    softcap,
)

Array = jax.Array


def _layer(x, i: int):
    """Layer `i` of a stacked leaf; a logical-axes box also drops its leading axis name."""
    if isinstance(x, nn.LogicallyPartitioned):
        return x.replace(value=x.value[i], names=x.names[1:])
    return x[i]


def unstack_layers(cfg: GPTConfig, params: dict) -> tuple[GPTConfig, dict]:
    """The same model with one parameter subtree per layer (`h_0`, `h_1`, …) instead of one
    stacked `h`: slower to compile, but XLA on CPU runs it faster (no per-layer slicing
    of the stacked weights), which matters for token-by-token decoding. `params` may be
    boxed with logical axis names (`nn.LogicallyPartitioned`), as `init` returns them."""
    if not cfg.scan_layers:
        return cfg, params
    name = cfg.names.layers
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
    layers = {
        f"{name}_{i}": jax.tree.map(lambda x, i=i: _layer(x, i), params[name], is_leaf=is_box)
        for i in range(cfg.n_layers)
    }
    rest = {k: v for k, v in params.items() if k != name}
    return dataclasses.replace(cfg, scan_layers=False), rest | layers


class GPT(nn.Module):
    """`GPT(cfg).apply({"params": p}, tokens, positions=…, segment_ids=…)` → float32 logits;
    `method="hidden_states"` → the final norm's output instead. With `lora`, the blocks'
    dense layers it names carry LoRA adapters (`lora_a`, `lora_b` beside their kernels)."""

    cfg: GPTConfig
    lora: LoraLayers | None = None

    def __call__(
        self,
        tokens: Array,
        positions: Array | None = None,
        segment_ids: Array | None = None,
        deterministic: bool = True,
        cache: dict[str, Array] | None = None,
        cache_index: Array | int = 0,
    ):
        """tokens, positions, segment_ids: [batch, seq] int32 → logits [batch, seq, vocab] float32.

        Defaults: positions 0..seq-1 and a single segment (one example per row).
        Decoding: with `cache` (from `init_cache`), the tokens are written to cache slots
        `cache_index …` and attend to every earlier filled slot; returns (logits, new cache)."""
        return self._forward(
            tokens, positions, segment_ids, deterministic, cache, cache_index, logits=True
        )

    def hidden_states(
        self,
        tokens: Array,
        positions: Array | None = None,
        segment_ids: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        """The final norm's output [batch, seq, d_model], for a loss that applies
        `head_weight` itself, chunk by chunk (`losses.chunked_cross_entropy`)."""
        return self._forward(tokens, positions, segment_ids, deterministic, logits=False)

    @nn.compact
    def _forward(
        self, tokens, positions, segment_ids, deterministic, cache=None, cache_index=0, *, logits
    ):
        cfg, names = self.cfg, self.cfg.names
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        decode = layer_caches = None
        if cache is not None:
            key_segments = jax.lax.dynamic_update_slice(
                cache["segment_ids"], segment_ids.astype(jnp.int32), (0, cache_index)
            )
            decode = (key_segments, cache_index)
            layer_caches = (cache["k"], cache["v"])  # [layers, batch, slots, kv_heads, head_dim]

        embed = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            embedding_init=logical_param(dense_init(), "vocab", "embed"),
            dtype=dt,
            param_dtype=pdt,
            name=names.embed,
        )
        x = embed(tokens)  # [batch, seq, d_model]
        if cfg.embed_scale:  # the factor rounded to the compute dtype first, as in HF
            x = x * jnp.asarray(math.sqrt(cfg.d_model), dt)
        if cfg.neftune_alpha > 0 and not deterministic:
            noise = neftune_noise(
                self.make_rng("dropout"), segment_ids, cfg.d_model, cfg.neftune_alpha
            )
            x = (x.astype(jnp.float32) + noise).astype(dt)
        if cfg.positions == "learned":
            wpe = self.param(
                "wpe",
                logical_param(nn.initializers.normal(stddev=0.01), None, "embed"),
                (cfg.max_seq_len, cfg.d_model),
                pdt,
            )
            x = x + jnp.take(wpe, positions, axis=0).astype(dt)
        x = nn.Dropout(cfg.dropout, deterministic=deterministic)(x)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))

        block = block_class(cfg)
        local = cfg.local_layers
        if cfg.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0, "intermediates": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, 0),
                length=cfg.n_layers,
                metadata_params={nn.PARTITION_NAME: LAYERS_AXIS},
            )
            alike = len(set(local)) == 1
            flags = None if alike else jnp.asarray(local)  # [layers] bool, scanned
            x, new_caches = stack(
                cfg, deterministic, local[0] if alike else None, self.lora, name=names.layers
            )(x, positions, segment_ids, decode, layer_caches, flags)
        else:
            outs = []
            for i in range(cfg.n_layers):
                layer = None if cache is None else tuple(c[i] for c in layer_caches)
                x, out = block(cfg, deterministic, local[i], self.lora, name=f"{names.layers}_{i}")(
                    x, positions, segment_ids, decode, layer
                )
                outs.append(out)
            new_caches = (
                None if cache is None else tuple(jnp.stack(c) for c in zip(*outs, strict=True))
            )

        x = norm_layer(cfg, names.final_norm)(x)
        if not logits:
            return x
        if cfg.tie_embeddings:
            out = embed.attend(x)
        else:
            out = dense_layer(cfg, (cfg.vocab_size,), ("embed", "vocab"), False, "lm_head")(x)
        out = nn.with_logical_constraint(out, ("batch", "length", "act_vocab"))
        out = softcap(out.astype(jnp.float32), cfg.final_softcap)
        if cache is None:
            return out
        new_k, new_v = new_caches
        return out, {"k": new_k, "v": new_v, "segment_ids": key_segments}


def segment_lengths(segment_ids: Array) -> Array:
    """[batch, seq] → [batch, seq]: at each position, the token count of its segment in
    its row (packed examples are segments 1, 2, …; padding is segment 0)."""

    def row(ids: Array) -> Array:
        counts = jnp.zeros(ids.shape[0] + 1, jnp.int32).at[ids].add(1)
        return counts[ids]

    return jax.vmap(row)(segment_ids.astype(jnp.int32))


def neftune_scale(segment_ids: Array, d_model: int, alpha: float) -> Array:
    """[batch, seq] → [batch, seq] float32: NEFTune's noise bound alpha/sqrt(L·d_model) at
    each token, L the length of the token's own example (its segment), 0 on padding.

    Each example's own length, so an example packed with others gets the noise it would
    get alone; scaling by the packed row's length (as trainers that hook the embedding's
    output do) would shrink it by the square root of the packing factor."""
    lengths = segment_lengths(segment_ids).astype(jnp.float32)
    bound = alpha / jnp.sqrt(jnp.maximum(lengths, 1.0) * d_model)
    return jnp.where(segment_ids > 0, bound, 0.0)


def neftune_noise(rng: Array, segment_ids: Array, d_model: int, alpha: float) -> Array:
    """NEFTune's noise for token embeddings [batch, seq, d_model] (Jain et al. 2023,
    transformers' `neftune_post_forward_hook`): U(-1, 1)·`neftune_scale`, float32."""
    uniform = jax.random.uniform(rng, (*segment_ids.shape, d_model), jnp.float32, -1.0, 1.0)
    return uniform * neftune_scale(segment_ids, d_model, alpha)[..., None]


def head_weight(cfg: GPTConfig, params) -> Array:
    """The output projection as [vocab, d_model]: the tied embedding or lm_head's kernel."""
    if cfg.tie_embeddings:
        return params[cfg.names.embed]["embedding"]
    return params["lm_head"]["kernel"].T
