"""The model a command reads (sft-jax-generate, sft-jax-eval): a training run's checkpoint
(`--workdir DIR [--step N]`, LoRA adapters applied unmerged) or a Hugging Face folder
(`--hf DIR`), with the template its prompts are rendered in (`--template` overrides it)."""

from __future__ import annotations

import argparse
import dataclasses


def add_arguments(p: argparse.ArgumentParser) -> None:
    """--workdir | --hf (one of them required) and --step; each command adds --template."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a training run's --workdir")
    src.add_argument("--hf", help="a Hugging Face folder (e.g. from sft-jax-export)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")


def load(args: argparse.Namespace):
    """(model config, params, tokenizer, DataSpec of the run's template, LoRA layers)."""
    import ml_collections

    from sft_jax import config as config_lib
    from sft_jax import hf, runs
    from sft_jax.data import DataSpec, load_tokenizer

    if args.workdir:
        run = runs.load_run(args.workdir, args.step)
        spec = config_lib.data_spec(ml_collections.ConfigDict(run.meta.config))
        cfg, params, tokenizer, lora = run.model_cfg, run.params, run.tokenizer, run.lora_layers
    else:
        cfg, params = hf.load_hf(args.hf)
        lora = None
        tokenizer = load_tokenizer(args.hf)
        template = "tokenizer" if tokenizer.chat_template else "alpaca"
        spec = DataSpec(train="-", format="auto", template=template)
    if args.template:
        spec = dataclasses.replace(spec, template=args.template)
    return cfg, params, tokenizer, spec, lora
