"""One process of tests/test_data_multihost.py: joins a JAX run on loopback and builds data
with the other processes, writing what it saw to a JSON file.

    python tests/data_multihost_worker.py PORT INDEX COUNT SHARED_DIR OWN_DIR ROWS BAD OUT
"""

import json
import sys

import jax


def main() -> None:
    port, index, count, shared, own, rows, bad, out = sys.argv[1:]
    jax.distributed.initialize(f"127.0.0.1:{port}", int(count), int(index))
    from sft_jax.data import DataSpec, build_splits, examples, jax_processes, load_tokenizer

    tokenized = [0]  # Rows this process handed to the tokenizer (the real encode_chunk).
    encode_chunk = examples.encode_chunk

    def counted(chunk, encoder):
        tokenized[0] += len(chunk)
        return encode_chunk(chunk, encoder)

    examples.encode_chunk = counted
    tokenizer, processes = load_tokenizer("gpt2"), jax_processes()
    spec = dict(validation="0.1", max_seq_len=64, num_workers=0, max_drop_fraction=0.5)
    result = {}
    built = build_splits(
        DataSpec(train=rows, on_bad_row="skip", cache_dir=shared, **spec), tokenizer, processes
    )
    result["built"] = {"hit": built.cache_hit, "path": built.cache_path, "tokenized": tokenized[0]}
    again = build_splits(
        DataSpec(train=rows, on_bad_row="skip", cache_dir=shared, **spec), tokenizer, processes
    )
    result["again"] = {"hit": again.cache_hit, "tokenized": tokenized[0]}
    failing = {
        "bad_row": DataSpec(train=bad, cache_dir=shared, **spec),  # bad row in process 1's share
        "not_shared": DataSpec(train=rows, on_bad_row="skip", cache_dir=own, seed=1, **spec),
    }
    for name, s in failing.items():
        try:
            build_splits(s, tokenizer, processes)
            result[name] = None
        except ValueError as e:
            result[name] = str(e)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
