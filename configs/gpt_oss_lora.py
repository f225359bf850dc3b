"""gpt-oss LoRA recipes: gpt-oss-20b on one H100, gpt-oss-120b on one node of 8 H100s.
The base is frozen and stored in bfloat16 (the published MXFP4 experts are dequantized as
they load, `sft_jax.hf.experts`); LoRA adapters (rank 16) on every attention projection,
PEFT's all-linear for gpt-oss; about 1M chat rows packed into 4096-token rows.

    # gpt-oss-20b, 1 × H100 80GB:
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python -m sft_jax.main \\
        --config configs/gpt_oss_lora.py:20b-h100 --workdir /shared/gpt_oss_20b_lora
    # gpt-oss-120b, 1 node × 8 H100 80GB, its 128 experts split 8 ways (mesh.expert=8):
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python -m sft_jax.main \\
        --config configs/gpt_oss_lora.py:120b-h100 --workdir /shared/gpt_oss_120b_lora

Check the memory first: sft-jax-plan --config configs/gpt_oss_lora.py:20b-h100 --devices 1
--device h100-80gb. Attention runs as XLA ops (gpt-oss's sinks are in no fused kernel), so
the rows are 4096 tokens, not 8192: the XLA path's score blocks grow with their square.
"""

from configs import default
from configs.recipes import architecture

# target → (devices, device, train.batch_size, train.micro_steps, preset, mesh.expert).
TARGETS = {
    "20b-h100": (1, "h100-80gb", 8, 8, "gpt-oss-20b", 1),
    "120b-h100": (8, "h100-80gb", 16, 2, "gpt-oss-120b", 8),
}
CHECKPOINTS = {"gpt-oss-20b": "hf:openai/gpt-oss-20b", "gpt-oss-120b": "hf:openai/gpt-oss-120b"}


def get_config(target: str = "20b-h100"):
    if target not in TARGETS:
        raise ValueError(f"configs/gpt_oss_lora.py:{target}: choose one of {sorted(TARGETS)}")
    _, _, batch_size, micro_steps, preset, expert = TARGETS[target]
    c = default.get_config()
    c.model.init_from = CHECKPOINTS[preset]
    c.model.preset = preset
    c.model.architecture.update(architecture(preset))
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.targets = "all-linear"
    c.lora.base_dtype = "bfloat16"
    c.mesh.data, c.mesh.fsdp, c.mesh.expert, c.mesh.tensor = 1, -1, expert, 1
    c.data.train = "hf:allenai/tulu-3-sft-mixture"
    c.data.validation = "0.005"
    c.data.format = "messages"
    c.data.template = "tokenizer"  # gpt-oss's own (harmony) chat template
    c.data.max_seq_len = 4096
    c.train.epochs = 1.0
    c.train.batch_size = batch_size
    c.train.micro_steps = micro_steps
    c.train.eval_every = 500
    c.train.eval_steps = 20
    c.train.progress_bar = False
    c.optim.learning_rate = 2e-4
    c.optim.warmup_steps = 100
    c.optim.decay = "cosine"
    c.checkpoint.save_every = 500
    c.checkpoint.keep = 2
    c.export.adapter_dir = "adapter"
    return c
