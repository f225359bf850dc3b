"""`GPTConfig`, the architecture and numerics of a model (a frozen dataclass, a static jit
argument), its checks and FLOP counts, and `PRESETS`, the named architectures. No network
here: `hf`, `optim`, `checkpoint` and `memory_plan` read a model's description from this."""

from __future__ import annotations

import dataclasses
from typing import Any

from sft_jax import kernels
from sft_jax.model.families import FAMILIES, Family

# Layers are stacked along this leading axis when `scan_layers` is on.
LAYERS_AXIS = "layers"
LORA_RANK_AXIS = "lora_rank"  # a LoRA adapter's rank: replicated on every mesh


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
    # gpt-oss (each off by default): a bias on the attention output projection, a learned
    # per-head attention sink (a logit every query's softmax includes, whose value it
    # drops), and YaRN RoPE scaling: (factor, beta_fast, beta_slow,
    # original_max_position_embeddings, truncate, attention_factor), or () for none.
    attn_out_bias: bool = False
    attention_sinks: bool = False
    rope_yarn: tuple = ()
    # Mixture of experts (Qwen3-MoE, Mixtral, gpt-oss; off with n_experts=0): every block's MLP is
    # `n_experts` SwiGLU experts of width `d_expert`, `experts_per_token` of them per token
    # (sft_jax.model.moe).
    n_experts: int = 0
    experts_per_token: int = 0
    d_expert: int = 0
    # "softmax_topk": softmax over all experts, then the top k (Qwen3-MoE, Mixtral);
    # "topk_softmax": the top k logits, then a softmax over them (gpt-oss).
    router: str = "softmax_topk"
    router_norm_topk: bool = False  # renormalise the k weights to sum to 1 (Mixtral; Qwen3)
    router_bias: bool = False  # the router's logits have a bias (gpt-oss)
    # "swiglu": silu(gate)·up; "gpt_oss": gate and up interleaved in one biased projection,
    # clamped at ±swiglu_limit (gate only from above), (up + 1)·gate·σ(1.702·gate), a biased
    # down projection.
    expert_mlp: str = "swiglu"
    swiglu_limit: float = 7.0
    # The loss adds coef × the load-balancing loss (Switch / transformers'
    # `load_balancing_loss_func`, over real tokens) and coef × the router z-loss (ST-MoE).
    router_aux_loss_coef: float = 0.0
    router_z_loss_coef: float = 0.0
    # 0 = dropless; else each expert takes at most ceil(factor · tokens · k / n_experts)
    # token slots per layer call, later ones dropped (their weight goes nowhere).
    moe_capacity_factor: float = 0.0
    # The grouped matmul: "ragged" (`lax.ragged_dot`: native on GPU and TPU), "blocked"
    # (row blocks of one expert each, batched: CPU, where ragged_dot is dense), "auto".
    moe_matmul: str = "auto"

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
        self._check_experts()

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

    def _check_experts(self) -> None:
        _check(self.router in ("softmax_topk", "topk_softmax"), "router", self.router)
        _check(self.moe_matmul in ("auto", "ragged", "blocked"), "moe_matmul", self.moe_matmul)
        _check(self.expert_mlp in ("swiglu", "gpt_oss"), "expert_mlp", self.expert_mlp)
        fused = len(FAMILIES[self.family].expert_in) == 1
        if self.n_experts and fused != (self.expert_mlp == "gpt_oss"):
            raise ValueError(
                f"model: expert_mlp={self.expert_mlp!r} does not fit the {self.family} family's "
                "expert weights; gpt_oss's experts are expert_mlp='gpt_oss', the others 'swiglu'"
            )
        for field in ("router_aux_loss_coef", "router_z_loss_coef", "moe_capacity_factor"):
            _check(getattr(self, field) >= 0, field, getattr(self, field))
        has_moe_names = bool(FAMILIES[self.family].experts)
        if not self.n_experts:
            if has_moe_names:
                raise ValueError(
                    f"model: the {self.family} family is a mixture of experts; set n_experts, "
                    "experts_per_token and d_expert"
                )
            return
        if not has_moe_names:
            raise ValueError(
                f"model: n_experts={self.n_experts} but the {self.family} family has no "
                "expert layers; use qwen3_moe or mixtral, or n_experts=0"
            )
        if not 0 < self.experts_per_token <= self.n_experts or self.d_expert <= 0:
            raise ValueError(
                f"model: experts_per_token={self.experts_per_token} must be in 1..n_experts="
                f"{self.n_experts}, and d_expert={self.d_expert} positive"
            )
        if self.mlp != "swiglu":
            raise ValueError(f"model: experts are SwiGLU MLPs; mlp={self.mlp!r} must be 'swiglu'")

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
        rope_only = ("rope_local_theta", "rope_linear_factor", "rope_llama3_scaling", "rope_yarn")
        if self.positions != "rope" and any(getattr(self, f) != _DEFAULTS[f] for f in rope_only):
            raise ValueError(f"model: {', '.join(rope_only)} need positions='rope'")
        scalings = [self.rope_llama3_scaling, self.rope_linear_factor != 1.0, self.rope_yarn]
        if sum(map(bool, scalings)) > 1:
            raise ValueError(
                "model: rope_llama3_scaling, rope_linear_factor and rope_yarn are three RoPE "
                "scalings; set one"
            )
        if self.rope_yarn and len(self.rope_yarn) != 6:
            raise ValueError(
                f"model: rope_yarn={self.rope_yarn} must be (factor, beta_fast, beta_slow, "
                "original_max_position_embeddings, truncate, attention_factor)"
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

    def num_params(self, include_embeddings: bool = True, active: bool = False) -> int:
        """Parameter count from the shapes (no arrays allocated). `active`: a mixture of
        experts counts the `experts_per_token` experts a token uses, not all of them."""
        d, f, hd = self.d_model, self.d_ff, self.dim_per_head
        q, kv = self.n_heads * hd, self.n_kv_heads * hd
        attn = d * (q + 2 * kv) + q * d
        mlp = (2 if self.mlp == "gelu" else 3) * d * f
        if self.n_experts:  # the router, then each expert's gate, up and down
            experts = self.experts_per_token if active else self.n_experts
            expert = 3 * d * self.d_expert
            if self.expert_mlp == "gpt_oss":  # and their biases
                expert += 2 * self.d_expert + d
            mlp = (d + self.router_bias) * self.n_experts + experts * expert
        norms = (2 if self.bias else 1) * d * (4 if self.sandwich_norms else 2)
        norms += 2 * hd if self.qk_norm else 0
        biases = 0
        if self.bias:
            biases = (q + 2 * kv) + d + f + d
        elif self.qkv_bias:
            biases = q + 2 * kv
        biases += d if self.attn_out_bias and not self.bias else 0
        biases += self.n_heads if self.attention_sinks else 0
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
        a mixture of experts counts its active weights (the experts a token uses)
        the causal half of the row, or a local layer's window. `frozen_layers` (LoRA's
        frozen base): the blocks' weights take no gradient, 4 per weight (the adapters'
        own FLOPs, 6·r·(in + out) per layer, are left out: under 1% at r = 16)."""
        weights = self.num_params(include_embeddings=False, active=True)
        weights += self.vocab_size * self.d_model
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
    positions="rope",
    norm="rmsnorm",
    mlp="geglu",
    bias=False,
    norm_eps=1e-6,
    norm_plus_one=True,
    sandwich_norms=True,
    embed_scale=True,
    tie_embeddings=True,
)

# gpt-oss-20b and -120b differ only in depth and experts (20.9B, 3.6B active; 116.8B,
# 5.1B active): attention sinks, q/k/v/o biases, alternating 128-token windows, YaRN.
_GPT_OSS = dict(
    family="gpt_oss",
    vocab_size=201088,
    max_seq_len=131072,
    d_model=2880,
    n_heads=64,
    n_kv_heads=8,
    d_ff=2880,
    head_dim=64,
    positions="rope",
    norm="rmsnorm",
    mlp="swiglu",
    bias=False,
    qkv_bias=True,
    attn_out_bias=True,
    attention_sinks=True,
    tie_embeddings=False,
    norm_eps=1e-5,
    rope_theta=150000.0,
    rope_yarn=(32.0, 32.0, 1.0, 4096, False, 0.0),
    sliding_window=128,
    global_every=2,
    experts_per_token=4,
    d_expert=2880,
    router="topk_softmax",
    router_bias=True,
    expert_mlp="gpt_oss",
    router_aux_loss_coef=0.001,
)

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
    # Qwen2.5-72B(-Instruct): the 72B recipe's model (configs/qwen25_72b.py).
    "qwen2.5-72b": GPTConfig(
        family="qwen2",
        vocab_size=152064,
        max_seq_len=32768,
        d_model=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        d_ff=29568,
        qkv_bias=True,
        norm_eps=1e-6,
        rope_theta=1e6,
        tie_embeddings=False,
        **_ROPE_SWIGLU,
    ),
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
    # Mixtures of experts (each model's config.json): Qwen3-30B-A3B (30.5B, 3.3B active),
    # Mixtral 8x7B (46.7B, 12.9B active).
    "qwen3-30b-a3b": GPTConfig(
        family="qwen3_moe",
        vocab_size=151936,
        max_seq_len=40960,
        d_model=2048,
        n_layers=48,
        n_heads=32,
        n_kv_heads=4,
        d_ff=6144,
        head_dim=128,
        qk_norm=True,
        norm_eps=1e-6,
        rope_theta=1e6,
        tie_embeddings=False,
        n_experts=128,
        experts_per_token=8,
        d_expert=768,
        router_norm_topk=True,
        router_aux_loss_coef=0.001,
        **_ROPE_SWIGLU,
    ),
    "mixtral-8x7b": GPTConfig(
        family="mixtral",
        vocab_size=32000,
        max_seq_len=32768,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        d_ff=14336,
        norm_eps=1e-5,
        rope_theta=1e6,
        tie_embeddings=False,
        n_experts=8,
        experts_per_token=2,
        d_expert=14336,
        router_norm_topk=True,
        router_aux_loss_coef=0.02,
        **_ROPE_SWIGLU,
    ),
    "gpt-oss-20b": GPTConfig(n_layers=24, n_experts=32, **_GPT_OSS),
    "gpt-oss-120b": GPTConfig(n_layers=36, n_experts=128, **_GPT_OSS),
    # Tiny models for tests and CPU demos; the GPT-2 one uses the real GPT-2 vocabulary.
    "tiny": GPTConfig(
        max_seq_len=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=256, **_GPT2
    ),
    # A small Qwen3-MoE for tests, CPU demos and the benchmark: 8 experts, 2 per token.
    "tiny-moe": GPTConfig(
        family="qwen3_moe",
        vocab_size=49152,
        max_seq_len=2048,
        d_model=512,
        n_layers=4,
        n_heads=8,
        n_kv_heads=4,
        d_ff=1024,
        head_dim=64,
        qk_norm=True,
        norm_eps=1e-6,
        rope_theta=1e6,
        tie_embeddings=True,
        n_experts=8,
        experts_per_token=2,
        d_expert=1024,
        router_norm_topk=True,
        router_aux_loss_coef=0.001,
        **_ROPE_SWIGLU,
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
