"""Qwen2.5 72B Instruct, full fine-tuning on about 1M chat rows packed into 8192-token rows:
bfloat16 compute, float32 master weights and Adam moments, every block rematerialised,
parameters and optimizer state sharded over all devices (FSDP).

    # TPU v5p-128 (16 hosts × 4 chips), one process per host:
    python -m sft_jax.main --config configs/qwen25_72b.py:v5p --workdir gs://BUCKET/qwen25_72b
    # 4 nodes × 8 H100 80GB under SLURM, one process per node (no launch flags):
    sbatch launch/slurm.sbatch configs/qwen25_72b.py:h100 /shared/qwen25_72b

FSDP spans all 32 GPUs, across nodes: the float32 weights and Adam moments alone are 16 bytes
per parameter, ~141 GB per GPU if sharded over one node's 8 (fsdp=8, data=4).

Check the memory before paying for the machines (runs on a laptop, no weights needed):

    sft-jax-plan --config configs/qwen25_72b.py:v5p --devices 64 --device v5p
    # the TPU compiler's word: the train step compiled for the slice (libtpu, no TPU):
    sft-jax-plan --config configs/qwen25_72b.py:v5p --topology v5p-128
"""

from configs import recipes

# target → (devices, device, train.batch_size, train.micro_steps): one 8192-token row per
# device and micro-step; sft-jax-plan says each fits, with the headroom tests/test_configs.py
# asserts. On GPUs, JAX takes 75 % of the memory unless told otherwise: run with
# XLA_PYTHON_CLIENT_MEM_FRACTION=0.95.
TARGETS = {
    "v5p": (64, "v5p", 64, 1),  # v5p-128: 64 chips, 95 GiB each
    "h100": (32, "h100-80gb", 32, 1),  # 4 nodes × 8 H100 80GB
}


def get_config(target: str = "v5p"):
    return recipes.full_finetune(
        "qwen25_72b.py",
        TARGETS,
        target,
        init_from="hf:Qwen/Qwen2.5-72B-Instruct",
        learning_rate=5e-6,
        preset="qwen2.5-72b",
    )
