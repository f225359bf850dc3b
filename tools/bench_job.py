"""A whole SFT job, end to end, against the classic transformers recipe on the same rows.

    python tools/bench_job.py --config configs/bench.py --rows 200 \
        --config.model.preset=smollm2-135m

Both sides start from nothing and are timed by wall clock from process start to exit, on
the first `--rows` rows of the config's `data.train` (Alpaca rows: instruction, input,
output), one epoch, random weights of the config's model shape:

- sft_jax: `python -m sft_jax.main` itself, with the config and its `--config.*` overrides,
  in a fresh workdir, the data cache off: reading, tokenizing, packing, compiling, every
  train step, and the final checkpoint it writes.
- transformers: the Stanford Alpaca recipe the tutorials copy, in a child process: the
  Alpaca prompt, `tokenizer(...)` per example truncated to `data.max_seq_len`, labels -100
  over the prompt, a `DataLoader` (shuffled, `--torch-batch` examples) whose collate pads
  each batch to its longest example, `AutoModelForCausalLM` (GPT2LMHeadModel /
  LlamaForCausalLM) with the model's own shifted loss, AdamW (fused) with the config's
  settings, global-norm clipping. It saves nothing, which favours it.

`--padded` adds a third job: sft_jax without packing (`data.packing=False`, each batch
padded to its longest example), to show what packing buys over a whole epoch.

Prints each job's wall time, optimizer steps, trained (loss) tokens and tokens/s, and the
ratios; the last line is one JSON object.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

from sft_jax import hostenv

# `python tools/bench_job.py` puts tools/ first on the path; `tools.` imports need the root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).")
flags.DEFINE_integer("rows", 200, "The first this many rows of data.train make the epoch.")
flags.DEFINE_integer("torch-batch", 8, "Examples per batch of the transformers job.")
flags.DEFINE_bool("torch", True, "Run the transformers job (needs torch: the test extra).")
flags.DEFINE_bool("padded", False, "Also run sft_jax without packing.")
flags.mark_flags_as_required(["config"])


def write_rows(source: str, n: int, path: str) -> int:
    """The first `n` rows of `source` (any sft_jax data source) as JSON Lines; how many."""
    from sft_jax.data.sources import Source
    from sft_jax.data.spec import BadRow

    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in Source(source, "data.train").rows():
            if isinstance(row, BadRow):
                continue
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
            if count == n:
                break
    return count


def config_overrides(argv: list[str]) -> list[str]:
    """The `--config.*` flags of this command line, passed on to the sft_jax job."""
    return [a for a in argv[1:] if a.startswith("--config.")]


def run_sft_jax(
    config_file: str,
    overrides: list[str],
    tokenizer: str,
    rows_path: str,
    workdir: str,
    packing: bool,
) -> dict:
    """`python -m sft_jax.main` on the rows, one epoch; wall time and its last train record."""
    cmd = [
        sys.executable,
        "-m",
        "sft_jax.main",
        "--config",
        config_file,
        "--workdir",
        workdir,
        *overrides,
        f"--config.model.tokenizer={tokenizer}",
        f"--config.data.train={rows_path}",
        "--config.data.validation=",
        "--config.data.cache=False",
        f"--config.data.packing={packing}",
        "--config.train.steps=0",
        "--config.train.epochs=1",
        "--config.train.log_every=1",
        "--config.train.progress_bar=False",
        "--config.eval.generations=0",
        "--config.export.hf_dir=",
    ]
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if done.returncode != 0:
        raise RuntimeError(f"the sft_jax job failed:\n{done.stderr[-3000:]}")
    records = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    train = [r for r in records if "loss" in r]
    # A record holds per-step means over the steps since the one before it.
    steps = [r["step"] for r in train]
    spans = [b - a for a, b in zip([0] + steps[:-1], steps, strict=True)]
    return {
        "wall_s": wall,
        "steps": steps[-1],
        "loss_tokens": sum(r["loss_tokens"] * n for r, n in zip(train, spans, strict=True)),
        "last_loss": train[-1]["loss"],
    }


# --------------------------------------------------------------------------- transformers


def classic_alpaca_job(
    rows_path: str,
    tokenizer_name: str,
    hf_config: dict,
    opt: dict,
    batch_size: int,
    max_len: int,
    seed: int,
) -> dict:
    """The tutorials' recipe, timed from the child's start of work (its imports included)."""
    t0 = time.perf_counter()
    import torch
    import transformers

    from sft_jax.data import load_tokenizer
    from sft_jax.data.templates import ALPACA_PREAMBLE, ALPACA_PREAMBLE_INPUT
    from tools.bench_common import torch_adamw, torch_random_model

    torch.manual_seed(seed)
    tokenizer = load_tokenizer(tokenizer_name)  # AutoTokenizer, offline
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    examples = []
    for line in open(rows_path, encoding="utf-8"):
        row = json.loads(line)
        if not {"instruction", "output"} <= row.keys():
            raise ValueError(f"{rows_path}: the transformers job needs Alpaca rows, got {row}")
        if row.get("input"):
            prompt = (
                f"{ALPACA_PREAMBLE_INPUT}\n\n### Instruction:\n{row['instruction']}\n\n"
                f"### Input:\n{row['input']}\n\n### Response:\n"
            )
        else:
            prompt = (
                f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{row['instruction']}\n\n### Response:\n"
            )
        full = prompt + row["output"] + tokenizer.eos_token
        ids = tokenizer(full, truncation=True, max_length=max_len)["input_ids"]
        n_prompt = len(tokenizer(prompt, truncation=True, max_length=max_len)["input_ids"])
        labels = [-100] * n_prompt + ids[n_prompt:]
        examples.append((ids, labels[: len(ids)]))

    def collate(batch):
        width = max(len(ids) for ids, _ in batch)
        pad = lambda xs, v: xs + [v] * (width - len(xs))
        return {
            "input_ids": torch.tensor([pad(ids, pad_id) for ids, _ in batch]),
            "labels": torch.tensor([pad(lab, -100) for _, lab in batch]),
            "attention_mask": torch.tensor([pad([1] * len(ids), 0) for ids, _ in batch]),
        }

    loader = torch.utils.data.DataLoader(
        examples, batch_size=batch_size, shuffle=True, collate_fn=collate
    )
    model = torch_random_model(hf_config)
    model.train()
    optimizer = torch_adamw(
        model.parameters(),
        lr=opt["learning_rate"],
        betas=(opt["b1"], opt["b2"]),
        eps=opt["eps"],
        weight_decay=opt["weight_decay"],
    )
    steps, loss_tokens, loss = 0, 0, float("nan")
    for batch in loader:
        out = model(**batch)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if opt["grad_clip_norm"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), opt["grad_clip_norm"])
        optimizer.step()
        loss = out.loss.item()
        steps += 1
        loss_tokens += int((batch["labels"][:, 1:] != -100).sum())
    return {
        "work_s": time.perf_counter() - t0,
        "steps": steps,
        "loss_tokens": loss_tokens,
        "last_loss": loss,
        "version": f"torch {torch.__version__}, transformers {transformers.__version__}",
    }


def run_torch(rows_path: str, c, batch_size: int) -> dict:
    from sft_jax import config as config_lib
    from sft_jax import hf
    from tools.bench_common import tokenizer_for

    opt = config_lib.optim_config(c)
    args = (
        rows_path,
        tokenizer_for(c),
        hf.config_to_hf(config_lib.model_config(config_lib.RunConfig.parse(c), hf.load_config)),
        {
            k: getattr(opt, k)
            for k in ("learning_rate", "b1", "b2", "eps", "weight_decay", "grad_clip_norm")
        },
        batch_size,
        c.data.max_seq_len,
        c.seed,
    )
    ctx = multiprocessing.get_context("spawn")
    t = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        out = pool.submit(classic_alpaca_job, *args).result()
    return {**out, "wall_s": time.perf_counter() - t}


# --------------------------------------------------------------------------- main


def run(
    c,
    config_file: str,
    overrides: list[str],
    rows: int,
    torch_batch: int,
    with_torch: bool,
    with_padded: bool,
) -> dict:
    from tools.bench_common import host_cpu, tokenizer_for, torch_available

    out: dict = {
        "rows": rows,
        "preset": c.model.preset,
        "seq_len": c.data.max_seq_len,
        "batch_size": c.train.batch_size,
        "torch_batch": torch_batch,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "host_cpu": host_cpu(),
    }
    print(f"host CPU: {out['host_cpu']}")
    with tempfile.TemporaryDirectory(prefix="sft_jax_bench_job_") as tmp:
        rows_path = os.path.join(tmp, "rows.jsonl")
        out["rows"] = write_rows(c.data.train, rows, rows_path)
        print(
            f"data: the first {out['rows']} rows of {c.data.train}; model {c.model.preset}, "
            f"seq {c.data.max_seq_len}"
        )
        jobs = [("sft_jax", True)] + ([("sft_jax_padded", False)] if with_padded else [])
        for name, packing in jobs:
            r = run_sft_jax(
                config_file,
                overrides,
                tokenizer_for(c),
                rows_path,
                os.path.join(tmp, name),
                packing,
            )
            out[name] = r
            _print(
                f"{name} (batch {c.train.batch_size} rows, "
                f"{'packed' if packing else 'padded per batch'})",
                r,
            )
        if with_torch:
            why_not = torch_available()
            if why_not:
                print(why_not)
                out["torch"] = why_not
            else:
                r = run_torch(rows_path, c, torch_batch)
                out["torch"] = r
                _print(f"transformers (batch {torch_batch} examples, padded per batch)", r)
                out["speedup"] = r["wall_s"] / out["sft_jax"]["wall_s"]
                print(f"wall time, transformers / sft_jax: {out['speedup']:.2f}x")
        if with_padded:
            padded = out["sft_jax_padded"]
            out["packing_speedup"] = (out["sft_jax"]["loss_tokens"] / out["sft_jax"]["wall_s"]) / (
                padded["loss_tokens"] / padded["wall_s"]
            )
            print(f"packing: {out['packing_speedup']:.2f}x the trained tokens/s of padding")
    return out


def _print(name: str, r: dict) -> None:
    print(
        f"{name}: {r['wall_s']:.1f} s wall, {r['steps']} steps, {r['loss_tokens']:.0f} trained "
        f"tokens ({r['loss_tokens'] / r['wall_s']:.1f}/s), last loss {r['last_loss']:.3f}"
    )


def main(argv) -> int:
    from tools.bench_common import finish

    compute = lambda: run(
        FLAGS.config,
        config_flags.get_config_filename(FLAGS["config"]),
        config_overrides(sys.argv),
        FLAGS.rows,
        FLAGS["torch-batch"].value,
        FLAGS.torch,
        FLAGS.padded,
    )
    return finish(compute, errors=(ValueError, FileNotFoundError, RuntimeError))


if __name__ == "__main__":
    hostenv.setup()
    app.run(main)
