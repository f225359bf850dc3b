"""The classic recipe: GPT-2 medium fine-tuned on Stanford Alpaca with the Alpaca prompt,
loss on the responses only. Needs a model hub (weights, data) and an accelerator.

    python -m sft_jax.main --config configs/gpt2_alpaca.py --workdir runs/gpt2_alpaca
"""

from configs import default


def get_config():
    c = default.get_config()
    c.model.preset = "gpt2-medium"
    c.model.init_from = "hf:openai-community/gpt2-medium"
    c.model.tokenizer = "gpt2"
    c.model.dtype = "bfloat16"  # compute in bf16, keep float32 master weights
    c.data.train = "hf:tatsu-lab/alpaca"
    c.data.validation = "0.02"
    c.data.format = "alpaca"
    c.data.template = "alpaca"
    c.data.max_seq_len = 512
    c.train.epochs = 3.0
    c.train.batch_size = 64
    c.train.micro_steps = 1
    c.train.log_every = 20
    c.train.eval_every = 200
    c.optim.learning_rate = 2e-5
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 0.0
    c.checkpoint.save_every = 500
    return c
