"""Stage a Hugging Face model once where every host can read it: a bucket or a shared
file system. A multi-host run then imports from there, each host reading only the byte
ranges its devices hold, instead of every host downloading the whole model (~141 GB for
a 70B) from the hub.

    sft-jax-stage hf:ORG/NAME gs://BUCKET/models/NAME [--revision REV]
    sft-jax-stage /local/hf/folder gs://BUCKET/models/NAME
    # then: --config.model.init_from=hf:gs://BUCKET/models/NAME

Copied: config, tokenizer and chat-template files, safetensors and their index. A hub file
is downloaded alone into a temporary folder, copied in 64 MiB chunks and deleted (local
disk: one file; memory: one chunk). A file already there with the same size is kept, so
running the command again resumes an interrupted staging.
"""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sft-jax-stage", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="hf:ORG/NAME (the hub) or a local or bucket HF folder")
    parser.add_argument("dest", help="gs://…, s3://… or a folder every host sees")
    parser.add_argument("--revision", default=None, help="hub branch, tag or commit")
    args = parser.parse_args(argv)
    from absl import logging

    from sft_jax.hf import hub

    logging.set_verbosity(logging.INFO)
    try:
        names = hub.stage(args.source, args.dest, revision=args.revision)
    except ValueError as e:
        print(f"sft-jax-stage: {e}", file=sys.stderr)
        return 2
    print(f"staged {len(names)} files to {args.dest}; use model.init_from=hf:{args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
