"""Open a training run from its workdir: model config, tokenizer and params of a checkpoint,
without the optimizer state. Used by export and generation tools."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from etils import epath

from sft_jax import checkpoint as ckpt_lib
from sft_jax import sharding
from sft_jax.data import load_tokenizer
from sft_jax.model import GPT, GPTConfig


@dataclasses.dataclass
class Run:
    model_cfg: GPTConfig
    params: dict
    tokenizer: object
    meta: dict  # what the run saved next to the state: config, model, tokenizer, template
    step: int


def model_config_from_meta(meta: dict) -> GPTConfig:
    """The GPTConfig a run recorded (runs older than the `family` field included). JSON
    turned tuples into lists; the dataclass wants them back."""
    saved = ckpt_lib.saved_model_fields(meta["model"])
    return GPTConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})


def load_run(workdir: str, step: int | None = None) -> Run:
    """The params of checkpoint `step` (default: latest) of the run in `workdir` (a local
    path or a gs:// / s3:// URL), sharded fsdp-style over all devices (each holds its
    share, as in training), not replicated on each."""
    ckpt = ckpt_lib.Checkpointer(workdir)
    steps = ckpt.all_steps()
    if not steps:
        raise ValueError(f"{workdir}: no checkpoints under {ckpt.directory}")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise ValueError(f"{workdir}: no checkpoint at step {step}; there are {steps}")
    meta = ckpt.restore_meta(step)
    cfg = model_config_from_meta(meta)
    boxed = jax.eval_shape(GPT(cfg).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    shardings = sharding.tree_shardings(boxed["params"], sharding.make_mesh(fsdp=-1))
    target = ckpt_lib.abstract_with_shardings(nn.meta.unbox(boxed)["params"], shardings)
    params = ckpt.restore_params(step, target)
    ckpt.close()
    saved_tokenizer = epath.Path(workdir) / "tokenizer"
    tokenizer = load_tokenizer(
        str(saved_tokenizer) if saved_tokenizer.is_dir() else meta["tokenizer"]
    )
    return Run(model_cfg=cfg, params=params, tokenizer=tokenizer, meta=meta, step=step)
