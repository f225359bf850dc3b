"""PEFT's LoRA adapter folders, written and read: adapter_config.json and
adapter_model.safetensors as `peft.PeftModel.from_pretrained` loads them, for sft_jax's
adapters (`sft_jax.lora`). PEFT's tensors are ours flattened: lora_A.weight [r, in],
lora_B.weight [out, r] (torch `nn.Linear` weights, for GPT-2's Conv1D layers too:
`fan_in_fan_out` only changes how PEFT merges); a mixture of experts' adapters on the
stacked expert weights are PEFT's `target_parameters` (ParamWrapper: lora_A [r·E, in]
expert-major, lora_B [out, r·E] with the expert varying fastest). Settings this code cannot
reproduce are refused by name."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np
from etils import epath

from sft_jax.hf import files as hf_files
from sft_jax.hf import sharded as hf_sharded
from sft_jax.lora import (
    LoraSpec,
    Module,
    adapter_sites,
    expert_modules,
    layer_adapter_shapes,
    layer_modules,
    resolve_targets,
    set_path,
    target_names,
)
from sft_jax.model import GPTConfig
from sft_jax.sharding import get_path

_CONFIG = "adapter_config.json"
_WEIGHTS = "adapter_model.safetensors"


def _peft_name(
    cfg: GPTConfig, module: Module, layer: int, which: str, chosen: Sequence[Module] = ()
) -> str:
    """PEFT's tensor name (the adapter name `default` left out, as PEFT saves it). The
    experts' adapters are named after their module (`mlp.experts`), not the parameter:
    with both adapted, PEFT wraps gate_up_proj inside down_proj's wrapper, so gate_up's
    tensors are under `base_layer` (`chosen`: the adapted modules)."""
    block = f"{cfg.names.hf_prefix}{cfg.names.layers}.{layer}"
    name = module.name
    if module.experts:
        nested = module.name.endswith("gate_up_proj") and any(
            m.experts and m.name.endswith("down_proj") for m in chosen
        )
        name = "mlp.experts.base_layer" if nested else "mlp.experts"
    return f"base_model.model.{block}.{name}.lora_{which}.weight"


def _layer_adapters(cfg: GPTConfig, adapters: dict, module: Module, layer: int):
    """(A, B) of one layer as numpy on process 0, (None, None) on the others (collective)."""
    site = next(s for s in adapter_sites(cfg, [module]) if s.layer in (None, layer))
    index = layer if site.layer is None else None  # a stacked leaf, or this layer's own
    a, b = (get_path(adapters, (*site.path, f"lora_{w}")) for w in "ab")
    return hf_sharded.to_host(a, index), hf_sharded.to_host(b, index)


def peft_config(cfg: GPTConfig, spec: LoraSpec, base_model_name_or_path: str = "") -> dict:
    """adapter_config.json of `spec` on `cfg`'s model, as PEFT writes it."""
    chosen = resolve_targets(cfg, spec)
    experts = [m.name for m in chosen if m.experts]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or None,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": target_names(cfg, [m for m in chosen if not m.experts]),
        "target_parameters": experts or None,
        "use_rslora": spec.use_rslora,
        "fan_in_fan_out": cfg.names.hf_kernels == "conv1d",  # GPT-2's Conv1D: W is [in, out]
        "bias": "none",
        "init_lora_weights": True if spec.init == "kaiming" else spec.init,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def write_peft_adapter(
    cfg: GPTConfig, spec: LoraSpec, adapters: dict, out_dir: str, base_model_name_or_path: str = ""
) -> str:
    """A PEFT adapter folder (adapter_config.json, adapter_model.safetensors) that
    `peft.PeftModel.from_pretrained(base, out_dir)` loads. Every process must call it
    (gathering sharded adapters is collective); process 0 writes."""
    out = epath.Path(out_dir)
    tensors: dict[str, np.ndarray] = {}
    chosen = resolve_targets(cfg, spec)
    for m in chosen:
        for i in range(cfg.n_layers):
            a, b = _layer_adapters(cfg, adapters, m, i)
            if a is None:  # not process 0
                continue
            a, b = _to_peft(a.astype(np.float32), b.astype(np.float32), m, spec.rank)
            tensors[_peft_name(cfg, m, i, "A", chosen)] = np.ascontiguousarray(a)
            tensors[_peft_name(cfg, m, i, "B", chosen)] = np.ascontiguousarray(b)
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        hf_files.write_safetensors(tensors, out / _WEIGHTS)
        hf_files.write_json(peft_config(cfg, spec, base_model_name_or_path), out / _CONFIG)
    return out_dir


class PeftAdapter(NamedTuple):
    """A PEFT adapter folder as ours: its spec, adapters (numpy float32) and base model."""

    spec: LoraSpec
    adapters: dict
    base_model_name_or_path: str


# adapter_config.json settings this reader cannot honour, and the value that it can.
_UNSUPPORTED = {
    "use_dora": False,
    "bias": "none",
    "lora_bias": False,
    "modules_to_save": None,
    "layers_to_transform": None,
    "layers_pattern": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "exclude_modules": None,
    "trainable_token_indices": None,
    "layer_replication": None,
}


def _read_peft_config(folder: epath.Path) -> dict:
    path = folder / _CONFIG
    if not path.exists():
        raise ValueError(f"{folder}: no {_CONFIG}; not a PEFT adapter folder")
    config = json.loads(path.read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type={config.get('peft_type')!r}; only LORA is supported")
    for key, ok in _UNSUPPORTED.items():
        if config.get(key, ok) not in (ok, None, [], {}):
            raise ValueError(f"{path}: {key}={config[key]!r} is not supported (want {ok!r})")
    return config


def _expert_targets(cfg: GPTConfig, config: dict, path) -> tuple[Module, ...]:
    """The experts' modules an adapter folder's `target_parameters` adapts. PEFT also lists
    a mixture of experts' router there (["gate.weight"]: its tensors are a dense layer's,
    read as such); anything else is refused by name."""
    router = f"{cfg.names.router}.weight" if cfg.n_experts else None
    experts = {m.name.rsplit(".", 1)[1]: m for m in expert_modules(cfg)}
    chosen, others = [], []
    for p in config.get("target_parameters") or []:
        proj = p.rsplit(".", 1)[-1]
        if p.endswith(f"experts.{proj}") and proj in experts:
            chosen.append(experts[proj])
        elif not (router and p.endswith(router)):
            others.append(p)
    if others:
        valid = [m.name for m in experts.values()] + ([router] if router else [])
        raise ValueError(
            f"{path}: target_parameters={others} is not supported: sft_jax adapts "
            f"{', '.join(valid) or 'no parameters'} of a {cfg.family} model"
        )
    return tuple(m for m in experts.values() if m in chosen)


def _read_weights(folder: epath.Path) -> dict[str, np.ndarray]:
    path = folder / _WEIGHTS
    if not path.exists():
        found = ", ".join(sorted(p.name for p in folder.iterdir()))
        raise ValueError(
            f"{folder}: no {_WEIGHTS} (found: {found}); save the adapter with "
            "safe_serialization=True (PEFT's default)"
        )
    from safetensors.numpy import load

    return load(path.read_bytes())


def _adapted_layers(cfg: GPTConfig, module: Module, tensors: dict, chosen=()) -> list[bool]:
    return [_peft_name(cfg, module, i, "A", chosen) in tensors for i in range(cfg.n_layers)]


def _present_modules(
    cfg: GPTConfig, tensors: dict, folder, experts: tuple[Module, ...] = ()
) -> tuple[Module, ...]:
    """The layers the folder adapts (every block, or it is refused); unknown tensors too.
    `experts`: the experts' modules its config names (their tensors' names do not say
    which parameter they adapt)."""
    present = []
    for m in layer_modules(cfg):
        if m.experts and m not in experts:
            continue
        layers = _adapted_layers(cfg, m, tensors, experts)
        if any(layers) and not all(layers):
            missing = [i for i, there in enumerate(layers) if not there]
            raise ValueError(f"{folder}: {m.name} is adapted in some layers but not {missing}")
        if all(layers):
            present.append(m)
    known = {
        _peft_name(cfg, m, i, w, present)
        for m in present
        for i in range(cfg.n_layers)
        for w in "AB"
    }
    unknown = sorted(set(tensors) - known)
    if unknown:
        raise ValueError(
            f"{folder}: tensors {unknown[:4]} are not LoRA adapters of a {cfg.family} block's "
            f"dense layers ({', '.join(m.name for m in layer_modules(cfg))})"
        )
    if not present:
        raise ValueError(f"{folder}: no LoRA tensors for a {cfg.family} model")
    return tuple(present)


def _to_peft(a: np.ndarray, b: np.ndarray, module: Module, rank: int):
    """Ours A [*in, r], B [r, *out] → PEFT's lora_A [r, in], lora_B [out, r]; an experts'
    adapter (A [experts, in, r], B [experts, r, out]) → lora_A [r·experts, in], expert-
    major, and lora_B [out, r·experts], the expert varying fastest (PEFT's ParamWrapper)."""
    if module.experts:
        return a.transpose(0, 2, 1).reshape(-1, a.shape[1]), b.transpose(2, 1, 0).reshape(
            b.shape[2], -1
        )
    return a.reshape(-1, rank).T, b.reshape(rank, -1).T


def _to_ours(tensors: dict, name: str, shape: tuple[int, ...], experts: bool = False):
    """PEFT's lora_A [r, in] or lora_B [out, r] as ours of `shape` ([*in, r] or [r, *out]);
    an experts' adapter's ([r·E, in], [out, r·E]) as [E, in, r] or [E, r, out]."""
    if experts:
        e = shape[0]
        is_a = name.endswith("lora_A.weight")
        want = (shape[2] * e, shape[1]) if is_a else (shape[2], shape[1] * e)
        got = tuple(tensors[name].shape)
        if got != want:
            raise ValueError(f"{name}: shape {got}, expected {want}")
        x = np.asarray(tensors[name], np.float32)
        if is_a:
            return x.reshape(e, shape[2], shape[1]).transpose(0, 2, 1)
        return x.reshape(shape[2], shape[1], e).transpose(2, 1, 0)
    is_a = name.endswith("lora_A.weight")
    rank, rest = (shape[-1], math.prod(shape[:-1])) if is_a else (shape[0], math.prod(shape[1:]))
    want = (rank, rest) if is_a else (rest, rank)
    got = tensors[name].shape
    if tuple(got) != want:
        raise ValueError(f"{name}: shape {tuple(got)}, expected {want} (r={rank})")
    return np.asarray(tensors[name], np.float32).T.reshape(shape)


def check_same_adapter(cfg: GPTConfig, found: LoraSpec, spec: LoraSpec, folder: str) -> None:
    """Fail, naming the `lora.*` key, where the adapter folder `folder` (read as `found`)
    is not what `spec` describes: its rank, scale and adapted layers."""
    for key in ("rank", "alpha", "use_rslora"):
        if getattr(spec, key) != getattr(found, key):
            raise ValueError(
                f"lora.{key}: {getattr(spec, key)!r} in the config, but the adapter folder "
                f"{folder} has {getattr(found, key)!r}; set lora.{key}={getattr(found, key)}"
            )
    if resolve_targets(cfg, spec) != resolve_targets(cfg, found):
        names = ",".join(found.targets)
        raise ValueError(
            f"lora.targets: {','.join(spec.targets)!r} in the config, but the adapter folder "
            f"{folder} adapts {names!r}; set lora.targets={names}"
        )


def read_peft_adapter(folder: str, cfg: GPTConfig) -> PeftAdapter:
    """A PEFT LoRA adapter folder for the model `cfg` (its base) as our spec and adapters
    (stacked per `cfg.scan_layers`). Settings this code cannot reproduce (DoRA, biases,
    per-layer ranks, modules_to_save, some layers only) are refused by name."""
    path = epath.Path(folder)
    config = _read_peft_config(path)
    experts = _expert_targets(cfg, config, path / _CONFIG)
    tensors = _read_weights(path)
    modules = _present_modules(cfg, tensors, folder, experts)
    spec = LoraSpec(
        rank=int(config["r"]),
        alpha=float(config.get("lora_alpha", 8)),
        dropout=float(config.get("lora_dropout") or 0.0),
        targets=tuple(target_names(cfg, modules)),
        use_rslora=bool(config.get("use_rslora", False)),
    )
    adapters: dict = {}
    for m in modules:
        for which, shape in zip("ab", layer_adapter_shapes(cfg, m, spec.rank), strict=True):
            names = [_peft_name(cfg, m, i, which.upper(), modules) for i in range(cfg.n_layers)]
            per_layer = [_to_ours(tensors, name, shape, m.experts) for name in names]
            for site in adapter_sites(cfg, [m]):
                value = np.stack(per_layer) if site.layer is None else per_layer[site.layer]
                set_path(adapters, (*site.path, f"lora_{which}"), value)
    return PeftAdapter(spec, adapters, config.get("base_model_name_or_path") or "")
