"""Export a training checkpoint to a Hugging Face folder.

    sft-jax-export --workdir DIR [--step N | --best] --out HF_DIR [--dtype bfloat16]
    sft-jax-export --workdir DIR [--step N] --out ADAPTER_DIR --adapter

--best exports the best checkpoint by the run's checkpoint.keep_best metric (its metadata
names it) instead of the latest.

A LoRA run's checkpoint exports merged (W + scale·B·A: a plain model), or with --adapter
as a PEFT adapter folder (adapter_config.json, adapter_model.safetensors) for
`peft.PeftModel.from_pretrained(base, ADAPTER_DIR)` and vLLM's --lora-modules.

DIR and HF_DIR may be local paths or gs:// / s3:// URLs. In one process (as this command
runs) nothing is restored whole: each tensor (one layer of a stacked leaf) is read alone
from the checkpoint's files, whatever mesh wrote them (`runs.stored_run`), converted and
written, so one CPU host exports a run of any size; a LoRA run's kernels are rebuilt and
merged a tensor at a time too. Peak memory beyond the interpreter: the largest tensor
(as read and as converted), one decoded checkpoint chunk (one device's shard of a leaf
when written), and the safetensors file being filled (--max-shard-gb, held until written);
README.md ("Several hosts") gives the bound and a measurement. The command re-executes
itself once with glibc's malloc told to return freed tensors (`hostenv.STREAMING`).
This is the default, not a flag, because it writes the same bytes as restoring the params
(a double-quantized NF4 base aside: its scales' mean rounds by the mesh, last bits)
over the devices (`runs.load_run` + `hf.save_hf`, what a multi-process caller does: each
process restores its shards) and needs less memory everywhere. The folder holds config.json,
generation_config.json, safetensors and the run's tokenizer;
`transformers.AutoModelForCausalLM.from_pretrained(HF_DIR)` loads it. The optimizer state
is not read.
"""

import argparse
import sys

from sft_jax import hostenv


def main(argv=None) -> int:
    if argv is None:  # the process's own command line (the console script, python -m)
        # Before jax loads: XLA's defaults, and glibc's malloc set to return each freed
        # tensor to the system (hostenv.STREAMING), on which the memory bound above rests.
        hostenv.setup(tunables=(hostenv.STREAMING,))
    parser = argparse.ArgumentParser(prog="sft-jax-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="the run's --workdir")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    which.add_argument(
        "--best", action="store_true", help="the best checkpoint by checkpoint.keep_best"
    )
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument(
        "--dtype",
        default="",
        help="float32, bfloat16 or float16 (default: "
        "bfloat16 for a bfloat16-computed run, else its param dtype)",
    )
    parser.add_argument("--max-shard-gb", type=float, default=2.0, help="safetensors shard size")
    parser.add_argument(
        "--adapter", action="store_true", help="a LoRA run's adapters as a PEFT folder"
    )
    args = parser.parse_args(argv)
    import jax

    from sft_jax import hf, lora, peft_adapter, runs

    # One process reads a tensor at a time; several restore their shards and gather.
    stream = jax.process_count() == 1 and not args.adapter
    try:
        run = (runs.stored_run if stream else runs.load_run)(args.workdir, args.step, args.best)
        dtype = hf.export_dtype(run.model_cfg, args.dtype, key="--dtype")
        if args.adapter and run.lora is None:
            raise ValueError(
                f"--adapter: {args.workdir} is a full fine-tuning run (no LoRA "
                "adapters); export the model without --adapter"
            )
    except ValueError as e:
        print(f"sft-jax-export: {e}", file=sys.stderr)
        return 2
    if args.adapter:
        adapters = lora.split(run.params)[1]
        peft_adapter.write_peft_adapter(
            run.model_cfg, run.lora, adapters, args.out, run.meta.init_from
        )
        print(f"exported the LoRA adapters of step {run.step} of {args.workdir} to {args.out}")
        return 0
    hf.save_hf(
        run.model_cfg,
        run.merged_params(),
        args.out,
        tokenizer=run.tokenizer,
        dtype=dtype,
        max_shard_bytes=int(args.max_shard_gb * 1024**3),
    )
    merged = " (LoRA adapters merged)" if run.lora else ""
    print(f"exported step {run.step} of {args.workdir} to {args.out}{merged}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
