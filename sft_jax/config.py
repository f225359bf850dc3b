"""The edge between `ml_collections` configs and the frozen dataclasses the modules take.

Everything a user can get wrong in a config is checked here, before anything compiles, and
the message names the config key and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import math

import ml_collections

from sft_jax import judge, kernels, lora, optim, trackers
from sft_jax.data import DataSpec, FormatTemplate
from sft_jax.model.config import GPTConfig
from sft_jax.optim import OptimConfig

# Tokenizer of each preset when neither model.tokenizer nor model.init_from names one.
PRESET_TOKENIZERS = {"gpt2": "gpt2", "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def init_source(c: ml_collections.ConfigDict) -> str:
    """The pretrained source named by model.init_from ("" for random init)."""
    init_from = c.model.init_from
    if init_from and not init_from.startswith("hf:"):
        raise ValueError(
            f"config: model.init_from={init_from!r} must be '' (random init) or "
            "'hf:<hub id | HF folder | GGUF file | asset:name>'"
        )
    return init_from.removeprefix("hf:")


def model_config(c: ml_collections.ConfigDict) -> GPTConfig:
    """The architecture from model.init_from's config if set (model.preset is then unused),
    else from model.preset; numerics (dtype, remat, …) always from the config."""
    m = c.model
    numerics = dict(
        dtype=m.dtype,
        param_dtype=m.param_dtype,
        remat=m.remat,
        scan_layers=m.scan_layers,
        dropout=m.dropout,
        attention=m.attention,
        # Training-time noise, so a model config: the model adds it (train_config's key).
        neftune_alpha=train_config(c).neftune_alpha,
    )
    shape = _architecture(c)
    if init_source(c):
        from sft_jax import hf

        loaded = hf.load_config(init_source(c))
        wrong = {k: (v, getattr(loaded, k)) for k, v in shape.items() if getattr(loaded, k) != v}
        if wrong:  # a recipe's written-down shapes (for planning) must be the checkpoint's
            raise ValueError(
                f"config: model.architecture disagrees with {m.init_from}: "
                + ", ".join(f"{k}={a!r} (its config: {b!r})" for k, (a, b) in wrong.items())
                + "; fix model.architecture or remove those keys"
            )
        return dataclasses.replace(loaded, **numerics)
    return GPTConfig.preset(m.preset, **shape, **numerics)


def _architecture(c: ml_collections.ConfigDict) -> dict:
    """model.architecture: GPTConfig fields that replace the preset's (a recipe states its
    model's shapes, so it can be planned without the hub; with init_from they must agree)."""
    shape = c.model.architecture.to_dict() if "architecture" in c.model else {}
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    numerics = {"dtype", "param_dtype", "remat", "scan_layers", "dropout", "attention",
                "neftune_alpha"}  # fmt: skip
    unknown = set(shape) - (fields - numerics)
    if unknown:
        raise ValueError(
            f"config: unknown model.architecture keys {sorted(unknown)}; valid: "
            f"{sorted(fields - numerics)} (numerics such as dtype are model.* keys)"
        )
    return {k: tuple(v) if isinstance(v, list) else v for k, v in shape.items()}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """`config.train`: the run's length, batch and logging (see configs/default.py)."""

    steps: int = 0
    epochs: float = 1.0
    batch_size: int = 8
    micro_steps: int = 1
    log_every: int = 10
    eval_every: int = 100
    eval_batch_size: int = 0  # 0 = batch_size
    eval_steps: int = 0  # validation batches per evaluation; 0 = the whole split
    peak_flops: float = 0.0
    progress_bar: bool = True
    profile_start: int = 3  # the first step traced when profile_steps > 0
    profile_steps: int = 0  # steps traced into WORKDIR/profile; 0 = off
    compilation_cache_dir: str = ""  # persistent XLA compilation cache; "" = off
    label_smoothing: float = 0.0  # ε of the training loss's smoothed targets; 0 = off
    neftune_alpha: float = 0.0  # NEFTune's noise on the token embeddings; 0 = off
    early_stopping_patience: int = 0  # evaluations without improvement before stopping; 0 = off
    early_stopping_min_delta: float = 0.0  # the least change that counts as an improvement
    trackers: tuple[str, ...] = ("tensorboard",)  # of trackers.TRACKERS
    tracker_project: str = "sft_jax"  # the W&B project / MLflow experiment
    mlflow_tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else WORKDIR/mlruns


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """`config.checkpoint`: when to save and how many to keep."""

    save_every: int = 500
    save_every_seconds: float = 0.0
    keep: int = 3
    async_save: bool = True
    keep_best: str = ""  # a metric ("eval_loss"; "max:<metric>" if higher is better); "" = off


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """`config.eval`: held-out generations before and after, and the optional judge."""

    generations: int = 0
    max_new_tokens: int = 64
    judge_url: str = ""
    judge_model: str = ""
    judge_api_key_env: str = "OPENAI_API_KEY"
    # lm-evaluation-harness tasks scored before and after training (sft_jax.harness)
    harness_tasks: str = ""  # comma-separated; "" = off
    harness_include_path: str = ""  # a folder of local YAML tasks
    harness_limit: int = 0  # documents per task; 0 = all
    harness_num_fewshot: int = -1  # -1 = each task's own
    harness_chat_template: bool = True
    harness_batch_size: int = 8

    @property
    def harness_task_list(self) -> list[str]:
        return [t.strip() for t in self.harness_tasks.split(",") if t.strip()]


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """`config.export`: what the run writes after its last checkpoint."""

    hf_dir: str = ""
    dtype: str = ""  # "" = bfloat16 for a bfloat16-computed model, else param_dtype
    adapter_dir: str = ""  # LoRA runs: a PEFT adapter folder ("" = none)


def _given(c: ml_collections.ConfigDict, name: str, fields: set[str]) -> dict:
    """`c.<name>` as a dict ({} if absent); a key not in `fields` is named with the valid ones."""
    given = c[name].to_dict() if name in c else {}
    unknown = set(given) - fields
    if unknown:
        raise ValueError(f"config: unknown {name} keys {sorted(unknown)}; valid: {sorted(fields)}")
    return given


def _section(c: ml_collections.ConfigDict, name: str, cls: type):
    """`c.<name>` as the frozen dataclass `cls`; an unknown key is named with the valid ones."""
    return cls(**_given(c, name, {f.name for f in dataclasses.fields(cls)}))


def optim_config(c: ml_collections.ConfigDict) -> OptimConfig:
    return _section(c, "optim", OptimConfig)


def train_config(c: ml_collections.ConfigDict) -> TrainConfig:
    return _section(c, "train", TrainConfig)


def checkpoint_config(c: ml_collections.ConfigDict) -> CheckpointConfig:
    return _section(c, "checkpoint", CheckpointConfig)


def eval_config(c: ml_collections.ConfigDict) -> EvalConfig:
    return _section(c, "eval", EvalConfig)


def export_config(c: ml_collections.ConfigDict) -> ExportConfig:
    return _section(c, "export", ExportConfig)


def lora_spec(c: ml_collections.ConfigDict) -> lora.LoraSpec:
    """`c.lora` (absent: LoRA off); an unknown key is named with the valid ones."""
    given = _given(c, "lora", {f.name for f in dataclasses.fields(lora.LoraSpec)} | {"init_from"})
    spec = lora.LoraSpec.from_config(given)
    if given.get("init_from") and not spec.enabled:
        raise ValueError(
            f"lora.init_from: {given['init_from']!r} is set but lora.rank is 0; set lora.rank "
            "(and alpha, targets) to the adapter's"
        )
    return spec


def lora_init_from(c: ml_collections.ConfigDict) -> str:
    """A PEFT adapter folder whose adapters a LoRA run starts from ("" = fresh ones)."""
    return c.lora.get("init_from", "") if "lora" in c else ""


def data_spec(c: ml_collections.ConfigDict) -> DataSpec:
    """`c.data` as a DataSpec; every key of `c.data` must be a DataSpec field."""
    d = c.data.to_dict()
    names = {f.name for f in dataclasses.fields(DataSpec)} - {"seed"}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"config: unknown data keys {sorted(unknown)}; valid: {sorted(names)}")
    fmt = d.pop("template_format", None) or {}
    try:
        template_format = FormatTemplate(**fmt)
    except TypeError as e:
        raise ValueError(f"config: data.template_format: {e}") from None
    return DataSpec(
        **{**d, "validation": str(d.get("validation", ""))},
        template_format=template_format,
        seed=c.seed,
    )


def tokenizer_name(c: ml_collections.ConfigDict) -> str:
    if c.model.tokenizer:
        return c.model.tokenizer
    if init_source(c):
        return init_source(c)
    family = "gpt2" if GPTConfig.preset(c.model.preset).family == "gpt2" else "smollm2"
    return PRESET_TOKENIZERS[family]


def check(c: ml_collections.ConfigDict, model_cfg: GPTConfig, mesh_shape: dict[str, int]) -> None:
    """Fail before compiling on settings that cannot work together."""
    if c.data.max_seq_len > model_cfg.max_seq_len:
        raise ValueError(
            f"config: data.max_seq_len={c.data.max_seq_len} exceeds the {model_cfg.max_seq_len} "
            f"positions of model.preset={c.model.preset!r}; lower data.max_seq_len"
        )
    t = train_config(c)
    if t.steps <= 0 and t.epochs <= 0:
        raise ValueError("config: set train.steps > 0 or train.epochs > 0")
    _check_batch_sizes(t, mesh_shape["data"] * mesh_shape["fsdp"])
    judge.from_config(eval_config(c), {})  # its keys, before any data or weights load
    e = eval_config(c)
    if e.harness_task_list:  # a misspelt task stops the run before it trains
        from sft_jax import harness

        harness.check_tasks(e.harness_task_list, e.harness_include_path or None)
    # e.g. cuDNN needs bf16 and has no soft cap
    kernels.resolve(model_cfg.attention, dtype=model_cfg.dtype, softcap=model_cfg.attn_softcap)
    from sft_jax import hf  # a bad export.dtype fails now, not after training

    hf.export_dtype(model_cfg, export_config(c).dtype)
    spec = lora_spec(c)
    spec.layers(model_cfg)  # unknown lora.targets for this family, named with the valid ones
    if export_config(c).adapter_dir and not spec.enabled:
        raise ValueError(
            "config: export.adapter_dir is set but lora.rank is 0 (no adapters to write); "
            "set lora.rank > 0 or export.hf_dir for the full model"
        )
    for key in ("log_every", "eval_every", "eval_steps", "profile_start", "profile_steps"):
        if getattr(t, key) < 0:
            raise ValueError(f"config: train.{key} must be >= 0")
    if t.log_every == 0:
        raise ValueError("config: train.log_every must be >= 1")
    if not 0.0 <= t.label_smoothing < 1.0:
        raise ValueError(f"config: train.label_smoothing={t.label_smoothing} must be in [0, 1)")
    optim.check(optim_config(c))
    trackers.check_trackers(t.trackers)  # an unknown name, or its package not installed


def _check_batch_sizes(t: TrainConfig, batch_shards: int) -> None:
    """Every micro-batch and evaluation batch must divide over the batch axes of the mesh."""
    b, k = t.batch_size, t.micro_steps
    if k < 1 or b % k:
        raise ValueError(
            f"config: train.batch_size={b} is not divisible by train.micro_steps={k}; "
            "choose a batch size that is a multiple of micro_steps"
        )
    if (b // k) % batch_shards:
        raise ValueError(
            f"config: each micro-batch of {b // k} rows (train.batch_size / train.micro_steps) "
            f"must divide over mesh.data × mesh.fsdp = {batch_shards} devices; use a "
            f"train.batch_size that is a multiple of {batch_shards * k}"
        )
    eval_b = t.eval_batch_size or b
    if eval_b % batch_shards:
        raise ValueError(
            f"config: train.eval_batch_size={eval_b} must be a multiple of "
            f"mesh.data × mesh.fsdp = {batch_shards}"
        )


def total_steps(c: ml_collections.ConfigDict, batches_per_epoch: int) -> int:
    """train.steps if set, else train.epochs passes over the packed training rows."""
    t = train_config(c)
    if t.steps > 0:
        return int(t.steps)
    return max(1, math.ceil(t.epochs * batches_per_epoch))


def to_json(c: ml_collections.ConfigDict) -> dict:
    return json.loads(c.to_json())
