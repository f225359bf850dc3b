"""Export a training checkpoint to a Hugging Face folder.

    sft-jax-export --workdir DIR [--step N] --out HF_DIR [--dtype bfloat16]

DIR and HF_DIR may be local paths or gs:// / s3:// URLs. The params are restored sharded
over the devices and written one tensor at a time. The folder holds config.json,
generation_config.json, safetensors and the run's tokenizer;
`transformers.AutoModelForCausalLM.from_pretrained(HF_DIR)` loads it. The optimizer state
is not read.
"""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sft-jax-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="the run's --workdir")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--dtype", default="", help="float32, bfloat16 or float16 (default: "
                        "bfloat16 for a bfloat16-computed run, else its param dtype)")  # fmt: skip
    parser.add_argument("--max-shard-gb", type=float, default=2.0, help="safetensors shard size")
    args = parser.parse_args(argv)
    from sft_jax import hf, runs

    try:
        run = runs.load_run(args.workdir, args.step)
        dtype = hf.export_dtype(run.model_cfg, args.dtype, key="--dtype")
    except ValueError as e:
        print(f"sft-jax-export: {e}", file=sys.stderr)
        return 2
    hf.save_hf(run.model_cfg, run.params, args.out, tokenizer=run.tokenizer, dtype=dtype,
               max_shard_bytes=int(args.max_shard_gb * 1024**3))  # fmt: skip
    print(f"exported step {run.step} of {args.workdir} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
