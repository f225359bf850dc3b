"""One process of tests/test_scale_hf.py: import an HF folder onto a mesh that spans all
processes, export it back, and report peak memory and what each process holds.

    python tests/scale_hf_worker.py SRC OUT RESULT.json PROCESS_ID NUM_PROCESSES PORT

Peak RSS is the kernel's high-water mark (VmHWM), reset before each phase by writing 5 to
/proc/self/clear_refs (Linux ≥ 4.0), so each phase's peak is measured alone.
"""

import json
import sys

import jax
import worker_checks


def main(src, out, result, pid, nproc, port):
    jax.distributed.initialize(f"127.0.0.1:{port}", int(nproc), int(pid))
    import flax.linen as nn

    from sft_jax import hf, sharding
    from sft_jax.model import GPT

    cfg = hf.load_config(src)
    # fsdp spans the processes; tensor pairs devices inside each.
    mesh = sharding.make_mesh(data=1, fsdp=-1, tensor=2)
    boxed = jax.eval_shape(GPT(cfg).init, jax.random.key(0), jax.numpy.zeros((1, 1), "int32"))
    shardings = sharding.tree_shardings(boxed["params"], mesh)
    shapes = nn.meta.unbox(boxed["params"])

    # The first compile in a process maps XLA's and LLVM's own memory: not the import's.
    jax.jit(lambda x: x + 1)(jax.numpy.zeros(8)).block_until_ready()
    before = worker_checks.reset_peak()
    _, params = hf.load_hf(src, shardings=shardings, shapes=shapes)
    jax.block_until_ready(params)
    import_peak = worker_checks.peak() - before
    leaves = jax.tree_util.tree_leaves_with_path(params)
    held = sum(s.data.nbytes for _, leaf in leaves for s in leaf.addressable_shards)

    before = worker_checks.reset_peak()
    hf.save_hf(cfg, params, out, max_shard_bytes=48 * 1024**2)
    export_peak = worker_checks.peak() - before

    # What each device holds equals the same block of a single-process (numpy) import.
    mismatched, wrong_sharding = worker_checks.blocks_unlike_one_process(src, params, shardings)
    with open(result, "w") as f:
        json.dump(
            {
                "import_peak": import_peak,
                "export_peak": export_peak,
                "held": held,
                "mismatched": mismatched,
                "wrong_sharding": wrong_sharding,
                "devices": jax.local_device_count(),
            },
            f,
        )


if __name__ == "__main__":
    main(*sys.argv[1:])
