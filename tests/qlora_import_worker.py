"""One process of tests/test_qlora_import.py: import an HF folder as a QLoRA run's frozen
base (NF4, double-quantized, bfloat16 floats) on one device and report the peak RSS growth
of the import and what the stored base holds.

    python tests/qlora_import_worker.py SRC RESULT.json MODE

MODE "stored": `train._pretrained` (quantized as it loads); "float-first": the float32
base loaded whole, then `lora.prepare_base` over it (the import before, for comparison).
Peak RSS is VmHWM, reset before the import by writing 5 to /proc/self/clear_refs.
"""

import json
import sys
import types

import jax
import optax
import worker_checks


def main(src, result, mode):
    from sft_jax import hf, lora, sharding, train
    from sft_jax.model import GPT

    cfg = hf.load_config(src)
    spec = lora.LoraSpec(rank=4, quantize="nf4", base_dtype="bfloat16")
    model = GPT(cfg, spec.layers(cfg))
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    fns = train.build_steps(model, optax.adam(1e-3), lambda s: 0.0, mesh)
    stored_shardings = lora.split(fns.state_shardings.params)[0]
    # The first compile in a process maps XLA's and LLVM's own memory: not the import's.
    jax.jit(lambda x: x + 1)(jax.numpy.zeros(8)).block_until_ready()
    before = worker_checks.reset_peak()
    with fns.context():
        if mode == "stored":
            base = train._pretrained(types.SimpleNamespace(init_from=src, allow_pickle=False), fns)
        else:
            _, floats = hf.load_hf(src, shardings=fns.load_shardings, shapes=fns.load_shapes)
            prepare = lambda p: lora.prepare_base(cfg, model.lora, p)
            base = jax.jit(prepare, out_shardings=stored_shardings, donate_argnums=0)(floats)
            del floats
        jax.block_until_ready(base)
    peak = worker_checks.peak() - before
    stored = sum(x.nbytes for x in jax.tree.leaves(base))
    with open(result, "w") as f:
        json.dump({"peak": peak, "stored": stored}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
