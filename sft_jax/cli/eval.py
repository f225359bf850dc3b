"""Standard benchmarks on a trained run or an exported Hugging Face folder, with
lm-evaluation-harness's own task definitions (needs `pip install -e .[eval]`).

    sft-jax-eval --workdir DIR [--step N] --tasks gsm8k,ifeval,mmlu [--limit 100]
    sft-jax-eval --hf HF_DIR --tasks my_task --include_path my_tasks/ --output scores.json

Prints a Markdown table of the scores; --output writes lm-eval's results as JSON and the
table beside it (scores.md). A local task is a YAML file in an --include_path folder (see
tests/data/harness). --apply_chat_template renders prompts with the run's template.
"""

from __future__ import annotations

import argparse
import json
import sys

from etils import epath

from sft_jax.cli import model_source


def _args(argv):
    p = argparse.ArgumentParser(prog="sft-jax-eval", description=__doc__.split("\n\n")[0])
    model_source.add_arguments(p)
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task or group names")
    p.add_argument(
        "--include_path",
        "--include-path",
        action="append",
        default=[],
        help="a folder of YAML task definitions (repeatable)",
    )
    p.add_argument(
        "--limit",
        type=float,
        default=None,
        help="documents per task at most (a fraction if below 1)",
    )
    p.add_argument("--num_fewshot", "--num-fewshot", type=int, default=None)
    p.add_argument(
        "--apply_chat_template",
        "--apply-chat-template",
        action="store_true",
        help="render prompts with the run's template (data.template)",
    )
    p.add_argument(
        "--fewshot_as_multiturn",
        "--fewshot-as-multiturn",
        default=True,
        action=argparse.BooleanOptionalAction,
        help="with the chat template: few-shot examples as earlier turns",
    )
    p.add_argument("--template", default=None, help="override the template")
    p.add_argument(
        "--batch_size",
        "--batch-size",
        type=int,
        default=8,
        help="packed rows per forward and prompts per generation batch",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="results JSON to write (and a .md table beside it)")
    p.add_argument(
        "--log_samples",
        "--log-samples",
        action="store_true",
        help="keep every document's requests and responses in --output",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _args(argv)
    try:
        from sft_jax import harness

        cfg, params, tokenizer, spec, lora = model_source.load(args)
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        results = harness.run_tasks(
            cfg,
            params,
            tokenizer,
            spec,
            tasks,
            include_path=args.include_path,
            limit=_limit(args.limit),
            num_fewshot=args.num_fewshot,
            apply_chat_template=args.apply_chat_template,
            fewshot_as_multiturn=args.fewshot_as_multiturn,
            batch_size=args.batch_size,
            log_samples=args.log_samples,
            seed=args.seed,
            lora=lora,
        )
    except (ValueError, OSError, ImportError) as e:
        print(f"sft-jax-eval: {e}", file=sys.stderr)
        return 2
    table = harness.results_markdown(results)
    print(table)
    if args.output:
        epath.Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        epath.Path(args.output).write_text(json.dumps(results, indent=2), encoding="utf-8")
        md = epath.Path(args.output).with_suffix(".md")
        md.write_text(table, encoding="utf-8")
        print(f"wrote {args.output} and {md}")
    return 0


def _limit(limit: float | None) -> float | int | None:
    """lm-eval reads an int as a count and a float below 1 as a fraction."""
    return int(limit) if limit is not None and limit >= 1 else limit


if __name__ == "__main__":
    sys.exit(main())
