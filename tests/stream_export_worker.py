"""The export of tests/test_stream_export.py, alone in a process with one CPU device:
`sft-jax-export` of a checkpoint that 8 devices wrote, reporting the peak RSS growth.

    python tests/stream_export_worker.py RESULT.json EXPORT_ARGS...

Peak RSS is the kernel's high-water mark (VmHWM), reset just before the export by writing
5 to /proc/self/clear_refs (as tests/scale_hf_worker.py does); the libraries the export
imports are imported first, so the growth is the export's own memory.
"""

import json
import sys

from tests.scale_hf_worker import _peak, _reset_peak


def main(result, *args):
    import jax
    import tensorstore  # noqa: F401
    import transformers  # noqa: F401  (the tokenizer's)

    from sft_jax import hf, runs  # noqa: F401
    from sft_jax.cli import export

    before = _reset_peak()
    code = export.main(list(args))
    growth = _peak() - before
    with open(result, "w") as f:
        json.dump({"code": code, "growth": growth, "devices": jax.device_count()}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
