"""LoRA (Hu et al., 2021) on sft_jax's models, as PEFT does it: the spec, its targets, the
adapters' init, the frozen base's storage and the merge (PEFT's adapter folders, written
and read: `sft_jax.peft_adapter`).

A LoRA adapter on a dense layer with kernel W [*in, *out] adds two float32 matrices,
A [*in, r] and B [r, *out]: the layer computes x·W + scale·(x·A)·B with
scale = alpha / r (alpha / √r with rsLoRA). Our kernels keep head structure, and so do the
adapters: q_proj's kernel is [d_model, heads, head_dim], its A [d_model, r] and its
B [r, heads, head_dim], so B shards over heads as the kernel does (the rank axis,
`lora_rank`, is replicated). PEFT's tensors are the same numbers flattened:
lora_A.weight [r, in], lora_B.weight [out, r] (torch `nn.Linear` weights, for GPT-2's
Conv1D layers too: `fan_in_fan_out` only changes how PEFT merges).

The adapters are a tree that mirrors the params down to each adapted layer, with a leading
layers axis when `scan_layers` is on:
`{"layers": {"self_attn": {"q_proj": {"lora_a": [layers, d_model, r],
"lora_b": [layers, r, heads, head_dim]}}}}`.

Targets are the dense layers of a block, named as PEFT names them (`target_modules`): a name
matches every layer whose HF module name ends with it, so GPT-2's `c_proj` is both the
attention's and the MLP's (`attn.c_proj`, `mlp.c_proj` pick one), and `all-linear` is every
dense layer of every block (not the head), as in PEFT.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from sft_jax import hf, quant
from sft_jax.matmul import lora_output  # noqa: F401  (re-exported: the adapter's output)
from sft_jax.model import GPT, LORA_RANK_AXIS, GPTConfig, LoraLayers, unstack_layers
from sft_jax.model.moe import EXPERT_ADAPTERS
from sft_jax.sharding import get_path

Array = jax.Array

ALL_LINEAR = "all-linear"
RANK_AXIS = LORA_RANK_AXIS  # the logical name of the rank axis: replicated on every mesh
ADAPTER_LEAVES = ("lora_a", "lora_b")  # the adapters' names beside each adapted kernel
INITS = ("kaiming", "gaussian")  # PEFT's init_lora_weights=True and ="gaussian"
QUANTIZE = ("", "nf4", "int8")
_DEFAULT_ALPHA = 16.0


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """What LoRA a run trains: the `lora.*` config keys. Frozen: a static jit argument."""

    rank: int = 0  # 0: no LoRA (full fine-tuning)
    alpha: float = _DEFAULT_ALPHA
    dropout: float = 0.0  # on the adapter's input, training only (PEFT's lora_dropout)
    targets: tuple[str, ...] = (ALL_LINEAR,)
    use_rslora: bool = False  # scale alpha / √rank instead of alpha / rank
    init: str = "kaiming"  # A: "kaiming" uniform (PEFT's default) or "gaussian"; B is zero
    quantize: str = ""  # the frozen base's block kernels: "nf4", "int8" or "" (QLoRA)
    double_quant: bool = True  # nf4: the block scales quantized too
    base_dtype: str = ""  # the frozen base's float dtype; "" = the model's param_dtype

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"lora.rank: {self.rank!r} must be an integer ≥ 0 (0 = off)")
        if self.rank == 0 and self.alpha != _DEFAULT_ALPHA:
            raise ValueError(
                f"lora.alpha: set to {self.alpha} but lora.rank is 0 (LoRA off); set "
                "lora.rank > 0 to train adapters, or leave lora.alpha unset"
            )
        if self.rank and not self.alpha > 0:
            raise ValueError(f"lora.alpha: {self.alpha!r} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout: {self.dropout!r} must be in [0, 1)")
        if self.init not in INITS:
            raise ValueError(f"lora.init: {self.init!r} is not one of {', '.join(INITS)}")
        if not self.targets:
            raise ValueError(f"lora.targets: empty; name dense layers or {ALL_LINEAR!r}")
        if self.quantize not in QUANTIZE:
            raise ValueError(
                f"lora.quantize: {self.quantize!r} is not one of {', '.join(map(repr, QUANTIZE))}"
            )
        if self.base_dtype not in ("", "float32", "bfloat16", "float16"):
            raise ValueError(
                f"lora.base_dtype: {self.base_dtype!r}; use '', float32, bfloat16 or float16"
            )
        if not self.rank and (self.quantize or self.base_dtype):
            key = "lora.quantize" if self.quantize else "lora.base_dtype"
            raise ValueError(f"{key}: set, but lora.rank is 0 (no frozen base); set lora.rank")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        """The factor on the adapter's output: alpha / r, or alpha / √r with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def layers(self, cfg: GPTConfig) -> LoraLayers | None:
        """What the model `cfg` needs to carry these adapters (None when LoRA is off)."""
        if not self.enabled:
            return None
        chosen = resolve_targets(cfg, self)
        if self.dropout and any(m.experts for m in chosen):
            raise ValueError(
                f"lora.dropout={self.dropout}: adapters on the experts' stacked weights take no "
                "dropout (nor do PEFT's target_parameters); set lora.dropout=0 or leave "
                "gate_up_proj and down_proj out of lora.targets"
            )
        paths = frozenset(m.path for m in chosen)
        gaussian = self.init == "gaussian"
        return LoraLayers(
            self.rank,
            self.scale,
            self.dropout,
            gaussian,
            paths,
            self.quantize,
            self.double_quant,
            self.base_dtype,
        )

    @classmethod
    def from_config(cls, c: Any) -> LoraSpec:
        """From the config's `lora` block (a ConfigDict or dict); missing keys take the
        defaults. `targets` may be a comma-separated string ("q_proj,v_proj")."""
        get = c.get if hasattr(c, "get") else lambda k, d: getattr(c, k, d)
        defaults = cls()
        targets = get("targets", defaults.targets)
        if isinstance(targets, str):
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        return cls(
            rank=int(get("rank", defaults.rank)),
            alpha=float(get("alpha", defaults.alpha)),
            dropout=float(get("dropout", defaults.dropout)),
            targets=tuple(targets),
            use_rslora=bool(get("use_rslora", defaults.use_rslora)),
            init=str(get("init", defaults.init)),
            quantize=str(get("quantize", defaults.quantize)),
            double_quant=bool(get("double_quant", defaults.double_quant)),
            base_dtype=str(get("base_dtype", defaults.base_dtype)),
        )


# --------------------------------------------------------------------------- targets


@dataclasses.dataclass(frozen=True)
class Module:
    """One dense layer of a block that LoRA can adapt."""

    name: str  # its HF module name within a layer: "self_attn.q_proj", "mlp.c_proj"
    path: tuple[str, ...]  # our path to it within a layer: ("self_attn", "q_proj")
    in_dims: int  # how many leading kernel dims are the matmul's input
    # A mixture of experts' stacked expert weights (PEFT's `target_parameters`, e.g.
    # "mlp.experts.gate_up_proj"): adapters per expert, A [experts, in, r], B [experts, r,
    # out], beside the experts' weights (`model.moe`).
    experts: bool = False

    @property
    def short_name(self) -> str:
        return self.name.rsplit(".", 1)[-1]


def layer_modules(cfg: GPTConfig) -> tuple[Module, ...]:
    """Every dense layer of a block, in HF's order, from the conversion table (`hf.tensors`),
    so each family's names come from `model.FAMILIES` like the rest of the conversion."""
    modules: dict[str, Module] = {}
    for t in hf.tensors(cfg):
        entry = t.entry
        if "{i}" not in entry.hf_name or entry.layout not in ("linear", "conv1d"):
            continue  # top-level tensors (embeddings, head), norms and biases
        name = entry.hf_name.split("{i}.", 1)[1].removesuffix(".weight")
        modules.setdefault(name, Module(name, entry.path[:-1], entry.in_dims))
    return tuple(modules.values()) + expert_modules(cfg)


def expert_modules(cfg: GPTConfig) -> tuple[Module, ...]:
    """The stacked expert weights PEFT adapts as parameters, by transformers' in-memory
    names (`mlp.experts.gate_up_proj`: gate and up fused, as transformers 5 holds them for
    every MoE family; `mlp.experts.down_proj`)."""
    if not cfg.n_experts:
        return ()
    names = cfg.names
    return tuple(
        Module(f"mlp.experts.{proj}", (names.moe, names.experts, EXPERT_ADAPTERS[proj]), 1, True)
        for proj in ("gate_up_proj", "down_proj")
    )


def _matches(module: Module, target: str) -> bool:
    """PEFT's rule for a `target_modules` list: the module name is the target or ends
    with "." + target."""
    return module.name == target or module.name.endswith("." + target)


def valid_targets(cfg: GPTConfig) -> list[str]:
    """The names `lora.targets` takes for this family: each layer's own name, its qualified
    name where that name is shared (GPT-2's `attn.c_proj`, `mlp.c_proj`), and all-linear."""
    modules = layer_modules(cfg)
    shorts = list(dict.fromkeys(m.short_name for m in modules))
    shared = [m.name for m in modules if sum(m.short_name == s.short_name for s in modules) > 1]
    return shorts + shared + [ALL_LINEAR]


def resolve_targets(cfg: GPTConfig, spec: LoraSpec) -> tuple[Module, ...]:
    """The dense layers `spec.targets` names, in HF's order; an unknown name is an error
    listing the valid ones."""
    modules = layer_modules(cfg)
    if ALL_LINEAR in spec.targets:
        # PEFT's all-linear: gpt-oss's router (with its bias) and experts are not among them.
        names = cfg.names
        if cfg.family != "gpt_oss":
            return modules
        return tuple(m for m in modules if m.path != (names.moe, names.router) and not m.experts)
    unknown = [t for t in spec.targets if not any(_matches(m, t) for m in modules)]
    if unknown:
        raise ValueError(
            f"lora.targets: {', '.join(map(repr, unknown))} is not a dense layer of the "
            f"{cfg.family} family; valid: {', '.join(valid_targets(cfg))}"
        )
    return tuple(m for m in modules if any(_matches(m, t) for t in spec.targets))


def target_names(cfg: GPTConfig, chosen: Sequence[Module]) -> list[str]:
    """The fewest names that select exactly `chosen` (PEFT's `target_modules`): a layer's
    own name where every layer of that name is chosen, else its qualified name."""
    modules = layer_modules(cfg)
    chosen_names = {m.name for m in chosen}
    names: list[str] = []
    for m in modules:
        if m.name not in chosen_names:
            continue
        if m.experts:  # PEFT's target_parameters: full names ("mlp.experts.down_proj")
            names.append(m.name)
            continue
        namesakes = {s.name for s in modules if s.short_name == m.short_name}
        name = m.short_name if namesakes <= chosen_names else m.name
        if name not in names:
            names.append(name)
    return names


# --------------------------------------------------------------------------- adapters


class _Site(NamedTuple):
    """Where one adapted layer's adapters live: the module, its path in the params (the
    kernel's parent), and its layer index, or None for a stack of all layers."""

    module: Module
    path: tuple[str, ...]
    layer: int | None


def adapter_sites(cfg: GPTConfig, modules: Sequence[Module]) -> Iterator[_Site]:
    layers = cfg.names.layers
    for m in modules:
        if cfg.scan_layers:
            yield _Site(m, (layers, *m.path), None)
        else:
            for i in range(cfg.n_layers):
                yield _Site(m, (f"{layers}_{i}", *m.path), i)


def set_path(tree: dict, path: Sequence[str], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _is_adapter(path) -> bool:
    return getattr(path[-1], "key", path[-1]) in ADAPTER_LEAVES


def split(params: dict) -> tuple[dict, dict]:
    """(base, adapters): the params without the adapters, and the adapters alone (the tree
    down to each adapted layer's `lora_a` and `lora_b`). Boxed leaves stay boxed."""
    base: dict = {}
    adapters: dict = {}

    def leaf(path, x):
        keys = tuple(getattr(k, "key", k) for k in path)
        set_path(adapters if _is_adapter(keys) else base, keys, x)

    jax.tree_util.tree_map_with_path(leaf, params, is_leaf=_is_leaf)
    return base, adapters


def combine(base: dict, adapters: dict) -> dict:
    """The params of the adapted model: `base` with each layer's adapters beside its kernel
    (the inverse of `split`)."""
    out = dict(base)
    for key, value in adapters.items():
        out[key] = combine(base[key], value) if key in base else value
    return out


def _is_leaf(x) -> bool:
    return isinstance(x, nn.meta.AxisMetadata) or quant.is_quantized(x)


def fresh_adapters(cfg: GPTConfig, layers: LoraLayers, key: Array) -> dict:
    """Fresh adapters as the model initialises them (`model.Dense`), boxed with their
    logical axis names, per `cfg.scan_layers`. Initialised in the scanned layout (one
    layer's initialisers to compile); only the adapters' initialisers survive compilation:
    XLA drops the base's, whose values are not returned."""
    model = GPT(dataclasses.replace(cfg, scan_layers=True, attention="xla"), layers)
    params = model.init(key, jnp.zeros((1, 1), jnp.int32))["params"]
    if not cfg.scan_layers:
        params = unstack_layers(model.cfg, params)[1]
    return split(params)[1]


def _boxed_adapters(cfg: GPTConfig, spec: LoraSpec, key: Array) -> dict:
    if not spec.enabled:
        raise ValueError("lora.rank: 0 (LoRA off) has no adapters to initialise")
    return fresh_adapters(cfg, spec.layers(cfg), key)


@functools.lru_cache(maxsize=16)
def abstract_adapters(cfg: GPTConfig, spec: LoraSpec) -> dict:
    """The adapters' shapes, boxed with their logical axis names (from `eval_shape`)."""
    return jax.eval_shape(functools.partial(_boxed_adapters, cfg, spec), jax.random.key(0))


def adapter_axes(cfg: GPTConfig, spec: LoraSpec) -> dict:
    """The adapters' tree with each leaf the tuple of its logical axis names: the kernel's,
    with `lora_rank` (replicated) for the rank: A ("layers", "embed", "lora_rank"),
    B ("layers", "lora_rank", "heads", "head_dim") for q_proj."""
    return jax.tree.map(
        lambda box: tuple(box.names), abstract_adapters(cfg, spec), is_leaf=_is_leaf
    )


@functools.partial(jax.jit, static_argnums=(0, 1))
def init_adapters(cfg: GPTConfig, spec: LoraSpec, key: Array) -> dict:
    """Fresh float32 adapters as PEFT makes them (the model's own initialisers,
    `model.Dense`): A Kaiming-uniform (torch's `kaiming_uniform_(a=√5)`: U(±1/√fan_in),
    fan_in = the layer's input size), or normal with std 1/r ("gaussian"); B zero, so the
    adapted model starts as the base model. Under a caller's jit with `out_shardings`, each
    device makes only its own shards."""
    return nn.meta.unbox(_boxed_adapters(cfg, spec, key))


def prepare_base(cfg: GPTConfig, layers: LoraLayers, base: dict) -> dict:
    """The frozen base as LoRA stores it: every float in `base_dtype`, and with `quantize`
    every block's dense kernels in NF4 or int8 (`sft_jax.quant`; the embeddings, norms and
    head stay float, as in QLoRA). Logical-axis boxes (the abstract state) carry over to
    the quantized parts: the codes and scales keep the kernel's leading axes. A base already
    stored so (`load_transform`'s) is returned as it is."""
    stored = _storer(cfg, layers)

    def leaf(path, x):
        keys = tuple(getattr(k, "key", k) for k in path)
        box = x if isinstance(x, nn.LogicallyPartitioned) else None
        value = box.value if box is not None else x
        if quant.is_quantized(value):  # stored already
            return x
        value = stored(keys, value, box.names if box is not None else None)
        if box is None or quant.is_quantized(value):  # quantized parts carry their own boxes
            return value
        return box.replace(value=value)

    return jax.tree_util.tree_map_with_path(leaf, base, is_leaf=_is_leaf)


def _storer(cfg: GPTConfig, layers: LoraLayers, one_layer: bool = False):
    """f(keys, value, names) → `value` (a leaf of the base at path `keys`, with logical
    axes `names` or None) as LoRA stores it; with `one_layer`, `value` is one layer of a
    stacked leaf and the result that layer of what the whole leaf is stored as."""
    in_dims = {m.path: m.in_dims for m in layer_modules(cfg)}
    stacked = int(cfg.scan_layers and not one_layer)

    def stored(keys, value, names):
        if layers.base_dtype and jnp.issubdtype(value.dtype, jnp.floating):
            value = value.astype(layers.base_dtype)
        block_path = keys[1:-1]  # (attn, q_proj) of (layers, attn, q_proj, kernel)
        if not (layers.quantize and keys[-1] == "kernel" and block_path in in_dims):
            return value
        if one_layer and layers.quantize == "nf4":
            # The whole leaf's NF4 blocks, scales and scale groups are per layer (each keeps
            # the layers axis): this layer's are those of a stack of one.
            q = _quantized(layers, value[None], (), None)
            return jax.tree.map(lambda x: x[0], q)
        contracted = tuple(range(stacked, stacked + in_dims[block_path]))
        return _quantized(layers, value, contracted, names)

    return stored


def load_transform(cfg: GPTConfig, layers: LoraLayers, stored_shardings: dict):
    """`hf.load_hf`'s `transform` that stores the base as `prepare_base` would, leaf by
    leaf as the import places it (one layer of a stacked leaf at a time), so a QLoRA import
    never holds the float base: at most one float tensor beside the stored ones. The result
    equals `prepare_base` of the float import bitwise. `stored_shardings`: the stored base's
    NamedShardings (the state's; a stacked leaf's layers axis unsharded)."""
    whole, per_layer = _storer(cfg, layers), _storer(cfg, layers, one_layer=True)
    jitted: dict = {}

    def transform(path: tuple[str, ...], x: jax.Array):
        path = tuple(path)
        if path not in jitted:
            shardings = get_path(stored_shardings, path)
            one_layer = cfg.scan_layers and path[0] == cfg.names.layers  # a stacked leaf's layer
            if one_layer:  # its sharding: the stacked leaf's without the layers axis
                shardings = jax.tree.map(_drop_first_axis, shardings)
            store = functools.partial(per_layer if one_layer else whole, path)
            jitted[path] = jax.jit(lambda v: store(v, None), out_shardings=shardings)
        return jitted[path](x)

    return transform


def _drop_first_axis(s):
    spec = tuple(s.spec)
    return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(*spec[1:]))


def _quantized(layers: LoraLayers, kernel, contracted: tuple[int, ...], names):
    """`kernel` quantized per `layers.quantize`; with `names` (its logical axes), each part
    boxed with the axes it keeps (the kernel's leading ones; block and group axes None)."""
    if layers.quantize == "int8":
        q = quant.quantize_int8(kernel, in_axes=contracted)
    else:
        q = quant.quantize_nf4(kernel, double_quant=layers.double_quant)
    if names is None:
        return q

    def box(x):
        """The kernel's names over the leading dims x shares with it; then the axis of
        blocks (or groups) cut from the next kernel dim takes that dim's name too: NF4
        blocks run along d_model in o_proj and down_proj, the axis fsdp splits, so the
        blocks must shard where those kernels' rows did."""
        shared = 0
        while shared < min(x.ndim, kernel.ndim) and x.shape[shared] == kernel.shape[shared]:
            shared += 1
        if shared < min(x.ndim, kernel.ndim) and x.shape[shared] > 1:
            shared += kernel.shape[shared] % x.shape[shared] == 0
        return nn.LogicallyPartitioned(x, (*names[:shared], *[None] * (x.ndim - shared)))

    return jax.tree.map(box, q)


def layer_adapter_shapes(cfg: GPTConfig, module: Module, rank: int):
    """(A's shape, B's shape) of one layer's adapters on `module`."""
    spec = LoraSpec(rank=rank, targets=(module.name,))
    site = next(adapter_sites(cfg, [module]))
    lead = 1 if site.layer is None else 0
    node = get_path(abstract_adapters(cfg, spec), site.path)
    return tuple(tuple(node[f"lora_{w}"].value.shape[lead:]) for w in "ab")


def merged_kernel(kernel: Array, lora_a: Array, lora_b: Array, scale: float) -> Array:
    """W + scale·A·B in float32, returned in W's dtype (PEFT's merge). Stacked layers
    (a leading layers axis on all three) merge layer by layer."""
    lead = lora_a.ndim + lora_b.ndim - 2 - kernel.ndim  # 1 for stacked layers, else 0
    rank = lora_a.shape[-1]
    a = jnp.reshape(lora_a, (*lora_a.shape[:lead], -1, rank)).astype(jnp.float32)
    b = jnp.reshape(lora_b, (*lora_b.shape[: lead + 1], -1)).astype(jnp.float32)
    delta = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)  # [*lead, in, out]
    merged = jnp.asarray(kernel, jnp.float32) + scale * delta.reshape(kernel.shape)
    return merged.astype(kernel.dtype)


def merge(params: dict, adapters: dict, spec: LoraSpec, cfg: GPTConfig | None = None) -> dict:
    """The params with every adapted kernel replaced by W + scale·A·B: a plain model that
    computes what the base with adapters computes. `params` is not changed; a quantized
    kernel (QLoRA's base, `sft_jax.quant`) is dequantized first. Adapters on a mixture of
    experts' stacked weights need the model's `cfg` (which weights they fuse)."""
    expert_adapters = set(EXPERT_ADAPTERS.values())

    def walk(p, a):
        if "lora_a" in a:
            base = quant.dequantize(p["kernel"])
            kernel = merged_kernel(base, a["lora_a"], a["lora_b"], spec.scale)
            return {**p, "kernel": kernel}
        out = dict(p)
        for k, v in a.items():
            if k not in expert_adapters:
                out[k] = walk(p[k], v)
            elif cfg is None:
                raise ValueError("lora.merge: adapters on experts need the model's GPTConfig")
            else:
                out.update(_merged_experts(cfg, p, k, v, spec.scale))
        return out

    return walk(params, adapters)


def expert_deltas(cfg: GPTConfig, name: str, adapter: dict, scale: float) -> dict:
    """What one experts' adapter (`name`: a value of `EXPERT_ADAPTERS`) adds to the stacked
    expert weights it changes (`model.moe.expert_mlps`), by weight name: scale·A[e]·B[e]
    in float32, PEFT's fused gate_up split into gate and up where ours are apart (gate
    columns first)."""
    a = jnp.asarray(adapter["lora_a"], jnp.float32)
    b = jnp.asarray(adapter["lora_b"], jnp.float32)
    delta = scale * jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)  # [..., e, in, out]
    names = cfg.names
    if name == EXPERT_ADAPTERS["down_proj"]:
        return {names.expert_out: delta}
    if cfg.expert_mlp == "gpt_oss":
        return {names.expert_in[0]: delta}
    gate, up = names.expert_in
    return {gate: delta[..., : cfg.d_expert], up: delta[..., cfg.d_expert :]}


def _merged_experts(cfg: GPTConfig, weights: dict, name: str, adapter: dict, scale: float):
    """The stacked expert weights one experts' adapter changes, merged (`expert_deltas`)."""
    return {
        k: (jnp.asarray(weights[k], jnp.float32) + d).astype(weights[k].dtype)
        for k, d in expert_deltas(cfg, name, adapter, scale).items()
    }


def merged(params: dict, spec: LoraSpec | None, cfg: GPTConfig | None = None) -> dict:
    """A model's params (adapters beside their kernels, if any) as a plain model's: each
    adapted kernel merged (`merge`), the adapters gone. Without LoRA, `params` as they are."""
    return merge(*split(params), spec, cfg) if spec is not None and spec.enabled else params
