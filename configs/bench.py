"""Benchmark config for `tools/benchmark.py`: GPT-2 (124M) at batch 4 × 512, float32, on
real packed rows of the Alpaca sample (the generated tasks when the sample is absent).

    python tools/benchmark.py --config configs/bench.py --steps 3 --compare-torch
    python tools/benchmark.py --config configs/bench.py --steps 3 --compare-torch \
        --config.model.preset=smollm2-135m
    python tools/benchmark.py --config configs/bench.py --compare-padding \
        --config.train.batch_size=8 --config.data.max_seq_len=1024

Override the model preset, the batch and the sequence length like any training run:
`--config.model.preset=…`, `--config.train.batch_size=…`, `--config.data.max_seq_len=…`.
"""

import os

from configs import default

# The 999-row Alpaca sample shipped next to the repository (CC BY-NC 4.0, for measurements;
# see its README). Without it, generated tasks: shorter examples, the same code path.
ALPACA_SAMPLE = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "alpaca_en_demo.json"
)


def get_config():
    c = default.get_config()
    c.model.preset = "gpt2"
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    # The tokenizer: the preset's. SmolLM2's lives on the hub, so the benchmark falls back to
    # the offline GGUF asset's copy of it (tools/benchmark.py) when this is "".
    c.model.tokenizer = ""
    sample = os.path.normpath(ALPACA_SAMPLE)
    c.data.train = sample if os.path.isfile(sample) else "synthetic:mix:2000"
    c.data.validation = ""  # the benchmark never evaluates
    c.data.max_seq_len = 512
    c.data.packing = True
    c.train.batch_size = 4
    c.train.micro_steps = 1
    c.train.steps = 100  # only sizes the learning-rate schedule; the tool runs --steps
    c.train.progress_bar = False
    c.optim.learning_rate = 1e-5  # small: timed steps must not diverge into non-finite values
    c.optim.warmup_steps = 0
    c.optim.weight_decay = 0.0
    c.optim.grad_clip_norm = 1.0
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    return c
