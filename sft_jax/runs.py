"""Open a training run from its workdir: model config, tokenizer and params of a checkpoint,
without the optimizer state. Used by export and generation tools; `frozen_base` by
training too, to resume a LoRA run.

A LoRA run's checkpoints hold only the adapters: its frozen base is rebuilt from the
source its meta records (the pretrained weights, or the random init of its seed) and the
params carry both, the adapters beside their kernels (`Run.lora` says how to apply them)."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from sft_jax import checkpoint as ckpt_lib
from sft_jax import hf, lora, quant, sharding, steps
from sft_jax.data import load_tokenizer
from sft_jax.model import GPT, GPTConfig, LoraLayers
from sft_jax.run_meta import RunMeta


@dataclasses.dataclass
class Run:
    model_cfg: GPTConfig
    params: dict
    tokenizer: object
    meta: RunMeta  # what the run saved next to the state: config, model, tokenizer, base
    step: int
    lora: lora.LoraSpec | None = None  # the adapters in `params`, if a LoRA run
    best: dict | None = None  # the best checkpoint this one names (checkpoint.keep_best)

    @property
    def lora_layers(self) -> LoraLayers | None:
        """What `GPT(model_cfg, lora=…)` and `Generator(…, lora=…)` take."""
        return self.lora.layers(self.model_cfg) if self.lora else None

    def merged_params(self) -> dict:
        """The params with any LoRA adapters merged into the kernels: a plain model."""
        return lora.merged(self.params, self.lora, self.model_cfg)


def load_run(workdir: str, step: int | None = None, best: bool = False) -> Run:
    """The params of checkpoint `step` (default: latest; with `best`, the best by the run's
    `checkpoint.keep_best` metric) of the run in `workdir` (a local path or a gs:// / s3://
    URL), sharded fsdp-style over all devices (each holds its share, as in training), not
    replicated on each."""
    ckpt, step, saved, meta = _open(workdir, step, best)
    cfg, spec = meta.model, meta.lora
    mesh = sharding.make_mesh(fsdp=-1)
    if spec:  # the checkpoint holds the adapters alone
        boxed = lora.abstract_adapters(cfg, spec)
    else:
        tokens = jnp.zeros((1, 1), jnp.int32)
        boxed = jax.eval_shape(GPT(cfg).init, jax.random.key(0), tokens)["params"]
    shardings = sharding.tree_shardings(boxed, mesh)
    target = ckpt_lib.abstract_with_shardings(nn.meta.unbox(boxed), shardings)
    params = ckpt.restore_params(step, target)
    ckpt.close()
    if spec:
        base = frozen_base(
            GPT(cfg, spec.layers(cfg)), mesh, meta.init_from, meta.seed, _allow_pickle(meta)
        )
        params = lora.combine(base, params)
    return _run(workdir, meta, saved, step, params)


def stored_run(workdir: str, step: int | None = None, best: bool = False) -> Run:
    """`load_run`'s run with nothing restored: each params leaf is read from the checkpoint
    when asked for, on this host (`checkpoint.StoredArray`: `x[i]` one layer of a stacked
    leaf, `np.asarray(x)` all of it). A LoRA run's params are the merged model's: each
    adapted kernel is rebuilt and merged (W + scale·A·B) when read, a layer at a time.
    For `hf.save_hf` of a run of any size on one host (`sft-jax-export`)."""
    ckpt, step, saved, meta = _open(workdir, step, best)
    params = ckpt.stored_params(step)
    ckpt.close()
    if meta.lora:
        params = _merged_when_read(meta, params)
    return _run(workdir, meta, saved, step, params)


def _open(workdir: str, step: int | None, best: bool):
    """(checkpointer, step, saved meta, RunMeta) of the checkpoint `load_run` names."""
    ckpt = ckpt_lib.Checkpointer(workdir)
    steps = ckpt.all_steps()
    if not steps:
        raise ValueError(f"{workdir}: no checkpoints under {ckpt.directory}")
    if best:
        step = best_step(ckpt, workdir, step)
    step = steps[-1] if step is None else step
    if step not in steps:
        raise ValueError(f"{workdir}: no checkpoint at step {step}; there are {steps}")
    saved = ckpt.restore_meta(step)
    return ckpt, step, saved, RunMeta.from_json(saved)


def _run(workdir: str, meta: RunMeta, saved: dict, step: int, params: dict) -> Run:
    saved_tokenizer = epath.Path(workdir) / "tokenizer"
    tokenizer = load_tokenizer(str(saved_tokenizer) if saved_tokenizer.is_dir() else meta.tokenizer)
    return Run(
        model_cfg=meta.model,
        params=params,
        tokenizer=tokenizer,
        meta=meta,
        step=step,
        lora=meta.lora,
        best=saved.get("best"),
    )


def _allow_pickle(meta: RunMeta) -> bool:
    return meta.config.get("model", {}).get("allow_pickle", False)


def best_step(ckpt: ckpt_lib.Checkpointer, workdir: str, step: int | None = None) -> int:
    """The step of the best checkpoint that the newest one names (meta["best"])."""
    if step is not None:
        raise ValueError("--best picks the step itself: give --best or --step, not both")
    best = ckpt.restore_meta(ckpt.latest_step()).get("best")
    if not best:
        raise ValueError(
            f"--best: the run in {workdir} names no best checkpoint; it trained without "
            "checkpoint.keep_best (or evaluated no metric it names). Pick one with --step"
        )
    if best["step"] not in ckpt.all_steps():
        raise ValueError(
            f"--best: the best checkpoint of {workdir}, step {best['step']} "
            f"({best['metric']}={best['value']:.6g}), is gone from {ckpt.directory}"
        )
    return best["step"]


def frozen_base(model: GPT, mesh, init_from: str, seed: int, allow_pickle: bool = False) -> dict:
    """The frozen base a LoRA run trains on, as its state stores it (`lora.prepare_base`:
    dtype, quantization), each device holding its shards: `init_from`'s pretrained weights
    (each process reading only its own blocks), or, where `init_from` is "", the random init
    of `seed`: the same function with the same key as the run's init. A LoRA checkpoint
    holds the adapters alone: resume (`train`), export and generation (`load_run`) rebuild
    the base here."""
    cfg = model.cfg
    boxed = lora.split(jax.eval_shape(lambda: steps.init_params(jax.random.key(0), model)))[0]
    # `boxed` as an argument: traced, so prepare_base's astype and quantizers see arrays.
    stored = jax.eval_shape(functools.partial(lora.prepare_base, cfg, model.lora), boxed)
    out_shardings = sharding.tree_shardings(stored, mesh)
    if not init_from:
        random_base = functools.partial(steps.random_base, model=model)
        return jax.jit(random_base, out_shardings=out_shardings)(jax.random.key(seed))
    # Each leaf (each layer of a stacked leaf) stored as it loads, as the run's import did:
    # a QLoRA base is never held in float32 here either.
    _, params = hf.load_hf(
        init_from,
        allow_pickle=allow_pickle,
        param_dtype=cfg.param_dtype,
        scan_layers=cfg.scan_layers,
        shardings=sharding.tree_shardings(boxed, mesh),
        shapes=nn.meta.unbox(boxed),
        transform=lora.load_transform(cfg, model.lora, out_shardings),
    )
    return params


class _WhenRead:
    """A params leaf computed when read, as `checkpoint.StoredArray` is: `x[i]` (layer i
    of a stacked leaf; `read(i)`) or `np.asarray(x)` (`read(None)`)."""

    def __init__(self, shape: tuple[int, ...], dtype, read):
        self.shape, self.dtype, self.ndim, self._read = shape, np.dtype(dtype), len(shape), read

    def __getitem__(self, layer: int) -> np.ndarray:
        return self._read(layer)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self._read(None)
        return whole if dtype is None else whole.astype(dtype)


def _merged_when_read(meta: RunMeta, adapters: dict) -> dict:
    """A LoRA run's merged params, each leaf computed when read (`_WhenRead`): the frozen
    base as `frozen_base` rebuilds it (from `init_from`'s files, one tensor at a time; or
    the random init of `seed`, whole and once: a toy run's), dequantized, and each adapted kernel
    merged with its stored adapters (`lora.merged_kernel`)."""
    cfg, spec = meta.model, meta.lora
    model = GPT(cfg, spec.layers(cfg))
    boxed = lora.split(jax.eval_shape(lambda: steps.init_params(jax.random.key(0), model)))[0]
    shapes = nn.meta.unbox(boxed)
    base_leaf = _base_leaves(model, meta)

    def leaf(path, shape):
        keys = tuple(k.key for k in path)
        site = adapters
        for key in keys[:-1] if keys[-1] == "kernel" else ("",):
            site = site.get(key, {})  # {"lora_a", "lora_b"} of an adapted kernel
        experts = _experts_site(cfg, adapters, keys)  # adapters beside stacked expert weights
        stacked = cfg.scan_layers and keys[0] == cfg.names.layers

        def read(layer):
            if layer is not None and not stacked:
                return np.asarray(read(None))[layer]
            if layer is None and stacked:  # init_from's files hold each layer apart
                return np.stack([read(i) for i in range(shape.shape[0])])
            base = base_leaf(keys, shape.shape, layer if stacked else None)
            for name, adapter in experts.items():
                # A stored adapter (`checkpoint.StoredArray`) is read here: whole, or a layer.
                at = (lambda x: np.asarray(x)) if layer is None else (lambda x: x[layer])
                adapter = {w: at(adapter[w]) for w in ("lora_a", "lora_b")}
                delta = lora.expert_deltas(cfg, name, adapter, spec.scale).get(keys[-1])
                if delta is not None:
                    base = (jnp.asarray(base, jnp.float32) + delta).astype(base.dtype)
            if "lora_a" not in site:
                return np.asarray(base)
            # Read from the checkpoint here (`checkpoint.StoredArray`): whole, or one layer.
            a, b = (
                np.asarray(site[w]) if layer is None else site[w][layer]
                for w in ("lora_a", "lora_b")
            )
            return np.asarray(lora.merged_kernel(base, a, b, spec.scale))

        dtype = spec.base_dtype or cfg.param_dtype
        return _WhenRead(tuple(shape.shape), jnp.dtype(dtype), read)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def _experts_site(cfg, adapters: dict, keys: tuple[str, ...]) -> dict:
    """The experts' adapters (`lora.EXPERT_ADAPTERS` → {lora_a, lora_b}) beside the
    stacked expert weight at `keys`, if any."""
    if not cfg.n_experts or len(keys) < 3 or keys[-2] != cfg.names.experts:
        return {}
    node = adapters
    for key in keys[:-1]:
        node = node.get(key, {})
    return {k: v for k, v in node.items() if k in lora.EXPERT_ADAPTERS.values()}


def _base_leaves(model: GPT, meta: RunMeta):
    """f(path, shape, layer) → the frozen base's leaf at `path` (its `layer` of a stacked
    leaf; None: all of it) as `frozen_base` stores it, dequantized."""
    cfg = model.cfg

    @functools.partial(jax.jit, static_argnums=0)
    def prepared(path, value):  # one leaf through lora.prepare_base
        tree: dict = {}
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
        return sharding.get_path(lora.prepare_base(cfg, model.lora, tree), path)

    if meta.init_from:
        read_hf = hf.hf_leaves(meta.init_from, cfg, _allow_pickle(meta))

        def base(path, shape, layer):
            value = read_hf(path, shape, layer)
            value = value[None] if layer is not None else value  # a stack of one layer
            out = quant.dequantize(prepared(path, value))
            return out[0] if layer is not None else out

        return base

    # A random base (no init_from: a toy run's) is rebuilt whole, once, on one device: one
    # compile of the model's init, where one per leaf cost seconds each.
    @functools.lru_cache(maxsize=1)
    def random_base():
        return jax.jit(functools.partial(steps.random_base, model=model))(jax.random.key(meta.seed))

    @functools.lru_cache(maxsize=1)  # the last leaf, read a layer at a time
    def random_leaf(path):
        return quant.dequantize(sharding.get_path(random_base(), path))

    return lambda path, shape, layer: random_leaf(path)[() if layer is None else layer]
