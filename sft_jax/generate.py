"""Generation with a fixed-size KV cache: one prefill of the (left-padded) prompts, then one
jitted step per new token. Greedy, temperature, top-k and top-p sampling, seeded; stops on
end tokens or stop strings; a batch of prompts of different lengths at once.

Left padding puts every prompt's last token in the same cache slot, so all rows decode in
lockstep; padding slots carry segment id 0 and are never attended to, and each row's
positions start at 0 where its prompt starts (the same contract as training).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sft_jax.model import GPT, GPTConfig, LoraLayers, init_cache, unstack_layers

BUCKET = 16  # prompt and cache lengths are rounded up to this: few shapes, few compiles


@dataclasses.dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0


def sample(logits: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
    """Next tokens [batch] from logits [batch, vocab]."""
    if sampling.temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k > 0:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        order = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(order, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        keep = jnp.cumsum(probs, axis=-1) - probs < sampling.top_p
        threshold = jnp.min(jnp.where(keep, order, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _round_up(n: int, k: int = BUCKET) -> int:
    return -(-n // k) * k


@functools.lru_cache(maxsize=8)
def _compiled(cfg: GPTConfig, lora: LoraLayers | None = None):
    """Jitted prefill and decode step for a model config, shared by every Generator of that
    config (before/after-training generation compiles once)."""
    model = GPT(cfg, lora)

    def prefill(params, tokens, positions, segments, cache):
        logits, cache = model.apply(
            {"params": params},
            tokens,
            positions=positions,
            segment_ids=segments,
            cache=cache,
            cache_index=0,
        )
        return logits[:, -1], cache

    def step(params, logits, cache, slot, positions, rng, sampling):
        token = sample(logits, jax.random.fold_in(rng, slot), sampling)
        logits, cache = model.apply(
            {"params": params},
            token[:, None],
            positions=positions[:, None],
            segment_ids=jnp.ones_like(token)[:, None],
            cache=cache,
            cache_index=slot,
        )
        return token, logits[:, 0], cache

    return (
        jax.jit(prefill, donate_argnums=4),
        jax.jit(step, static_argnames="sampling", donate_argnums=2),
    )


class Generator:
    """Decodes for one model and its params; compiled functions are cached per shape."""

    def __init__(
        self,
        cfg: GPTConfig,
        params,
        end_ids: Sequence[int] = (),
        unroll: bool = False,
        lora: LoraLayers | None = None,
    ):
        """`lora`: the params carry these LoRA adapters (`sft_jax.lora`), applied beside
        the base weights in each layer, never merged into them."""
        # Scanned layers by default: one copy of the weights and a short compile. Unrolled
        # (`unroll=True`, a per-layer copy of the weights) decodes batch 1 faster on CPU (no
        # per-layer slicing of the stacked weights) but compiles longer; at batch 8 both
        # are alike.
        self.cfg, params = unstack_layers(cfg, params) if unroll else (cfg, params)
        # On the device once: host (numpy) params, as hf.load_hf gives them, would otherwise
        # be copied over on every decode step.
        self.params = jax.device_put(params)
        self.end_ids = tuple(end_ids)
        self._prefill, self._step = _compiled(self.cfg, lora)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: Sampling = Sampling(),
        stop: Sequence[str] = (),
        tokenizer=None,
        return_logits: bool = False,
        min_width: int = 0,
    ):
        """New token ids per prompt, without the end token. With `stop` strings (needs the
        tokenizer) a row stops once its text contains one; the text is cut there by the
        caller. `return_logits` also returns each step's logits. `min_width`: pad prompts
        to at least this many tokens, so that several calls share one compiled shape."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate: every prompt needs at least one token")
        lengths = np.array([len(p) for p in prompts])
        width = _round_up(max(int(lengths.max()), min_width))
        slots = _round_up(width + sampling.max_new_tokens)
        longest = int(lengths.max()) + sampling.max_new_tokens
        if self.cfg.positions == "learned" and longest > self.cfg.max_seq_len:
            raise ValueError(
                f"generate: prompt ({lengths.max()} tokens) + max_new_tokens "
                f"({sampling.max_new_tokens}) exceed the model's {self.cfg.max_seq_len} positions"
            )
        batch = len(prompts)
        tokens = np.zeros((batch, width), np.int32)
        segments = np.zeros((batch, width), np.int32)
        positions = np.zeros((batch, width), np.int32)
        for b, p in enumerate(prompts):  # left padding: every prompt ends at slot width - 1
            tokens[b, width - len(p) :] = p
            segments[b, width - len(p) :] = 1
            positions[b, width - len(p) :] = np.arange(len(p))
        cache = init_cache(self.cfg, batch, slots)
        logits, cache = self._prefill(self.params, tokens, positions, segments, cache)
        rng = jax.random.key(sampling.seed)
        out: list[list[int]] = [[] for _ in range(batch)]
        done = np.zeros(batch, bool)
        all_logits = []
        for i in range(sampling.max_new_tokens):
            if return_logits:
                all_logits.append(np.asarray(logits))
            token, logits, cache = self._step(
                self.params, logits, cache, width + i, lengths + i, rng, sampling
            )
            for b, t in enumerate(np.asarray(token)):
                if done[b]:
                    continue
                if int(t) in self.end_ids:
                    done[b] = True
                    continue
                out[b].append(int(t))
                if stop and any(s in tokenizer.decode(out[b]) for s in stop):
                    done[b] = True
            if done.all():
                break
        return (out, all_logits) if return_logits else out


def end_token_ids(tokenizer, generation_config: dict | None = None) -> tuple[int, ...]:
    """The tokens that end a response: EOS, and the end-of-turn token of chat templates."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None:
            ids.add(tid)
    eos = (generation_config or {}).get("eos_token_id")
    ids.update([eos] if isinstance(eos, int) else eos or [])
    return tuple(sorted(ids))
