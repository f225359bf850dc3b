"""One process of tests/test_hf_bucket_reads.py: import a bucket's HF folder onto a mesh
spanning every process, counting the bytes this process fetched from the bucket.

    python tests/hf_bucket_worker.py SRC RESULT.json PROCESS_ID NUM_PROCESSES PORT FSDP TENSOR

The count is of the bytes each ranged GET returned (`hf.files._read_range`, through which
every byte of a bucket's safetensors comes), headers included, which are also counted
apart. The share is the bytes of the distinct blocks this process's devices hold.
"""

import json
import sys

import jax
import worker_checks


def main(src, result, pid, nproc, port, fsdp, tensor):
    jax.distributed.initialize(f"127.0.0.1:{port}", int(nproc), int(pid))
    import flax.linen as nn
    from etils import epath

    from sft_jax import hf, sharding
    from sft_jax.hf import files as hf_files
    from sft_jax.model import GPT

    fetched = {"bytes": 0, "gets": 0}
    read_range = hf_files._read_range

    def counted(path, start, length):
        data = read_range(path, start, length)
        fetched["bytes"] += len(data)
        fetched["gets"] += 1
        return data

    hf_files._read_range = counted
    hf_files.RemoteSafetensorsFolder(epath.Path(src))  # reads the headers alone
    headers = fetched["bytes"]

    cfg = hf.load_config(src)
    mesh = sharding.make_mesh(data=1, fsdp=int(fsdp), tensor=int(tensor))
    boxed = jax.eval_shape(GPT(cfg).init, jax.random.key(0), jax.numpy.zeros((1, 1), "int32"))
    shardings = sharding.tree_shardings(boxed["params"], mesh)
    fetched.update(bytes=0, gets=0)
    _, params = hf.load_hf(src, shardings=shardings, shapes=nn.meta.unbox(boxed["params"]))
    jax.block_until_ready(params)
    import_fetched = dict(fetched)

    leaves = jax.tree_util.tree_leaves_with_path(params)
    share = 0
    for _, leaf in leaves:
        blocks = {
            tuple((s.start, s.stop) for s in shard.index): shard
            for shard in leaf.addressable_shards
        }
        share += sum(shard.data.nbytes for shard in blocks.values())

    # What each device holds equals the same block of a single-process (numpy) import.
    mismatched, wrong_sharding = worker_checks.blocks_unlike_one_process(src, params, shardings)
    with open(result, "w") as f:
        json.dump(
            {
                "fetched": import_fetched["bytes"],
                "gets": import_fetched["gets"],
                "headers": headers,
                "share": share,
                "mismatched": mismatched,
                "wrong_sharding": wrong_sharding,
            },
            f,
        )


if __name__ == "__main__":
    main(*sys.argv[1:])
