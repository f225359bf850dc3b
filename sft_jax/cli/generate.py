"""Responses from a trained run or an exported Hugging Face folder, with the template the
run trained with.

    sft-jax-generate --workdir DIR [--step N] --prompt "Add 2 and 3."
    sft-jax-generate --hf HF_DIR --input rows.jsonl --output responses.jsonl \
        [--max-new-tokens 128 --temperature 0.7 --top-p 0.9 --top-k 50 --seed 0 --stop "###"]

Input rows are in any format the data pipeline reads (alpaca, prompt/completion, messages,
sharegpt); a final assistant turn or output, if present, is kept as the reference.
"""

from __future__ import annotations

import argparse
import json
import sys

from etils import epath

from sft_jax.cli import model_source


def _args(argv):
    p = argparse.ArgumentParser(prog="sft-jax-generate", description=__doc__.split("\n\n")[0])
    model_source.add_arguments(p)
    io = p.add_mutually_exclusive_group(required=True)
    io.add_argument("--prompt", help="one instruction")
    io.add_argument("--input", help="JSONL of rows")
    p.add_argument("--output", help="JSONL to write (with --input; default: stdout)")
    p.add_argument(
        "--template",
        default=None,
        help="override the template (HF: tokenizer if it has a chat template, else alpaca)",
    )
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--batch-size", type=int, default=8)
    return p.parse_args(argv)


def _row(text: str, spec) -> dict:
    if spec.format == "alpaca":
        return {"instruction": text, "input": ""}
    if spec.format == "prompt_completion":
        return {"prompt": text}
    return {"messages": [{"role": "user", "content": text}]}


def main(argv=None) -> int:
    args = _args(argv)
    from sft_jax import evaluate
    from sft_jax.data import prompt_ids
    from sft_jax.generate import Generator, Sampling, end_token_ids

    try:
        cfg, params, tokenizer, spec, lora = model_source.load(args)
        if args.prompt is not None:
            rows = [_row(args.prompt, spec)]
        else:
            lines = epath.Path(args.input).read_text(encoding="utf-8").splitlines()
            rows = [json.loads(line) for line in lines if line.strip()]
        ids = [prompt_ids(r, spec, tokenizer) for r in rows]
    except (ValueError, OSError, json.JSONDecodeError) as e:
        print(f"sft-jax-generate: {e}", file=sys.stderr)
        return 2
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    generator = Generator(cfg, params, end_token_ids(tokenizer), lora=lora)
    responses = evaluate.respond(
        generator, tokenizer, ids, sampling, stop=args.stop, batch_size=args.batch_size
    )
    if args.prompt is not None:
        print(responses[0])
        return 0
    # A local path or a bucket URL (gs://, s3://).
    out = epath.Path(args.output).open("w", encoding="utf-8") if args.output else sys.stdout
    for row, response in zip(rows, responses, strict=True):
        out.write(json.dumps({**row, "response": response}, ensure_ascii=False) + "\n")
    if args.output:
        out.close()
        print(f"wrote {len(responses)} responses to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
