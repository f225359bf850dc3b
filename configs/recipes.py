"""What the 8B–72B full fine-tuning recipes (llama3_8b.py, llama3_70b.py, qwen25_72b.py)
share: bfloat16 compute with float32 parameters and Adam moments, every block
rematerialised, FSDP over all devices, ~1M chat rows packed into 8192-token rows."""

import dataclasses

from configs import default
from sft_jax.model.config import PRESETS, GPTConfig


def architecture(preset: str) -> dict:
    """The preset's shape as model.architecture keys: its fields that differ from
    GPTConfig's defaults, numerics left out. Written into a recipe, so that the plan (and
    the tests) need no hub, and so that training with init_from set checks the checkpoint's
    config.json against them."""
    numerics = {"dtype", "param_dtype", "remat", "scan_layers", "dropout", "attention"}
    defaults = {f.name: f.default for f in dataclasses.fields(GPTConfig)}
    fields = dataclasses.asdict(PRESETS[preset])
    return {k: v for k, v in fields.items() if k not in numerics and v != defaults[k]}


def full_finetune(
    name: str, targets: dict, target: str, init_from: str, preset: str, learning_rate: float
):
    """The config of recipe `name` (its file, for messages) on `target`, a key of its
    `targets` table: target → (devices, device, train.batch_size, train.micro_steps).

    `preset` names the checkpoint's architecture (`sft_jax.model.PRESETS`); it is written
    out as model.architecture (`architecture`)."""
    if target not in targets:
        raise ValueError(f"configs/{name}:{target}: choose one of {sorted(targets)}")
    _, _, batch_size, micro_steps = targets[target]
    c = default.get_config()
    c.model.init_from = init_from
    c.model.preset = preset
    c.model.architecture.update(architecture(preset))
    c.model.dtype = "bfloat16"  # compute; parameters and Adam moments stay float32
    c.model.remat = "full"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.data.train = "hf:allenai/tulu-3-sft-mixture"  # ~939k conversations
    c.data.validation = "0.005"
    c.data.format = "messages"
    c.data.template = "tokenizer"  # the model's own chat template
    c.data.max_seq_len = 8192
    c.train.epochs = 2.0
    c.train.batch_size = batch_size
    c.train.micro_steps = micro_steps
    c.train.eval_every = 500
    c.train.eval_steps = 20
    c.train.progress_bar = False
    c.optim.learning_rate = learning_rate
    c.optim.warmup_steps = 200
    c.optim.decay = "linear"
    c.optim.end_learning_rate_ratio = 0.0
    c.checkpoint.save_every = 500
    c.checkpoint.keep = 2
    c.export.hf_dir = "hf"
    return c
