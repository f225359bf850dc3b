"""A GPT in Flax linen: GPT-2, Llama, Qwen2/3, Mistral and Gemma 2/3 behind one code path.

A config names its `family`, which decides the parameter names (`FAMILIES`: one row per
family, read here and by `hf.py`); the architecture is config fields, not subclasses:

| field            | GPT-2                   | Llama, Qwen2/3, Mistral    | Gemma 2 / 3            |
|------------------|-------------------------|----------------------------|------------------------|
| `positions`      | "learned" (wpe table)   | "rope"                     | "rope"                 |
| `norm`           | "layernorm" (with bias) | "rmsnorm"                  | "rmsnorm", × (1 + w)   |
| `mlp`            | "gelu" (tanh approx.)   | "swiglu"                   | "geglu"                |
| `n_kv_heads`     | = n_heads               | ≤ n_heads (grouped-query)  | ≤ n_heads              |
| `bias`           | True everywhere         | False (`qkv_bias`: Qwen2)  | False                  |
| `qk_norm`        | False                   | True for Qwen3             | True for Gemma 3       |
| `sliding_window` | 0                       | every layer (Mistral v0.1) | local layers; every    |
|                  |                         |                            | `global_every`-th not  |

Gemma also norms the attention and MLP outputs (`sandwich_norms`), scales the embeddings
by sqrt(d_model), scores by `query_pre_attn_scalar`^-1/2, and soft-caps the attention
scores (Gemma 2) and the logits (`final_softcap`; the loss caps its chunks the same way).
Local and global layers differ only in their window and RoPE base: with `scan_layers` a
scanned per-layer flag picks them (one compiled block, the params one stack).

Parameter names mirror the Hugging Face checkpoints of each family (`wte`, `h`, `attn/c_attn`
… for GPT-2; `embed_tokens`, `layers`, `self_attn/q_proj` … for Llama), so weight conversion
is a table of names and reshapes. Every parameter carries logical axis names; the mapping of
those names onto a device mesh lives in `sharding.py` only.

Attention follows the batch contract (docs/design.md, "The batch"): position i attends to
j only if j <= i and both carry the same non-zero segment id, so several examples packed in
one row give the same logits as each example alone. `kernels.attention` turns the segment
ids into whatever mask its implementation takes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sft_jax import kernels, quant
from sft_jax.matmul import dense_matmul, lora_output

Array = jax.Array

# Layers are stacked along this leading axis when `scan_layers` is on.
LAYERS_AXIS = "layers"
LORA_RANK_AXIS = "lora_rank"  # a LoRA adapter's rank: replicated on every mesh


@dataclasses.dataclass(frozen=True)
class Family:
    """The parameter names of one model family. They mirror the family's Hugging Face
    checkpoints: `hf.py` names each tensor `hf_prefix` + its parameter path joined by dots,
    the leaf (`kernel`, `scale`, `embedding`) called `weight` (`lm_head` has no prefix)."""

    embed: str  # the token embedding table
    layers: str  # the scanned stack of blocks; `{layers}_{i}` per layer when unrolled
    norm_1: str  # a block's norm before attention
    attn: str
    qkv: tuple[str, ...]  # one fused [d_model, 3, heads, head_dim] projection, or q, k, v
    attn_out: str
    norm_2: str  # a block's norm before the MLP
    mlp_in: tuple[str, ...]  # the projection into the MLP, or (gate, up) of a gated MLP
    mlp_out: str
    final_norm: str
    hf_prefix: str  # of every HF tensor name but lm_head's
    hf_kernels: str  # "conv1d" (GPT-2's Conv1D: [in, out], as ours) | "linear" ([out, in])
    hf_architecture: str  # config.json's "architectures"
    # Optional parts ("" = the family has none): per-head norms on q and k (under `attn`),
    # and the sandwich norms on the attention output and on the MLP output.
    q_norm: str = ""
    k_norm: str = ""
    attn_out_norm: str = ""
    mlp_out_norm: str = ""


_LLAMA_NAMES = Family(
    embed="embed_tokens",
    layers="layers",
    norm_1="input_layernorm",
    attn="self_attn",
    qkv=("q_proj", "k_proj", "v_proj"),
    attn_out="o_proj",
    norm_2="post_attention_layernorm",
    mlp_in=("gate_proj", "up_proj"),
    mlp_out="down_proj",
    final_norm="norm",
    hf_prefix="model.",
    hf_kernels="linear",
    hf_architecture="LlamaForCausalLM",
)

# Gemma's four norms per block: input_layernorm before attention, post_attention_layernorm
# ON the attention output (not before the MLP, as Llama's of the same name), then
# pre_feedforward_layernorm and post_feedforward_layernorm around the MLP.
_GEMMA_NAMES = dataclasses.replace(
    _LLAMA_NAMES,
    norm_2="pre_feedforward_layernorm",
    attn_out_norm="post_attention_layernorm",
    mlp_out_norm="post_feedforward_layernorm",
    hf_architecture="Gemma2ForCausalLM",
)
_QK_NORMS = dict(q_norm="q_norm", k_norm="k_norm")

FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        embed="wte",
        layers="h",
        norm_1="ln_1",
        attn="attn",
        qkv=("c_attn",),
        attn_out="c_proj",
        norm_2="ln_2",
        mlp_in=("c_fc",),
        mlp_out="c_proj",
        final_norm="ln_f",
        hf_prefix="transformer.",
        hf_kernels="conv1d",
        hf_architecture="GPT2LMHeadModel",
    ),
    "llama": _LLAMA_NAMES,
    "qwen2": dataclasses.replace(_LLAMA_NAMES, hf_architecture="Qwen2ForCausalLM"),
    "qwen3": dataclasses.replace(_LLAMA_NAMES, hf_architecture="Qwen3ForCausalLM", **_QK_NORMS),
    "mistral": dataclasses.replace(_LLAMA_NAMES, hf_architecture="MistralForCausalLM"),
    "gemma2": _GEMMA_NAMES,
    "gemma3": dataclasses.replace(_GEMMA_NAMES, hf_architecture="Gemma3ForCausalLM", **_QK_NORMS),
}


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Architecture and numerics of a GPT. Frozen: safe as a static jit argument."""

    family: str = "gpt2"  # a key of FAMILIES: the parameter names (and the HF model_type)
    vocab_size: int = 50257
    max_seq_len: int = 1024  # longest sequence the positions support
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int = 12
    d_ff: int = 3072
    head_dim: int = 0  # 0 = d_model // n_heads
    positions: str = "learned"  # "learned" | "rope"
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    mlp: str = "gelu"  # "gelu" | "swiglu" | "geglu" (Gemma: gated, tanh GELU)
    bias: bool = True  # biases on every dense layer and norm (GPT-2)
    qkv_bias: bool = False  # biases on q/k/v only (Qwen2); implied by `bias`
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama 3 frequency scaling: (factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings), or () for plain RoPE.
    rope_llama3_scaling: tuple = ()
    dropout: float = 0.0  # residual and embedding dropout (training only)
    # NEFTune (training only): uniform noise of scale alpha/sqrt(L·d_model) on the token
    # embeddings, L each example's own length; 0 = off. `neftune_noise`.
    neftune_alpha: float = 0.0
    dtype: str = "float32"  # compute dtype of matmuls and activations
    param_dtype: str = "float32"  # storage dtype of the parameters
    # Rematerialise in the backward pass: "full" each block, "dots" all but matmul outputs.
    # (Attention never keeps its [seq, keys] probabilities anyway: sft_jax.attention.)
    remat: str = "none"
    scan_layers: bool = True  # one compiled block, scanned: compile time independent of depth
    attention: str = "auto"  # "auto" | "xla" | "splash" (TPU) | "cudnn" (GPU): sft_jax.kernels
    # Qwen3, Mistral, Gemma 2 / 3 (each off by default):
    qk_norm: bool = False  # RMSNorm over head_dim on q and k, before RoPE (Qwen3, Gemma 3)
    norm_plus_one: bool = False  # every norm scales by (1 + w), w initialised to 0 (Gemma)
    sandwich_norms: bool = False  # norms on the attention and MLP outputs too (Gemma 2 / 3)
    embed_scale: bool = False  # embeddings × sqrt(d_model), in the compute dtype (Gemma)
    query_pre_attn_scalar: float = 0.0  # scores × its -1/2 power; 0 = head_dim (Gemma)
    attn_softcap: float = 0.0  # attention scores → cap·tanh(score / cap); 0 = off (Gemma 2)
    final_softcap: float = 0.0  # logits → cap·tanh(logit / cap); 0 = off (Gemma 2)
    sliding_window: int = 0  # local layers see the last `sliding_window` keys; 0 = none
    global_every: int = 0  # with a window, every N-th layer is global (Gemma 2: 2, Gemma 3: 6);
    # 0 = every layer local (Mistral)
    rope_local_theta: float = 0.0  # RoPE base of local layers, unscaled; 0 = rope_theta (Gemma 3)
    rope_linear_factor: float = 1.0  # linear RoPE scaling of global layers (Gemma 3 4B+)

    def __post_init__(self):
        _check(self.family in FAMILIES, "family", self.family)
        _check(self.positions in ("learned", "rope"), "positions", self.positions)
        _check(self.norm in ("layernorm", "rmsnorm"), "norm", self.norm)
        _check(self.mlp in ("gelu", "swiglu", "geglu"), "mlp", self.mlp)
        _check(self.remat in ("none", "full", "dots"), "remat", self.remat)
        _check(self.neftune_alpha >= 0, "neftune_alpha", self.neftune_alpha)
        _check(self.attention in kernels.IMPLEMENTATIONS, "attention", self.attention)
        names = FAMILIES[self.family]
        if len(names.mlp_in) != (1 if self.mlp == "gelu" else 2):
            raise ValueError(
                f"model: the {self.family} family's MLP names {names.mlp_in} do not fit "
                f"mlp={self.mlp!r}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model: n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if len(names.qkv) == 1 and self.n_kv_heads != self.n_heads:
            raise ValueError(
                f"model: the {self.family} family has no grouped-query attention (one fused "
                "q|k|v projection); set n_kv_heads = n_heads"
            )
        if not self.head_dim and self.d_model % self.n_heads:
            raise ValueError(
                f"model: d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                "set head_dim explicitly"
            )
        self._check_family_parts()
        self._check_attention_fields()

    def _check_family_parts(self) -> None:
        """q/k norms and sandwich norms exist exactly where the family names them."""
        names = FAMILIES[self.family]
        for field, name in (("qk_norm", names.q_norm), ("sandwich_norms", names.attn_out_norm)):
            if getattr(self, field) != bool(name):
                raise ValueError(
                    f"model: {field}={getattr(self, field)} does not fit the {self.family} "
                    f"family, which {'has' if name else 'has no'} such norms; set "
                    f"{field}={bool(name)} or another family"
                )

    def _check_attention_fields(self) -> None:
        for field in ("sliding_window", "global_every", "query_pre_attn_scalar"):
            _check(getattr(self, field) >= 0, field, getattr(self, field))
        for field in ("attn_softcap", "final_softcap", "rope_local_theta"):
            _check(getattr(self, field) >= 0, field, getattr(self, field))
        _check(self.rope_linear_factor > 0, "rope_linear_factor", self.rope_linear_factor)
        if self.global_every and not self.sliding_window:
            raise ValueError(
                f"model: global_every={self.global_every} needs a sliding_window (the other "
                "layers' window); set sliding_window or global_every=0"
            )
        rope_only = ("rope_local_theta", "rope_linear_factor", "rope_llama3_scaling")
        if self.positions != "rope" and any(getattr(self, f) != _DEFAULTS[f] for f in rope_only):
            raise ValueError(f"model: {', '.join(rope_only)} need positions='rope'")
        if self.rope_llama3_scaling and self.rope_linear_factor != 1.0:
            raise ValueError(
                "model: rope_llama3_scaling and rope_linear_factor are two RoPE scalings; set one"
            )

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def names(self) -> Family:
        """This family's parameter names."""
        return FAMILIES[self.family]

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> GPTConfig:
        """A named architecture, optionally with fields replaced (e.g. dtype, remat)."""
        if name not in PRESETS:
            raise ValueError(
                f"model.preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}"
            )
        return dataclasses.replace(PRESETS[name], **overrides)

    @property
    def local_layers(self) -> tuple[bool, ...]:
        """Which layers attend through the sliding window (HF's "sliding_attention"): all
        of them with a window and no `global_every`, else all but every N-th."""
        every = self.global_every
        return tuple(
            bool(self.sliding_window) and not (every and (i + 1) % every == 0)
            for i in range(self.n_layers)
        )

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameter count from the shapes (no arrays allocated)."""
        d, f, hd = self.d_model, self.d_ff, self.dim_per_head
        q, kv = self.n_heads * hd, self.n_kv_heads * hd
        attn = d * (q + 2 * kv) + q * d
        mlp = (2 if self.mlp == "gelu" else 3) * d * f
        norms = (2 if self.bias else 1) * d * (4 if self.sandwich_norms else 2)
        norms += 2 * hd if self.qk_norm else 0
        biases = 0
        if self.bias:
            biases = (q + 2 * kv) + d + f + d
        elif self.qkv_bias:
            biases = q + 2 * kv
        per_layer = attn + mlp + norms + biases
        total = self.n_layers * per_layer + (2 if self.bias else 1) * d
        if include_embeddings:
            total += self.vocab_size * d * (1 if self.tie_embeddings else 2)
            if self.positions == "learned":
                total += self.max_seq_len * d
        elif not self.tie_embeddings:
            total += self.vocab_size * d  # the untied head is a matmul like any other
        return total

    def flops_per_token(self, seq_len: int, frozen_layers: bool = False) -> float:
        """Training FLOPs per token: 6 per matmul weight (forward + backward) plus attention
        scores and values over the keys each query sees (2·2·keys·q_dim per layer, ×3):
        the causal half of the row, or a local layer's window. `frozen_layers` (LoRA's
        frozen base): the blocks' weights take no gradient, 4 per weight (the adapters'
        own FLOPs, 6·r·(in + out) per layer, are left out: under 1% at r = 16)."""
        weights = self.num_params(include_embeddings=False) + self.vocab_size * self.d_model
        if not self.tie_embeddings:
            weights -= self.vocab_size * self.d_model  # already counted as a weight
        matmul = (4 if frozen_layers else 6) * weights
        # Keys per query, on average: half the row under the causal mask, or within the
        # window (all of the first `window` queries' keys, then `window` each).
        w, t = self.sliding_window, seq_len
        local_keys = t / 2 if not w or w >= t else w - w * w / (2 * t)
        keys = sum(local_keys if local else t / 2 for local in self.local_layers)
        attention = 12 * keys * self.n_heads * self.dim_per_head
        return float(matmul + attention)


def _check(ok: bool, field: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"model: invalid {field}={value!r}")


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GPTConfig)}


_GPT2 = dict(
    family="gpt2", positions="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True
)
_ROPE_SWIGLU = dict(positions="rope", norm="rmsnorm", mlp="swiglu", bias=False)
_LLAMA = dict(family="llama", **_ROPE_SWIGLU)
_LLAMA31_ROPE = (8.0, 1.0, 4.0, 8192)  # factor, low and high frequency factors, context
# Gemma 2 and 3: (1 + w) RMSNorms, four per block, GeGLU, embeddings × sqrt(d_model).
_GEMMA = dict(
    positions="rope", norm="rmsnorm", mlp="geglu", bias=False, norm_eps=1e-6,
    norm_plus_one=True, sandwich_norms=True, embed_scale=True, tie_embeddings=True,
)  # fmt: skip

PRESETS: dict[str, GPTConfig] = {
    "gpt2": GPTConfig(**_GPT2),
    "gpt2-medium": GPTConfig(
        d_model=1024, n_layers=24, n_heads=16, n_kv_heads=16, d_ff=4096, **_GPT2
    ),
    "gpt2-large": GPTConfig(
        d_model=1280, n_layers=36, n_heads=20, n_kv_heads=20, d_ff=5120, **_GPT2
    ),
    "gpt2-xl": GPTConfig(d_model=1600, n_layers=48, n_heads=25, n_kv_heads=25, d_ff=6400, **_GPT2),
    "smollm2-135m": GPTConfig(
        vocab_size=49152,
        max_seq_len=8192,
        d_model=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        d_ff=1536,
        norm_eps=1e-5,
        rope_theta=100000.0,
        tie_embeddings=True,
        **_LLAMA,
    ),
    # Published shapes (each model's config.json), for planning and eval_shape tests; the
    # parameter counts are checked against the published ones in tests/test_model.py.
    "qwen3-0.6b": GPTConfig(
        family="qwen3",
        vocab_size=151936,
        max_seq_len=40960,
        d_model=1024,
        n_layers=28,
        n_heads=16,
        n_kv_heads=8,
        d_ff=3072,
        head_dim=128,
        qk_norm=True,
        norm_eps=1e-6,
        rope_theta=1e6,
        tie_embeddings=True,
        **_ROPE_SWIGLU,
    ),
    "qwen3-8b": GPTConfig(
        family="qwen3",
        vocab_size=151936,
        max_seq_len=40960,
        d_model=4096,
        n_layers=36,
        n_heads=32,
        n_kv_heads=8,
        d_ff=12288,
        qk_norm=True,
        norm_eps=1e-6,
        rope_theta=1e6,
        tie_embeddings=False,
        **_ROPE_SWIGLU,
    ),
    # v0.3: no sliding window (v0.1's was 4096: sliding_window=4096 gives that one).
    "mistral-7b": GPTConfig(
        family="mistral",
        vocab_size=32768,
        max_seq_len=32768,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        d_ff=14336,
        norm_eps=1e-5,
        rope_theta=1e6,
        tie_embeddings=False,
        **_ROPE_SWIGLU,
    ),
    "llama3.1-8b": GPTConfig(
        family="llama",
        vocab_size=128256,
        max_seq_len=131072,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        d_ff=14336,
        norm_eps=1e-5,
        rope_theta=500000.0,
        rope_llama3_scaling=_LLAMA31_ROPE,
        tie_embeddings=False,
        **_ROPE_SWIGLU,
    ),
    "llama3.1-70b": GPTConfig(
        family="llama",
        vocab_size=128256,
        max_seq_len=131072,
        d_model=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        d_ff=28672,
        norm_eps=1e-5,
        rope_theta=500000.0,
        rope_llama3_scaling=_LLAMA31_ROPE,
        tie_embeddings=False,
        **_ROPE_SWIGLU,
    ),
    "gemma2-2b": GPTConfig(
        family="gemma2",
        vocab_size=256000,
        max_seq_len=8192,
        d_model=2304,
        n_layers=26,
        n_heads=8,
        n_kv_heads=4,
        d_ff=9216,
        head_dim=256,
        rope_theta=10000.0,
        query_pre_attn_scalar=256,
        attn_softcap=50.0,
        final_softcap=30.0,
        sliding_window=4096,
        global_every=2,
        **_GEMMA,
    ),
    "gemma3-1b": GPTConfig(
        family="gemma3",
        vocab_size=262144,
        max_seq_len=32768,
        d_model=1152,
        n_layers=26,
        n_heads=4,
        n_kv_heads=1,
        d_ff=6912,
        head_dim=256,
        qk_norm=True,
        rope_theta=1e6,
        rope_local_theta=10000.0,
        query_pre_attn_scalar=256,
        sliding_window=512,
        global_every=6,
        **_GEMMA,
    ),
    # The text part of Gemma 3 4B (its vision tower and projector are not imported).
    "gemma3-4b": GPTConfig(
        family="gemma3",
        vocab_size=262208,
        max_seq_len=131072,
        d_model=2560,
        n_layers=34,
        n_heads=8,
        n_kv_heads=4,
        d_ff=10240,
        head_dim=256,
        qk_norm=True,
        rope_theta=1e6,
        rope_local_theta=10000.0,
        rope_linear_factor=8.0,
        query_pre_attn_scalar=256,
        sliding_window=1024,
        global_every=6,
        **_GEMMA,
    ),
    # Tiny models for tests and CPU demos; the GPT-2 one uses the real GPT-2 vocabulary.
    "tiny": GPTConfig(
        max_seq_len=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=256, **_GPT2
    ),
    "tiny-llama": GPTConfig(
        vocab_size=49152,
        max_seq_len=256,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=192,
        tie_embeddings=False,
        **_LLAMA,
    ),
}


# --------------------------------------------------------------------------- layers


def _param(init, *axes: str | None):
    return nn.with_logical_partitioning(init, axes)


def _dense_init():
    return nn.initializers.normal(stddev=0.02)


def gelu(x: Array) -> Array:
    """GPT-2's GELU, the tanh approximation."""
    return jax.nn.gelu(x, approximate=True)


def swiglu(gate: Array, up: Array) -> Array:
    """Llama's gated MLP activation."""
    return jax.nn.silu(gate) * up


def geglu(gate: Array, up: Array) -> Array:
    """Gemma's gated MLP activation: the tanh GELU of the gate times up."""
    return gelu(gate) * up


def softcap(x: Array, cap: float) -> Array:
    """cap · tanh(x / cap) (Gemma's soft cap), x itself for cap = 0."""
    return cap * jnp.tanh(x / cap) if cap else x


def recompute_input(apply: Callable) -> Callable:
    """`apply(module, *inputs)` whose backward pass keeps only the inputs and recomputes the
    rest (the matmul is not repeated: remat drops what the backward pass does not use)."""
    return nn.checkpoint(apply, prevent_cse=False)


def with_recomputed_activation(dense: nn.Module, activation: Callable) -> Callable:
    """`*h ↦ dense(activation(*h))`, an MLP's activation and down projection, with the
    activation recomputed in the backward pass from its inputs rather than kept: the
    kernel's gradient needs activation(h) and the activation's gradient needs h, so without
    this both are kept for every layer (a scan stacks them, [layers, tokens, d_ff] each,
    with their zero fill and copies every step), and autodiff's own intermediates (the
    tanh, the sigmoid) too. The recompute is one elementwise loop."""
    return lambda *h: recompute_input(lambda dense, *h: dense(activation(*h)))(dense, *h)


@dataclasses.dataclass(frozen=True)
class LoraLayers:
    """Which dense layers of a block carry LoRA adapters, and their rank and scale: what
    the model needs of a `lora.LoraSpec` (`LoraSpec.layers(cfg)` builds it). Frozen: the
    model is a static jit argument."""

    rank: int
    scale: float  # alpha / rank (alpha / √rank with rsLoRA)
    dropout: float  # on the adapter's input, in training
    gaussian: bool  # A drawn N(0, 1/rank²) (PEFT's "gaussian"), else Kaiming-uniform
    paths: frozenset[tuple[str, ...]]  # within a block: ("self_attn", "q_proj"), ("mlp", "c_fc")
    # How the frozen base is stored (`lora.prepare_base`); the layers read whatever is there.
    quantize: str = ""  # the blocks' kernels: "nf4", "int8" or "" (floats)
    double_quant: bool = True
    base_dtype: str = ""  # "" = param_dtype

    def on(self, *path: str) -> LoraLayers | None:
        """Itself if the layer at `path` (within a block) is adapted, else None."""
        return self if path in self.paths else None


class Dense(nn.Module):
    """x @ kernel (+ bias). `kernel_axes` names each kernel dimension; `features` may be a
    tuple so a kernel keeps head structure ([d_model, heads, head_dim]) for tensor parallelism.

    With `lora`, the layer adds a LoRA adapter's scale·(x·A)·B (A `lora_a` [*in, r],
    B `lora_b` [r, *out], float32, beside the kernel), the kernel left as it is, so the
    base can be frozen and even stored quantized (a `quant` tensor where the kernel is,
    dequantized here, inside the matmul that uses it)."""

    features: tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    use_bias: bool
    in_dims: int = 1  # how many trailing dims of x are contracted
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Any = None
    lora: LoraLayers | None = None
    deterministic: bool = True  # no adapter dropout (evaluation, generation)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self._kernel(x)
        y = dense_matmul(x.astype(self.dtype), kernel.astype(self.dtype), self.in_dims)
        if self.lora is not None:
            y = y + self._adapter(x.astype(self.dtype))
        if self.use_bias:
            bias_axes = self.kernel_axes[self.in_dims :]
            bias = self.param(
                "bias", _param(nn.initializers.zeros, *bias_axes), self.features, self.param_dtype
            )
            y = y + bias.astype(self.dtype)
        return y

    def _kernel(self, x: Array) -> Array:
        if self.has_variable("params", "kernel"):
            stored = self.get_variable("params", "kernel")
            if quant.is_quantized(stored):
                return quant.dequantize(stored)  # `param` would check its shape, not the codes'
        return self.param(
            "kernel",
            _param(self.kernel_init or _dense_init(), *self.kernel_axes),
            (*x.shape[-self.in_dims :], *self.features),
            self.param_dtype,
        )

    def _adapter(self, x: Array) -> Array:
        lora, in_shape = self.lora, x.shape[-self.in_dims :]
        in_axes, out_axes = self.kernel_axes[: self.in_dims], self.kernel_axes[self.in_dims :]
        if lora.gaussian:
            a_init = nn.initializers.normal(stddev=1.0 / lora.rank)
        else:  # torch's kaiming_uniform_(a=√5), PEFT's default: U(±1/√fan_in)
            in_axis = tuple(range(self.in_dims))
            a_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis, -1)
        a = self.param("lora_a", _param(a_init, *in_axes, LORA_RANK_AXIS),
                       (*in_shape, lora.rank), jnp.float32)  # fmt: skip
        b = self.param("lora_b", _param(nn.initializers.zeros, LORA_RANK_AXIS, *out_axes),
                       (lora.rank, *self.features), jnp.float32)  # fmt: skip
        x = nn.Dropout(lora.dropout, deterministic=self.deterministic)(x)
        return lora_output(x, a, b, lora.scale, self.in_dims)


class Norm(nn.Module):
    """LayerNorm (GPT-2) or RMSNorm (Llama) over the last axis, statistics in float32;
    `plus_one` (Gemma) scales by 1 + w with w initialised to 0."""

    kind: str
    eps: float
    use_bias: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    plus_one: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        x32 = x.astype(jnp.float32)
        if self.kind == "layernorm":
            x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
        scale = self.param("scale", _param(init, "norm"), (d,), self.param_dtype)
        y = y * (scale.astype(jnp.float32) + (1.0 if self.plus_one else 0.0))
        if self.use_bias:
            bias = self.param("bias", _param(nn.initializers.zeros, "norm"), (d,), self.param_dtype)
            y = y + bias.astype(jnp.float32)
        return y.astype(self.dtype)


def _norm(cfg: GPTConfig, name: str) -> Norm:
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    return Norm(cfg.norm, cfg.norm_eps, cfg.bias, dt, pdt, cfg.norm_plus_one, name=name)


def _dense(cfg: GPTConfig, features, kernel_axes, use_bias, name: str, in_dims: int = 1,
           lora: LoraLayers | None = None, deterministic: bool = True):  # fmt: skip
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    return Dense(features, kernel_axes, use_bias, in_dims, dt, pdt, lora=lora,
                 deterministic=deterministic, name=name)  # fmt: skip


class _Sublayer(nn.Module):
    """Attention or MLP: a part of a block whose dense layers may carry LoRA adapters."""

    cfg: GPTConfig
    lora: LoraLayers | None = None
    deterministic: bool = True

    def dense(self, features, kernel_axes, use_bias, name: str, in_dims: int = 1) -> Dense:
        """The dense layer `name` of this part, adapted if `lora` names it."""
        lora = self.lora and self.lora.on(self.name, name)
        return _dense(self.cfg, features, kernel_axes, use_bias, name, in_dims, lora,
                      self.deterministic)  # fmt: skip


def rope_frequencies(cfg: GPTConfig, local: bool = False) -> Array:
    """Inverse frequencies [head_dim // 2] of RoPE, with Llama 3 or linear scaling when
    configured; `local` layers with their own base (`rope_local_theta`) are unscaled."""
    half = cfg.dim_per_head // 2
    if local and cfg.rope_local_theta:
        return 1.0 / (cfg.rope_local_theta ** (jnp.arange(half, dtype=jnp.float32) / half))
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(half, dtype=jnp.float32) / half))
    if not cfg.rope_llama3_scaling:
        return inv_freq / cfg.rope_linear_factor
    factor, low, high, original = cfg.rope_llama3_scaling
    # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return jnp.where(medium, blended, scaled)


def rope(x: Array, positions: Array, inv_freq: Array) -> Array:
    """Rotary embedding, HF Llama convention (rotate the two halves of each head).

    x: [batch, seq, heads, head_dim]; positions: [batch, seq]; inv_freq: [head_dim // 2]."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, seq, half]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


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


def init_cache(cfg: GPTConfig, batch: int, slots: int) -> dict[str, Array]:
    """An empty KV cache for decoding: keys/values per layer and the segment id of each
    slot (0 = empty, never attended to)."""
    shape = (cfg.n_layers, batch, slots, cfg.n_kv_heads, cfg.dim_per_head)
    return {
        "k": jnp.zeros(shape, jnp.dtype(cfg.dtype)),
        "v": jnp.zeros(shape, jnp.dtype(cfg.dtype)),
        "segment_ids": jnp.zeros((batch, slots), jnp.int32),
    }


def _select(local: bool | Array, if_local: Callable, if_global: Callable, *args):
    """if_local(*args) or if_global(*args): chosen while tracing for a Python bool (an
    unrolled layer, or every layer alike), else by `lax.cond` on the scanned flag, which
    compiles both once for the whole scan."""
    if isinstance(local, bool):
        return (if_local if local else if_global)(*args)
    return jax.lax.cond(local, if_local, if_global, *args)


def _rope_frequencies(cfg: GPTConfig, local: bool | Array) -> Array:
    if not cfg.rope_local_theta:
        return rope_frequencies(cfg)
    if isinstance(local, bool):
        return rope_frequencies(cfg, local)
    return jnp.where(local, rope_frequencies(cfg, True), rope_frequencies(cfg))


def _attend(cfg: GPTConfig, local: bool | Array, q, k, v, **kwargs) -> Array:
    """`kernels.attention` with the model's score scale and soft cap, through the sliding
    window on local layers."""
    scale = cfg.query_pre_attn_scalar**-0.5 if cfg.query_pre_attn_scalar else None

    def call(window: int) -> Callable:
        return lambda q, k, v: kernels.attention(
            q, k, v, scale=scale, window=window, softcap=cfg.attn_softcap, **kwargs
        )

    return _select(local, call(cfg.sliding_window), call(0), q, k, v)


class Attention(_Sublayer):
    @nn.compact
    def __call__(self, x: Array, positions: Array, segment_ids: Array, cache=None, local=False):
        """cache: None (training) or (k, v, key_segment_ids, slot) of this layer; then
        returns (out, (k, v)) with this call's keys and values written at `slot`.
        local: whether this layer is local (`_select`: a bool or a traced flag)."""
        cfg, names = self.cfg, self.cfg.names
        hd = cfg.dim_per_head
        if len(names.qkv) == 1:
            # Fused q|k|v as in GPT-2's c_attn, kept as [d_model, 3, heads, head_dim].
            axes = ("embed", "qkv", "heads", "head_dim")
            qkv = self.dense((3, cfg.n_heads, hd), axes, cfg.bias, names.qkv[0])(x)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        else:
            qkv_bias = cfg.bias or cfg.qkv_bias
            q_name, k_name, v_name = names.qkv
            q_axes, kv_axes = ("embed", "heads", "head_dim"), ("embed", "kv_heads", "head_dim")
            q = self.dense((cfg.n_heads, hd), q_axes, qkv_bias, q_name)(x)
            k = self.dense((cfg.n_kv_heads, hd), kv_axes, qkv_bias, k_name)(x)
            v = self.dense((cfg.n_kv_heads, hd), kv_axes, qkv_bias, v_name)(x)
        if cfg.qk_norm:  # over head_dim, per head, before RoPE
            q, k = _norm(cfg, names.q_norm)(q), _norm(cfg, names.k_norm)(k)
        if cfg.positions == "rope":
            inv_freq = _rope_frequencies(cfg, local)
            q, k = rope(q, positions, inv_freq), rope(k, positions, inv_freq)
        q = nn.with_logical_constraint(q, ("batch", "length", "act_heads", None))
        if cache is None:
            out = _attend(cfg, local, q, k, v, segment_ids=segment_ids,
                          implementation=cfg.attention)  # fmt: skip
            new_cache = None
        else:
            cache_k, cache_v, key_segment_ids, slot = cache  # [batch, slots, kv_heads, hd]
            k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, slot, 0, 0))
            v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, slot, 0, 0))
            new_cache = (k, v)
            out = _attend(
                cfg, local, q, k, v, segment_ids=segment_ids, key_segment_ids=key_segment_ids,
                query_offset=slot,
            )  # fmt: skip
        # [batch, seq, heads, head_dim] → [batch, seq, d_model]
        axes = ("heads", "head_dim", "embed")
        out = self.dense((cfg.d_model,), axes, cfg.bias, names.attn_out, in_dims=2)(out)
        return out if cache is None else (out, new_cache)


class MLP(_Sublayer):
    """c_proj(gelu(c_fc(x))) (GPT-2), or down_proj(swiglu(gate_proj(x), up_proj(x))) (Llama;
    geglu for Gemma), with the activation recomputed in the backward pass
    (`with_recomputed_activation`)."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg, names = self.cfg, self.cfg.names

        def into(name: str) -> Array:  # [batch, seq, d_model] → [batch, seq, d_ff]
            h = self.dense((cfg.d_ff,), ("embed", "mlp"), cfg.bias, name)(x)
            return nn.with_logical_constraint(h, ("batch", "length", "act_mlp"))

        down = self.dense((cfg.d_model,), ("mlp", "embed"), cfg.bias, names.mlp_out)
        if cfg.mlp == "gelu":
            (fc,) = names.mlp_in
            return with_recomputed_activation(down, gelu)(into(fc))
        gate, up = names.mlp_in
        activation = swiglu if cfg.mlp == "swiglu" else geglu
        return with_recomputed_activation(down, activation)(into(gate), into(up))


class Block(nn.Module):
    """Pre-norm transformer block (with sandwich norms: the attention and MLP outputs
    normed too, Gemma). Signature fits `nn.scan`: (carry, broadcast…, scanned…) → (carry,
    scanned out): the layer's KV cache goes in and out as a scanned part, and so does the
    flag `local_flag` when layers differ (Gemma's local and global layers: the params stay
    one stack and one block is compiled). `decode`: None (training) or (key_segment_ids,
    slot) of the cache. `local`: this layer's kind when known while tracing (unrolled
    layers, or all alike), None to read `local_flag`."""

    cfg: GPTConfig
    deterministic: bool = True
    local: bool | None = False
    lora: LoraLayers | None = None

    @nn.compact
    def __call__(self, x, positions, segment_ids, decode=None, layer_cache=None, local_flag=None):
        cfg, names = self.cfg, self.cfg.names
        local = self.local if self.local is not None else local_flag
        drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
        h = _norm(cfg, names.norm_1)(x)
        attention = Attention(cfg, self.lora, self.deterministic, name=names.attn)
        new_cache = None
        if layer_cache is None:
            h = attention(h, positions, segment_ids, local=local)
        else:
            h, new_cache = attention(h, positions, segment_ids, (*layer_cache, *decode), local)
        if cfg.sandwich_norms:
            h = _norm(cfg, names.attn_out_norm)(h)
        x = x + drop(h)
        h = MLP(cfg, self.lora, self.deterministic, name="mlp")(_norm(cfg, names.norm_2)(x))
        if cfg.sandwich_norms:
            h = _norm(cfg, names.mlp_out_norm)(h)
        x = x + drop(h)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        return x, new_cache


def _block_class(cfg: GPTConfig):
    if cfg.remat == "none":
        return Block
    policy = None if cfg.remat == "full" else jax.checkpoint_policies.checkpoint_dots
    # Arguments 1.. (positions, segment ids, cache) and `deterministic` are not differentiated.
    return nn.remat(Block, policy=policy, prevent_cse=not cfg.scan_layers)


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
            embedding_init=_param(_dense_init(), "vocab", "embed"),
            dtype=dt,
            param_dtype=pdt,
            name=names.embed,
        )
        x = embed(tokens)  # [batch, seq, d_model]
        if cfg.embed_scale:  # the factor rounded to the compute dtype first, as in HF
            x = x * jnp.asarray(math.sqrt(cfg.d_model), dt)
        if cfg.neftune_alpha > 0 and not deterministic:
            noise = neftune_noise(self.make_rng("dropout"), segment_ids, cfg.d_model,
                                  cfg.neftune_alpha)  # fmt: skip
            x = (x.astype(jnp.float32) + noise).astype(dt)
        if cfg.positions == "learned":
            wpe = self.param(
                "wpe",
                _param(nn.initializers.normal(stddev=0.01), None, "embed"),
                (cfg.max_seq_len, cfg.d_model),
                pdt,
            )
            x = x + jnp.take(wpe, positions, axis=0).astype(dt)
        x = nn.Dropout(cfg.dropout, deterministic=deterministic)(x)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))

        block = _block_class(cfg)
        local = cfg.local_layers
        if cfg.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, 0),
                length=cfg.n_layers,
                metadata_params={nn.PARTITION_NAME: LAYERS_AXIS},
            )
            alike = len(set(local)) == 1
            flags = None if alike else jnp.asarray(local)  # [layers] bool, scanned
            x, new_caches = stack(cfg, deterministic, local[0] if alike else None, self.lora,
                                  name=names.layers)(
                x, positions, segment_ids, decode, layer_caches, flags
            )  # fmt: skip
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

        x = _norm(cfg, names.final_norm)(x)
        if not logits:
            return x
        if cfg.tie_embeddings:
            out = embed.attend(x)
        else:
            out = _dense(cfg, (cfg.vocab_size,), ("embed", "vocab"), False, "lm_head")(x)
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
