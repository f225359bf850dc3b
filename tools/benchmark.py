"""Train-step throughput of a config, optionally side by side with Hugging Face transformers.

    python tools/benchmark.py --config configs/bench.py --steps 3 --compare-torch
    python tools/benchmark.py --config configs/bench.py --steps 3 --compare-torch \
        --config.model.preset=smollm2-135m
    python tools/benchmark.py --config configs/bench.py --compare-padding

What runs: the config's real jitted train step (`train.build_steps`, state donated, on a mesh
over every device JAX sees). The first step is timed on its own (`compile_s`: time to the
first step, compile included), `--warmup` more steps run untimed, then `--steps` steps are
timed one by one, each waited for, each on its own batch. The last printed line is one JSON
object: `tokens_per_sec, step_time_s, mfu, peak_rss_mb, compile_s` and more (docs/design.md).

Batches (`--batches`):
- `data` (default): real rows of the config's data (`data.train`), tokenized with its
  template and packed by `sft_jax.data`, the batches training would see at steps 0, 1, ….
- `random`: uniform random tokens, one example per row, every position in the loss.

Figures:
- `tokens_per_sec`: batch × seq_len per second (every position, padding included);
  `useful_tokens_per_sec` counts the real (non-pad) tokens, `loss_tokens_per_sec` those in
  the loss;
- `mfu`: `GPTConfig.flops_per_token` (6 × matmul weights + causal attention) × tokens/s over
  the peak: the one measurement training's MFU uses too (`metrics.peak_flops_per_device`):
  on CPU the best of float32 matmuls (`metrics.cpu_peak_flops`), taken before and again
  after the timed steps, the higher counting; on TPU/GPU the data-sheet bf16 peak of the
  device kind (`train.peak_flops` overrides);
- `peak_rss_mb`: this process's peak resident memory; `peak_device_mb`: the largest
  per-device peak on accelerators (null on CPU).

`--compare-torch` runs the same architecture in `transformers` (`GPT2LMHeadModel` /
`LlamaForCausalLM`, random init, config from `sft_jax.hf.config_to_hf`) in a child process,
so its memory and threads are its own, on the same batches: labels -100 where loss_mask is
0, position ids restarting per packed example, and a 4-D boolean attention mask that keeps
packed examples apart (causal, same segment), the same token-weighted loss, global-norm
clipping and AdamW (`fused=True`, the Trainer's default optimizer) with the same settings and
learning rates; timed the same way. `torch_*` figures and `ratio` (sft_jax / torch
tokens/s) are added. torch runs where JAX runs: on the GPU (`cuda`, bf16 autocast when
`model.dtype` is bfloat16) when JAX's backend is a GPU, else on the CPU. torch is a
test-only dependency: without it the tool says so.

LoRA (`--config.lora.rank=16`, and any other `lora.*` key: `lora.quantize=nf4` for QLoRA,
`lora.targets`, `lora.base_dtype`): the timed step trains the adapters alone over the frozen
base, as a training run does; `mfu` counts 4 FLOPs per frozen weight (no weight gradients,
`flops_per_token(frozen_layers=True)`). Full fine-tuning of the same model on the same
batches is timed too, in a child process (`full_*` figures, `lora_speedup` = its step time
over LoRA's; `--nocompare-full` leaves it out). `--compare-torch` then runs PEFT
(`peft.get_peft_model` with the settings `sft-jax-export --adapter` writes: rank, alpha,
dropout, the same `target_modules`, rsLoRA; PEFT's default init) on the transformers model,
AdamW over its adapters alone; `rss_ratio` is sft_jax's peak RSS over torch's. PEFT on CPU
has no quantized base (bitsandbytes' kernels are CUDA's): with `lora.quantize` the torch
side keeps a float base of `lora.base_dtype` (else `model.param_dtype`).

    python tools/benchmark.py --config configs/bench.py --steps 3 --compare-torch \
        --config.model.preset=smollm2-135m --config.lora.rank=16

`--compare-padding` trains the same data unpacked, each batch padded to its longest example
(the classic collate), and reports its useful tokens/s next to packing's. Every batch width
is compiled before the timing (`padded_compile_s`), which favours the padded baseline.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from sft_jax import hostenv

# `python tools/benchmark.py` puts tools/ first on the path; `tools.` imports need the root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.bench_common import (  # noqa: E402
    finish,
    host_cpu,
    peak_rss_mb,
    tokenizer_for,
    torch_adamw,
    torch_available,
    torch_peft_model,
    torch_random_model,
)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).")
flags.DEFINE_integer("steps", 5, "Timed train steps.")
flags.DEFINE_integer("warmup", 1, "Untimed steps after the first (compiling) one.")
flags.DEFINE_enum("batches", "data", ["data", "random"], "Real packed rows or random tokens.")
flags.DEFINE_bool("compare-torch", False, "Also time transformers/PyTorch on the same batches.")
flags.DEFINE_bool("compare-padding", False, "Also time unpacked rows padded per batch.")
flags.DEFINE_bool("compare-full", True, "With lora.rank > 0: also time full fine-tuning.")
flags.mark_flags_as_required(["config"])

FIELDS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
# adapter_config.json keys that are peft.LoraConfig arguments the torch side takes as they are.
PEFT_KEYS = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "fan_in_fan_out")


def peak_flops(configured: float) -> tuple[float, str]:
    """(peak FLOP/s of all devices together, where the figure came from): the same
    measurement as training's MFU (`metrics.peak_flops_per_device`)."""
    import jax

    from sft_jax import metrics

    per_device, source = metrics.peak_flops_per_device(configured)
    return per_device * jax.device_count(), f"{source} × {jax.device_count()} devices"


# --------------------------------------------------------------------------- batches


def data_batches(c, n: int, packing: bool) -> tuple[list[dict], dict]:
    """The first `n` global batches training would see (numpy), and the data stats."""
    from sft_jax import config as config_lib
    from sft_jax import data as data_lib

    spec = dataclasses.replace(config_lib.data_spec(c), packing=packing)
    splits = data_lib.build_splits(spec, data_lib.load_tokenizer(tokenizer_for(c)))
    b = c.train.batch_size
    batches = [data_lib.batch_at(splits.train, i, b, c.seed) for i in range(n)]
    if not packing:  # the classic collate: each batch only as wide as its longest example
        batches = [_trim(x) for x in batches]
    return batches, splits.stats.get("train", {})


def _trim(batch: dict) -> dict:
    real = batch["segment_ids"] != 0  # [batch, width]; one example per row, from column 0
    width = max(int(real.sum(axis=1).max()), 1)
    return {k: v[:, :width] for k, v in batch.items()}


def random_batches(c, vocab_size: int, n: int) -> list[dict]:
    """Uniform random tokens, one example per full row, every position in the loss."""
    import numpy as np

    rng = np.random.default_rng(c.seed)
    shape = (c.train.batch_size, c.data.max_seq_len)
    out = []
    for _ in range(n):
        ids = rng.integers(0, vocab_size, (shape[0], shape[1] + 1), dtype=np.int32)
        out.append(
            {
                "tokens": ids[:, :-1].copy(),
                "targets": ids[:, 1:].copy(),
                "loss_mask": np.ones(shape, np.float32),
                "segment_ids": np.ones(shape, np.int32),
                "positions": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy(),
            }
        )
    return out


def batch_counts(batches: list[dict]) -> dict[str, float]:
    """Positions, real tokens and loss tokens, summed over `batches`."""
    return {
        "positions": float(sum(b["tokens"].size for b in batches)),
        "real": float(sum((b["segment_ids"] != 0).sum() for b in batches)),
        "loss": float(sum(b["loss_mask"].sum() for b in batches)),
    }


def rates(step_times: list[float], batches: list[dict], flops_per_token: float, peak: float):
    """Throughput figures of timed steps on `batches` (one batch per step)."""
    elapsed = sum(step_times)
    n = batch_counts(batches)
    tokens_per_sec = n["positions"] / elapsed
    return {
        "tokens_per_sec": tokens_per_sec,
        "useful_tokens_per_sec": n["real"] / elapsed,
        "loss_tokens_per_sec": n["loss"] / elapsed,
        "step_time_s": elapsed / len(step_times),
        "mfu": flops_per_token * tokens_per_sec / peak if peak else 0.0,
    }


# --------------------------------------------------------------------------- sft_jax


def time_sft_jax(fns, state, batches: list[dict], warmup: int):
    """Runs one train step per batch: the first timed alone, the next `warmup` untimed, the
    rest timed one by one. Each batch shape is compiled ahead (`fns.train_step.lower(…)
    .compile()`, timed as `xla_compile_s`) before its first step; `compile_s`, the time to
    the first step, is the first shape's compile plus that step. Returns (state, figures)."""
    import jax

    from sft_jax import train

    b = len(batches[0]["tokens"])
    put = lambda x: train.global_batch(x, fns.batch_sharding, b)
    compiled: dict[tuple, object] = {}
    compile_times = []
    times, losses = [], []
    for x in batches:
        shape = x["tokens"].shape
        if shape not in compiled:
            t = time.perf_counter()
            compiled[shape] = fns.train_step.lower(state, put(x)).compile()
            compile_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        state, m = compiled[shape](state, put(x))
        loss = float(jax.device_get(m["loss"]))  # waits for the step, as torch's .item()
        times.append(time.perf_counter() - t)
        losses.append(loss)
    return state, {
        "compile_s": compile_times[0] + times[0],
        "xla_compile_s": compile_times[0],
        "all_compiles_s": sum(compile_times),
        "step_times_s": times[1 + warmup :],
        "losses": losses,
    }


def peak_device_mb() -> float | None:
    """The largest peak memory of a local device, MiB; None where devices do not say (CPU)."""
    import jax

    peaks = []
    for d in jax.local_devices():
        stats = d.memory_stats() if hasattr(d, "memory_stats") else None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(stats["peak_bytes_in_use"])
    return max(peaks) / 2**20 if peaks else None


def build(c):
    """(model config, jitted steps, fresh state, schedule) for config `c` (a ConfigDict or a
    parsed RunConfig) on a mesh of every device; with `lora.rank` > 0 the model carries the
    adapters over a frozen base stored as `lora.*` asks (its dtype, NF4/int8), as a training
    run's does."""
    import jax

    from sft_jax import config as config_lib
    from sft_jax import hf, optim, sharding, train
    from sft_jax.model import GPT

    run = c if isinstance(c, config_lib.RunConfig) else config_lib.RunConfig.parse(c)
    model_cfg = config_lib.model_config(run, hf.load_config)
    mesh = sharding.make_mesh(**dataclasses.asdict(run.mesh))
    config_lib.check(run, model_cfg, dict(mesh.shape))
    tx, schedule = optim.make_optimizer(run.optim, max(run.train.steps, 1))
    model = GPT(model_cfg, run.lora.layers(model_cfg))
    fns = train.build_steps(model, tx, schedule, mesh, run.train.micro_steps)
    with fns.context():
        state = fns.init(jax.random.key(run.seed))
    return model_cfg, fns, state, schedule


# --------------------------------------------------------------------------- torch


def torch_attention_mask(segment_ids):
    """[batch, 1, seq, seq] bool: causal and same segment. Padding (segment 0) attends to
    earlier padding only, so no softmax row is empty (NaN), and no real token sees it."""
    import torch

    seq = segment_ids.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal[None] & same)[:, None]


def run_torch(
    hf_config: dict,
    opt: dict,
    batches: list[dict],
    lrs: list[float],
    warmup: int,
    device: str,
    peft_settings: dict | None = None,
):
    """Times transformers' model of `hf_config` on `batches`, as `time_sft_jax` times ours,
    on `device` ("cpu" or "cuda"); with `peft_settings` (`peft_lora`) PEFT's LoRA of it,
    only the adapters trained. Runs in a child process: its peak RSS is its own."""
    import torch
    import transformers

    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "JAX runs on a GPU but this torch build sees no CUDA device: a torch CPU run is "
            "no fair comparison; install a CUDA build of torch or leave out --compare-torch"
        )
    torch.manual_seed(0)
    model = torch_random_model(hf_config)
    if peft_settings:
        model = torch_peft_model(model, peft_settings)
    model = model.to(device)
    model.train()
    decay, no_decay = [], []
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    for name, p in trained:
        is_embedding = "wte" in name or "wpe" in name or "embed_tokens" in name
        kernel = p.ndim >= 2 and not is_embedding
        (decay if kernel or (is_embedding and opt["decay_embeddings"]) else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": opt["weight_decay"]},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    optimizer = torch_adamw(groups, lr=lrs[0], betas=(opt["b1"], opt["b2"]), eps=opt["eps"])
    autocast = opt["dtype"] == "bfloat16"
    params = [p for _, p in trained]

    def step(batch, lr):
        put = lambda name: torch.from_numpy(batch[name]).to(device)
        tokens, targets = put("tokens").long(), put("targets").long()
        labels = torch.where(put("loss_mask") > 0, targets, -100)
        for g in optimizer.param_groups:
            g["lr"] = lr
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            logits = model(
                input_ids=tokens,
                attention_mask=torch_attention_mask(put("segment_ids")),
                position_ids=put("positions").long(),
            ).logits
        loss_sum = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
        )
        loss = loss_sum / (labels != -100).sum().clamp(min=1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if opt["grad_clip_norm"] > 0:
            torch.nn.utils.clip_grad_norm_(params, opt["grad_clip_norm"])
        optimizer.step()
        return loss.item()

    times, losses = [], []
    for batch, lr in zip(batches, lrs, strict=True):
        t = time.perf_counter()
        losses.append(step(batch, lr))
        times.append(time.perf_counter() - t)
    return {
        "compile_s": times[0],  # time to the first step, as for sft_jax
        "step_times_s": times[1 + warmup :],
        "losses": losses,
        "peak_rss_mb": peak_rss_mb(),
        "peak_device_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "version": f"torch {torch.__version__}, transformers {transformers.__version__}",
        "model_class": type(model).__name__
        + (f"({type(model.get_base_model()).__name__})" if peft_settings else ""),
        "attention": model.config._attn_implementation,
        "trainable_params": sum(p.numel() for p in params),
        "optimizer": "AdamW(fused)" if optimizer.defaults.get("fused") else "AdamW",
    }


def peft_lora(c, model_cfg) -> dict | None:
    """PEFT's LoraConfig settings for the config's `lora.*` (None when LoRA is off): those
    `sft-jax-export --adapter` writes to adapter_config.json (rank, alpha, dropout, the
    same layers as `target_modules`, rsLoRA, GPT-2's fan_in_fan_out), init PEFT's default
    (Kaiming-uniform A, zero B, as ours), and the base's float dtype (`lora.base_dtype`)."""
    from sft_jax import config as config_lib
    from sft_jax import peft_adapter

    spec = config_lib.lora_spec(c)
    if not spec.enabled:
        return None
    written = peft_adapter.peft_config(model_cfg, spec)
    settings = {k: written[k] for k in PEFT_KEYS}
    # PEFT on CPU has no 4-bit or 8-bit base (bitsandbytes' kernels are CUDA's): a QLoRA
    # run is compared with PEFT over a float base.
    settings["base_dtype"] = spec.base_dtype or model_cfg.param_dtype
    return settings


def in_child(fn, *args):
    """fn(*args) in a fresh (spawned) process, so its memory and threads are its own."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result()


def compare_torch(c, model_cfg, schedule, batches, warmup):
    import jax

    from sft_jax import config as config_lib
    from sft_jax import hf

    opt = dict(dataclasses.asdict(config_lib.optim_config(c)), dtype=c.model.dtype)
    lrs = [float(schedule(i)) for i in range(len(batches))]
    # torch on the hardware JAX used: a GPU run is compared with torch on the GPU.
    device = "cuda" if jax.default_backend() == "gpu" else "cpu"
    hf_config = hf.config_to_hf(model_cfg)
    return in_child(
        run_torch, hf_config, opt, batches, lrs, warmup, device, peft_lora(c, model_cfg)
    )


# --------------------------------------------------------------------------- full fine-tuning


def run_full(c, batches: list[dict], warmup: int) -> dict:
    """Times full fine-tuning of config `c`'s model (`RunConfig.without_lora`) on `batches`
    as `time_sft_jax` times the LoRA run. Runs in a child process: its peak RSS is its own."""
    from sft_jax import config as config_lib

    _, fns, state, _ = build(config_lib.RunConfig.parse(c).without_lora())
    with fns.context():
        _, figures = time_sft_jax(fns, state, batches, warmup)
    return {**figures, "peak_rss_mb": peak_rss_mb(), "peak_device_mb": peak_device_mb()}


def trainable_params(fns) -> int:
    """How many parameters the optimizer trains: the adapters with LoRA, else all."""
    import math

    import jax

    from sft_jax import steps

    trained, _ = steps.partition(fns.model, fns.abstract_state.params)
    return sum(math.prod(x.shape) for x in jax.tree.leaves(trained))


# --------------------------------------------------------------------------- main


def run(
    c,
    steps: int,
    warmup: int,
    batches_kind: str,
    with_torch: bool,
    with_padding: bool,
    with_full: bool = True,
):
    """Everything the command line does; returns the result dict (also the JSON line)."""
    import jax

    from sft_jax import config as config_lib
    from sft_jax import metrics

    if steps < 1 or warmup < 0:
        raise ValueError("--steps must be >= 1 and --warmup >= 0")
    n = 1 + warmup + steps
    model_cfg, fns, state, schedule = build(c)
    seq = c.data.max_seq_len
    if batches_kind == "random":
        batches, data_stats = random_batches(c, model_cfg.vocab_size, n), {}
        source = "random tokens"
    else:
        batches, data_stats = data_batches(c, n, packing=c.data.packing)
        source = f"{c.data.train} ({'packed' if c.data.packing else 'padded per batch'})"
    peak, peak_source = peak_flops(c.train.peak_flops)
    spec = config_lib.lora_spec(c)
    fpt = model_cfg.flops_per_token(seq, frozen_layers=spec.enabled)
    print(
        f"devices: {jax.device_count()} × {jax.devices()[0].device_kind} ({jax.default_backend()})"
    )
    print(f"host CPU: {host_cpu()}")
    print(f"peak: {peak / 1e9:.1f} GFLOP/s ({peak_source})")
    print(
        f"model: {c.model.preset} ({model_cfg.num_params() / 1e6:.1f} M params, {model_cfg.dtype}"
        f", scan_layers={model_cfg.scan_layers}, remat={model_cfg.remat}); "
        f"{fpt / 1e6:.1f} MFLOP per token at seq {seq}"
    )
    if spec.enabled:
        print(
            f"LoRA: rank {spec.rank}, alpha {spec.alpha}, targets {','.join(spec.targets)}, "
            f"{trainable_params(fns) / 1e6:.2f} M trained; base "
            f"{spec.quantize or spec.base_dtype or model_cfg.param_dtype}"
        )
    print(f"batches: {c.train.batch_size} × {seq} from {source}")
    # The settings sft_jax's entry points make (sft_jax/hostenv.py); a torch child process
    # inherits the same environment, so both sides run under the same settings.
    print(
        f"host: GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r} "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
    )

    with fns.context():
        state, jx = time_sft_jax(fns, state, batches, warmup)
    if metrics.CPU_PEAK_SOURCE in peak_source:  # measured again: the higher of the two counts
        after = metrics.cpu_peak_flops()
        print(f"peak after the steps: {after / 1e9:.1f} GFLOP/s; MFU against the higher")
        peak = max(peak, after)
    timed = batches[1 + warmup :]
    result = {
        **rates(jx["step_times_s"], timed, fpt, peak),
        "peak_rss_mb": peak_rss_mb(),
        "peak_device_mb": peak_device_mb(),
        "compile_s": jx["compile_s"],
    }
    real = batch_counts(timed)
    extra = {
        "xla_compile_s": jx["xla_compile_s"],
        "step_times_s": jx["step_times_s"],
        "first_loss": jx["losses"][0],
        "last_loss": jx["losses"][-1],
        "real_fraction": real["real"] / real["positions"],
        "preset": c.model.preset,
        "dtype": model_cfg.dtype,
        "batch_size": c.train.batch_size,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "seq_len": seq,
        "steps": steps,
        "warmup": warmup,
        "batches": batches_kind,
        "devices": jax.device_count(),
        "backend": jax.default_backend(),
        "host_cpu": host_cpu(),
        "peak_flops": peak,
        "peak_flops_source": peak_source,
        "flops_per_token": fpt,
        "trainable_params": trainable_params(fns),
        "lora_rank": spec.rank,
        "lora_quantize": spec.quantize,
        "lora_base_dtype": spec.base_dtype,
    }
    _print_figures("sft_jax", result, extra)
    del state  # donated and finished with

    if with_padding:
        if batches_kind == "random":
            raise ValueError("--compare-padding needs --batches=data")
        padded, _ = data_batches(c, n, packing=False)
        with fns.context():
            state = fns.init(jax.random.key(c.seed))
            _, px = time_sft_jax(fns, state, padded, warmup)
        p = rates(px["step_times_s"], padded[1 + warmup :], fpt, peak)
        pc = batch_counts(padded[1 + warmup :])
        extra.update(
            padded_useful_tokens_per_sec=p["useful_tokens_per_sec"],
            padded_loss_tokens_per_sec=p["loss_tokens_per_sec"],
            padded_step_time_s=p["step_time_s"],
            padded_real_fraction=pc["real"] / pc["positions"],
            padded_widths=[int(b["tokens"].shape[1]) for b in padded[1 + warmup :]],
            padded_compile_s=px["all_compiles_s"],
            packing_speedup=result["useful_tokens_per_sec"] / p["useful_tokens_per_sec"],
        )
        print(
            f"padded per batch: {p['useful_tokens_per_sec']:.1f} useful tokens/s "
            f"({pc['real'] / pc['positions']:.0%} real, widths {extra['padded_widths']}); "
            f"packed: {result['useful_tokens_per_sec']:.1f} ({extra['real_fraction']:.0%} real)"
            f" → packing ×{extra['packing_speedup']:.2f}"
        )

    if spec.enabled and with_full:
        extra.update(compare_full(c, batches, warmup, model_cfg.flops_per_token(seq), peak, result))
    if with_torch:
        compare_with_torch(c, model_cfg, schedule, batches, warmup, (fpt, peak), result, extra)
    if data_stats:
        extra["packing_efficiency"] = data_stats.get("packing_efficiency")
    return {**result, **extra}


def compare_full(c, batches: list[dict], warmup: int, fpt: float, peak: float, lora_r: dict):
    """Full fine-tuning of the same model on the same batches, in a child process: its
    `full_*` figures and `lora_speedup` (full step time / LoRA step time). `fpt` counts the
    weights' gradients (6 FLOPs per weight), as full fine-tuning computes them."""
    fx = in_child(run_full, c, batches, warmup)
    f = rates(fx["step_times_s"], batches[1 + warmup :], fpt, peak)
    full = {**f, "peak_rss_mb": fx["peak_rss_mb"], "compile_s": fx["compile_s"]}
    _print_figures("full fine-tuning (sft_jax)", full, fx)
    speedup = full["step_time_s"] / lora_r["step_time_s"]
    print(f"LoRA step vs full fine-tuning step: ×{speedup:.2f} faster")
    return {
        **{f"full_{k}": v for k, v in full.items() if k != "useful_tokens_per_sec"},
        "full_step_times_s": fx["step_times_s"],
        "full_first_loss": fx["losses"][0],
        "lora_speedup": speedup,
    }


def compare_with_torch(c, model_cfg, schedule, batches, warmup, flops, result, extra) -> None:
    """Times transformers (PEFT's LoRA with `lora.rank` > 0) on the same batches in a child
    process; adds its `torch_*` figures and `ratio` to `result` and `extra`. `flops` is
    (FLOPs per token, peak FLOP/s)."""
    from sft_jax import config as config_lib

    why_not = torch_available(with_peft=config_lib.lora_spec(c).enabled)
    if why_not:
        print(why_not)
        extra["torch"] = why_not
        return
    tx = compare_torch(c, model_cfg, schedule, batches, warmup)
    t = rates(tx["step_times_s"], batches[1 + warmup :], *flops)
    torch_result = {
        "tokens_per_sec": t["tokens_per_sec"],
        "useful_tokens_per_sec": t["useful_tokens_per_sec"],
        "step_time_s": t["step_time_s"],
        "mfu": t["mfu"],
        "peak_rss_mb": tx["peak_rss_mb"],
        "peak_device_mb": tx["peak_device_mb"],
        "compile_s": tx["compile_s"],
    }
    _print_figures(
        f"torch ({tx['model_class']}, {tx['attention']}, {tx['optimizer']}, "
        f"{tx['device']}, {tx['threads']} threads)",
        torch_result,
        {"step_times_s": tx["step_times_s"]},
    )
    result.update({f"torch_{k}": v for k, v in torch_result.items()})
    result["ratio"] = result["tokens_per_sec"] / torch_result["tokens_per_sec"]
    result["rss_ratio"] = result["peak_rss_mb"] / torch_result["peak_rss_mb"]
    extra.update(
        torch_step_times_s=tx["step_times_s"],
        torch_first_loss=tx["losses"][0],
        torch_last_loss=tx["losses"][-1],
        torch_version=tx["version"],
        torch_model=tx["model_class"],
        torch_trainable_params=tx["trainable_params"],
    )
    print(
        f"ratio: sft_jax / torch tokens/s = {result['ratio']:.2f}; "
        f"peak RSS sft_jax / torch = {result['rss_ratio']:.2f}"
    )


def _print_figures(name: str, r: dict, extra: dict) -> None:
    times = ", ".join(f"{t:.2f}" for t in extra["step_times_s"])
    print(
        f"{name}: {r['tokens_per_sec']:.1f} tokens/s, {r['useful_tokens_per_sec']:.1f} useful, "
        f"step {r['step_time_s']:.2f} s [{times}], MFU {r['mfu']:.1%}, first step "
        f"{r['compile_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MiB"
        + (f", device {r['peak_device_mb']:.0f} MiB" if r.get("peak_device_mb") else "")
    )


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    return finish(
        lambda: run(
            FLAGS.config,
            FLAGS.steps,
            FLAGS.warmup,
            FLAGS.batches,
            FLAGS["compare-torch"].value,
            FLAGS["compare-padding"].value,
            FLAGS["compare-full"].value,
        )
    )


if __name__ == "__main__":
    hostenv.setup()
    # On a GPU, JAX would otherwise reserve 75% of its memory up front: the torch child of
    # --compare-torch would then run short of memory, and peak_device_mb would read the pool.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    app.run(main)
