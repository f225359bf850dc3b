"""What the 8B–72B full fine-tuning recipes (llama3_8b.py, llama3_70b.py, qwen25_72b.py)
share: bfloat16 compute with float32 parameters and Adam moments, every block
rematerialised, FSDP over all devices, ~1M chat rows packed into 8192-token rows."""

from configs import default


def full_finetune(
    name: str, targets: dict, target: str, init_from: str, architecture: dict, learning_rate: float
):
    """The config of recipe `name` (its file, for messages) on `target`, a key of its
    `targets` table: target → (devices, device, train.batch_size, train.micro_steps).

    `architecture` is the checkpoint's config.json written out, so the plan (and the tests)
    need no hub; with init_from set, training checks that the two agree. The preset gives
    the fields not restated (RoPE, RMSNorm, SwiGLU, no biases unless stated)."""
    if target not in targets:
        raise ValueError(f"configs/{name}:{target}: choose one of {sorted(targets)}")
    _, _, batch_size, micro_steps = targets[target]
    c = default.get_config()
    c.model.init_from = init_from
    c.model.preset = "tiny-llama"
    c.model.architecture.update(architecture)
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
