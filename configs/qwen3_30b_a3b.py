"""Qwen3-30B-A3B Instruct (a mixture of experts: 128 experts, 8 per token; 30.5B
parameters, 3.3B active), full fine-tuning on about 1M chat rows packed into 8192-token
rows: bfloat16 compute, float32 master weights and Adam moments, every block
rematerialised, the experts split over the mesh's `expert` axis (expert parallelism), the
rest of the parameters and the optimizer state over fsdp × expert.

    # TPU v5p-64 (8 hosts × 4 chips), one process per host:
    python -m sft_jax.main --config configs/qwen3_30b_a3b.py:v5p --workdir gs://BUCKET/qwen3_moe
    # one node of 8 × H100 80GB, one process:
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python -m sft_jax.main \\
        --config configs/qwen3_30b_a3b.py:h100 --workdir /shared/qwen3_moe

Check the memory before paying for the machines (runs on a laptop, no weights needed):

    sft-jax-plan --config configs/qwen3_30b_a3b.py:v5p --devices 32 --device v5p
    # the TPU compiler's word: the train step compiled for the slice (libtpu, no TPU):
    sft-jax-plan --config configs/qwen3_30b_a3b.py:v5p --topology v5p-64

Each device gathers its expert group's tokens (mesh.expert × its own) and runs them through
the experts it holds (sft_jax.model.moe): the wider the expert axis, the fewer experts per
device and the more tokens in its dispatch buffers. On 8 H100s the float32 weights, Adam
moments and gradients take 57 GiB per GPU, so the expert axis stays at 2 there.
"""

from configs import recipes

# target → (devices, device, train.batch_size, train.micro_steps, mesh.expert,
# data.max_seq_len); sft-jax-plan says each fits, with the headroom tests/test_configs.py
# asserts. 8 H100s hold 16 bytes per parameter with 15 % to spare only without a gradient
# accumulator (micro_steps=1) and at 3072-token rows: 24k tokens per step there.
TARGETS = {
    "v5p": (32, "v5p", 32, 1, 8, 8192),  # v5p-64: 32 chips, 95 GiB each; expert=8 × fsdp=4
    "h100": (8, "h100-80gb", 8, 1, 2, 3072),  # 1 node × 8 H100 80GB; expert=2 × fsdp=4
}


def get_config(target: str = "v5p"):
    c = recipes.full_finetune(
        "qwen3_30b_a3b.py",
        {k: v[:4] for k, v in TARGETS.items()},
        target,
        init_from="hf:Qwen/Qwen3-30B-A3B-Instruct-2507",
        learning_rate=1e-5,
        preset="qwen3-30b-a3b",
    )
    c.mesh.expert, c.data.max_seq_len = TARGETS[target][4:]
    return c
