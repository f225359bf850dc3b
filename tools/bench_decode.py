"""Decode speed: sft_jax's KV-cache generation against transformers `generate`, same weights.

    python tools/bench_decode.py                       # SmolLM2-135M-Instruct, batch 1 and 8
    python tools/bench_decode.py --model path/to/hf_folder --batches 1,4 --new-tokens 64

The model (`--model`: an HF folder, a .gguf file or an `asset:` name; the offline SmolLM2
asset by default) is loaded by `sft_jax.hf.load_hf` and exported with `sft_jax.hf.save_hf`
to a temporary folder that transformers loads: both sides hold the same float32 weights.
Prompts are real instructions in the model's chat template (with the generation prompt),
of different lengths, left-padded on both sides. Both decode exactly `--new-tokens` tokens
greedily (end tokens ignored, so the work is equal) and are timed the same way: one call
that compiles (sft_jax) or warms up (transformers), then `--repeats` timed calls, best
taken. tokens/s = batch × new tokens / seconds per call, prefill included. transformers
runs in a child process with its own threads. Also reported: how many of the greedy
tokens agree (float32 both sides: they should, up to near-ties).

The last line is one JSON object.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import sys
import tempfile
import time

from absl import app, flags

from sft_jax import hostenv

# `python tools/bench_decode.py` puts tools/ first on the path; `tools.` imports need the root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.bench_common import finish, host_cpu, peak_rss_mb, torch_available  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "asset:smollm2-135m-instruct-gguf", "HF folder, .gguf or asset:")
flags.DEFINE_list("batches", ["1", "8"], "Batch sizes to time.")
flags.DEFINE_integer("new-tokens", 32, "Tokens decoded per prompt.")
flags.DEFINE_integer("repeats", 2, "Timed calls per batch size (the best is reported).")
flags.DEFINE_bool("torch", True, "Also time transformers generate (needs torch).")

INSTRUCTIONS = [
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Explain why the sky is blue in two sentences.",
    "Write a haiku about autumn leaves falling in a quiet park at dusk.",
    "Translate 'good morning' into Spanish.",
    "List the planets of the solar system in order from the sun.",
    "Summarize the plot of Romeo and Juliet in one paragraph for a ten-year-old reader.",
    "What is 17 times 23?",
]


def prompt_ids(tokenizer, batch: int) -> list[list[int]]:
    out = []
    for i in range(batch):
        text = INSTRUCTIONS[i % len(INSTRUCTIONS)]
        if tokenizer.chat_template:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
            )
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # transformers 5: a dict
        else:
            ids = tokenizer(f"### Instruction:\n{text}\n\n### Response:\n")["input_ids"]
        out.append([int(t) for t in ids])
    return out


def time_sft_jax(cfg, params, prompts: list[list[int]], new: int, repeats: int) -> dict:
    from sft_jax.generate import Generator, Sampling

    gen = Generator(cfg, params, end_ids=())
    sampling = Sampling(max_new_tokens=new)
    t = time.perf_counter()
    tokens = gen.generate(prompts, sampling)
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        tokens = gen.generate(prompts, sampling)
        times.append(time.perf_counter() - t)
    return {"first_call_s": first, "best_s": min(times), "times_s": times, "tokens": tokens}


def time_transformers(folder: str, prompts: list[list[int]], new: int, repeats: int) -> dict:
    """In a child process: transformers' generate, greedy, left padding."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    width = max(len(p) for p in prompts)
    pad = 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kwargs = dict(
        attention_mask=mask,
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=pad,
    )
    with torch.no_grad():
        t = time.perf_counter()
        out = model.generate(ids, **kwargs)
        first = time.perf_counter() - t
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            out = model.generate(ids, **kwargs)
            times.append(time.perf_counter() - t)
    return {
        "first_call_s": first,
        "best_s": min(times),
        "times_s": times,
        "tokens": out[:, width:].tolist(),
        "threads": torch.get_num_threads(),
        "version": f"torch {torch.__version__}, transformers {transformers.__version__}",
        "peak_rss_mb": peak_rss_mb(),
    }


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of positions where both greedy decodes agree, up to each row's first difference
    counted as agreement-then-stop (after a near-tie the continuations rightly diverge)."""
    same = total = 0
    for x, y in zip(a, b, strict=True):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        same, total = same + n, total + max(len(x), len(y))
    return same / max(total, 1)


def run(model: str, batches: list[int], new: int, repeats: int, with_torch: bool) -> dict:
    import jax

    from sft_jax import hf
    from sft_jax.data import load_tokenizer

    cfg, params = hf.load_hf(model)
    tokenizer = load_tokenizer(model)
    device = f"{jax.device_count()} × {jax.devices()[0].device_kind}"
    print(
        f"model: {model} ({cfg.num_params() / 1e6:.1f} M params, {cfg.dtype}); "
        f"{new} new tokens; devices: {device}"
    )
    print(f"host: {host_cpu()}; GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")
    out: dict = {"model": model, "new_tokens": new, "results": []}
    why_not = torch_available() if with_torch else "off"
    with tempfile.TemporaryDirectory(prefix="sft_jax_bench_decode_") as folder:
        if not why_not:
            hf.save_hf(cfg, params, folder)
        for batch in batches:
            prompts = prompt_ids(tokenizer, batch)
            jx = time_sft_jax(cfg, params, prompts, new, repeats)
            r = {
                "batch": batch,
                "prompt_lengths": [len(p) for p in prompts],
                "tokens_per_sec": batch * new / jx["best_s"],
                "first_call_s": jx["first_call_s"],
                "call_s": jx["best_s"],
            }
            line = (
                f"batch {batch}: sft_jax {r['tokens_per_sec']:.1f} tokens/s (call "
                f"{jx['best_s']:.2f} s; first call, compiling, "
                f"{jx['first_call_s']:.1f} s)"
            )
            if not why_not:
                ctx = multiprocessing.get_context("spawn")
                with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
                    tr = pool.submit(time_transformers, folder, prompts, new, repeats).result()
                r.update(
                    torch_tokens_per_sec=batch * new / tr["best_s"],
                    torch_call_s=tr["best_s"],
                    torch_first_call_s=tr["first_call_s"],
                    torch_threads=tr["threads"],
                    torch_version=tr["version"],
                    greedy_agreement=agreement(jx["tokens"], tr["tokens"]),
                )
                r["ratio"] = r["tokens_per_sec"] / r["torch_tokens_per_sec"]
                line += (
                    f"; transformers {r['torch_tokens_per_sec']:.1f} tokens/s ("
                    f"{tr['threads']} threads); ratio {r['ratio']:.2f}; greedy tokens "
                    f"agree {r['greedy_agreement']:.0%}"
                )
            print(line)
            out["results"].append(r)
    if why_not and with_torch:
        print(why_not)
        out["torch"] = why_not
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    return finish(
        lambda: run(
            FLAGS.model,
            [int(b) for b in FLAGS.batches],
            FLAGS["new-tokens"].value,
            FLAGS.repeats,
            FLAGS.torch,
        )
    )


if __name__ == "__main__":
    hostenv.setup()
    app.run(main)
