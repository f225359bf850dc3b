"""What the multi-process and memory workers (tests/*_worker.py, run as scripts, so this is
imported as a sibling module) measure and check: this process's peak RSS, and whether each
device block of an import equals the same block of a single-process import."""


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def reset_peak() -> int:
    """Reset the high-water mark to the current RSS; returns that RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def peak() -> int:
    """The RSS high-water mark since the last `reset_peak`, in bytes."""
    return _status_kib("VmHWM") * 1024


def blocks_unlike_one_process(src: str, params, shardings) -> tuple[list[str], list[str]]:
    """(device blocks of `params` that differ from the same block of a single-process numpy
    import of `src`, leaves whose sharding is not `shardings`'), as readable names."""
    import jax
    import numpy as np

    from sft_jax import hf, sharding

    _, reference = hf.load_hf(src)
    mismatched, wrong_sharding = [], []
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        keys = tuple(k.key for k in path)
        want = sharding.get_path(reference, keys)
        if leaf.sharding != sharding.get_path(shardings, keys):
            wrong_sharding.append("/".join(keys))
        for shard in leaf.addressable_shards:
            if not np.array_equal(np.asarray(shard.data), want[shard.index]):
                mismatched.append(f"{'/'.join(keys)} {shard.index}")
    return mismatched, wrong_sharding
