"""Open a training run from its workdir: model config, tokenizer and params of a checkpoint,
without the optimizer state. Used by export and generation tools.

A LoRA run's checkpoints hold only the adapters: its frozen base is rebuilt from the
source its meta records (the pretrained weights, or the random init of its seed) and the
params carry both, the adapters beside their kernels (`Run.lora` says how to apply them)."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from etils import epath

from sft_jax import checkpoint as ckpt_lib
from sft_jax import hf, lora, sharding, steps
from sft_jax.data import load_tokenizer
from sft_jax.model import GPT, GPTConfig, LoraLayers


@dataclasses.dataclass
class Run:
    model_cfg: GPTConfig
    params: dict
    tokenizer: object
    meta: dict  # what the run saved next to the state: config, model, tokenizer, template
    step: int
    lora: lora.LoraSpec | None = None  # the adapters in `params`, if a LoRA run

    @property
    def lora_layers(self) -> LoraLayers | None:
        """What `GPT(model_cfg, lora=…)` and `Generator(…, lora=…)` take."""
        return self.lora.layers(self.model_cfg) if self.lora else None

    def merged_params(self) -> dict:
        """The params with any LoRA adapters merged into the kernels: a plain model."""
        return lora.merged(self.params, self.lora)


def lora_spec_from_meta(meta: dict) -> lora.LoraSpec | None:
    saved = meta.get("lora")
    if not saved:
        return None
    return lora.LoraSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})


def model_config_from_meta(meta: dict) -> GPTConfig:
    """The GPTConfig a run recorded (runs older than the `family` field included). JSON
    turned tuples into lists; the dataclass wants them back."""
    saved = ckpt_lib.saved_model_fields(meta["model"])
    return GPTConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})


def load_run(workdir: str, step: int | None = None, best: bool = False) -> Run:
    """The params of checkpoint `step` (default: latest; with `best`, the best by the run's
    `checkpoint.keep_best` metric) of the run in `workdir` (a local path or a gs:// / s3://
    URL), sharded fsdp-style over all devices (each holds its share, as in training), not
    replicated on each."""
    ckpt = ckpt_lib.Checkpointer(workdir)
    steps = ckpt.all_steps()
    if not steps:
        raise ValueError(f"{workdir}: no checkpoints under {ckpt.directory}")
    if best:
        step = best_step(ckpt, workdir, step)
    step = steps[-1] if step is None else step
    if step not in steps:
        raise ValueError(f"{workdir}: no checkpoint at step {step}; there are {steps}")
    meta = ckpt.restore_meta(step)
    cfg = model_config_from_meta(meta)
    spec = lora_spec_from_meta(meta)
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
        params = lora.combine(_lora_base(meta, cfg, spec, mesh), params)
    saved_tokenizer = epath.Path(workdir) / "tokenizer"
    tokenizer = load_tokenizer(
        str(saved_tokenizer) if saved_tokenizer.is_dir() else meta["tokenizer"]
    )
    return Run(model_cfg=cfg, params=params, tokenizer=tokenizer, meta=meta, step=step, lora=spec)


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


def _lora_base(meta: dict, cfg: GPTConfig, spec: lora.LoraSpec, mesh) -> dict:
    """The frozen base a LoRA run trained on, as it stored it (dtype, quantization), each
    device holding its shards of it."""
    model = GPT(cfg, spec.layers(cfg))
    boxed = lora.split(jax.eval_shape(lambda: steps.init_params(jax.random.key(0), model)))[0]
    stored = jax.eval_shape(lambda: lora.prepare_base(cfg, model.lora, boxed))
    out_shardings = sharding.tree_shardings(stored, mesh)
    base = meta.get("base", {})
    if not base.get("init_from"):  # the run's random init: the same function, the same key
        random_base = jax.jit(functools.partial(steps.random_base, model=model),
                              out_shardings=out_shardings)  # fmt: skip
        return random_base(jax.random.key(base["seed"]))
    _, params = hf.load_hf(
        base["init_from"], param_dtype=cfg.param_dtype, scan_layers=cfg.scan_layers,
        shardings=sharding.tree_shardings(boxed, mesh), shapes=nn.meta.unbox(boxed),
    )  # fmt: skip
    prepare = jax.jit(functools.partial(lora.prepare_base, cfg, model.lora),
                      out_shardings=out_shardings)  # fmt: skip
    return prepare(params)
