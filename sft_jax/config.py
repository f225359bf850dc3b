"""The edge between `ml_collections` configs and the frozen dataclasses the modules take.

An entry point parses the `ConfigDict` once, `RunConfig.parse(c)`, into one frozen
`RunConfig` of sections (`ModelSection`, `DataSpec`, `TrainConfig`, `OptimConfig`, …);
everything below takes sections. Parsing does no I/O: what a config names (init_from's
config.json, lm-eval tasks, the tokenizer, the data) is read by the run's setup, after.
Everything a user can get wrong in a config is checked here or in `check`, before anything
compiles, and the message names the config key and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from typing import Any

import ml_collections

from sft_jax import hf, judge, kernels, lora, optim, trackers
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


def model_config(
    run: RunConfig, load_config: Callable[[str], GPTConfig] | None = None
) -> GPTConfig:
    """The architecture from model.init_from's config if set (model.preset is then unused),
    else from model.preset; numerics (dtype, remat, …) always from the config. Reading
    init_from's config is I/O (a file, a bucket, the hub): the caller passes the reader
    (`hf.load_config`), so that it happens where the caller can be seen doing it."""
    m = run.model
    numerics = dict(
        dtype=m.dtype,
        param_dtype=m.param_dtype,
        remat=m.remat,
        scan_layers=m.scan_layers,
        dropout=m.dropout,
        attention=m.attention,
        # Training-time noise, so a model config: the model adds it (train_config's key).
        neftune_alpha=run.train.neftune_alpha,
    )
    shape = dict(m.architecture)
    if not m.init_from:
        return GPTConfig.preset(m.preset, **shape, **numerics)
    if load_config is None:
        raise ValueError(f"model.init_from={m.init_from!r}: its config.json must be read")
    loaded = load_config(m.init_from)
    wrong = {k: (v, getattr(loaded, k)) for k, v in shape.items() if getattr(loaded, k) != v}
    if wrong:  # a recipe's written-down shapes (for planning) must be the checkpoint's
        raise ValueError(
            f"config: model.architecture disagrees with hf:{m.init_from}: "
            + ", ".join(f"{k}={a!r} (its config: {b!r})" for k, (a, b) in wrong.items())
            + "; fix model.architecture or remove those keys"
        )
    return dataclasses.replace(loaded, **numerics)


def _architecture(c: ml_collections.ConfigDict) -> dict:
    """model.architecture: GPTConfig fields that replace the preset's (a recipe states its
    model's shapes, so it can be planned without the hub; with init_from they must agree)."""
    shape = c.model.architecture.to_dict() if "architecture" in c.model else {}
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    numerics = {
        "dtype",
        "param_dtype",
        "remat",
        "scan_layers",
        "dropout",
        "attention",
        "neftune_alpha",
    }
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


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """`config.model`, parsed: where the architecture comes from, the tokenizer, numerics.
    `init_from` is the pretrained source without its "hf:" ("" = random init); `tokenizer`
    is the one the run loads (model.tokenizer, else init_from's, else the preset's)."""

    preset: str = "tiny"
    init_from: str = ""
    architecture: tuple[tuple[str, Any], ...] = ()  # GPTConfig fields replacing the preset's
    allow_pickle: bool = False
    tokenizer: str = ""
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    attention: str = "auto"
    scan_layers: bool = True
    dropout: float = 0.0


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """`config.mesh`: devices per axis, -1 = the rest."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    expert: int = 1  # expert parallelism: a mixture of experts' experts split this many ways


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A run's whole config, parsed once at the edge (`parse`) into the sections the modules
    take: nothing below the entry points reads an `ml_collections.ConfigDict`. Parsing does
    no I/O; every key a user can get wrong fails here, named, with the valid ones."""

    seed: int
    model: ModelSection
    data: DataSpec
    train: TrainConfig
    optim: OptimConfig
    checkpoint: CheckpointConfig
    eval: EvalConfig
    export: ExportConfig
    lora: lora.LoraSpec
    lora_init_from: str  # a PEFT folder whose adapters a LoRA run starts from ("" = fresh)
    mesh: MeshSection
    as_json: dict  # the config as written: the run's meta and the trackers record it

    @classmethod
    def parse(cls, c: ml_collections.ConfigDict) -> RunConfig:
        return cls(
            seed=c.seed,
            model=model_section(c),
            data=data_spec(c),
            train=train_config(c),
            optim=optim_config(c),
            checkpoint=checkpoint_config(c),
            eval=eval_config(c),
            export=export_config(c),
            lora=lora_spec(c),
            lora_init_from=lora_init_from(c),
            mesh=_section(c, "mesh", MeshSection),
            as_json=to_json(c),
        )

    def without_lora(self) -> RunConfig:
        """This run as full fine-tuning of the same model, data, optimizer and mesh."""
        return dataclasses.replace(self, lora=lora.LoraSpec(), lora_init_from="")


def model_section(c: ml_collections.ConfigDict) -> ModelSection:
    """`c.model`; an unknown key is named with the valid ones."""
    fields = {f.name for f in dataclasses.fields(ModelSection)}
    given = _given(c, "model", fields) | {
        "init_from": init_source(c),
        "architecture": tuple(sorted(_architecture(c).items())),
        "tokenizer": tokenizer_name(c),
    }
    return ModelSection(**given)


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


def check(run: RunConfig, model_cfg: GPTConfig, mesh_shape: dict[str, int]) -> None:
    """Fail before compiling on settings that cannot work together. No I/O: what needs it
    (model.init_from's config, eval.harness_tasks) is checked by the run's setup."""
    if run.data.max_seq_len > model_cfg.max_seq_len:
        raise ValueError(
            f"config: data.max_seq_len={run.data.max_seq_len} exceeds the "
            f"{model_cfg.max_seq_len} positions of model.preset={run.model.preset!r}; lower "
            "data.max_seq_len"
        )
    t = run.train
    if t.steps <= 0 and t.epochs <= 0:
        raise ValueError("config: set train.steps > 0 or train.epochs > 0")
    _check_batch_sizes(t, math.prod(mesh_shape.get(a, 1) for a in ("data", "fsdp", "expert")))
    _check_expert_axis(model_cfg, mesh_shape.get("expert", 1))
    judge.from_config(run.eval, {})  # its keys, before any data or weights load
    # e.g. cuDNN needs bf16 and has no soft cap
    kernels.resolve(
        model_cfg.attention,
        dtype=model_cfg.dtype,
        softcap=model_cfg.attn_softcap,
        sinks=model_cfg.attention_sinks,
    )
    hf.export_dtype(model_cfg, run.export.dtype)  # a bad export.dtype fails now, not after training
    run.lora.layers(model_cfg)  # unknown lora.targets for this family, named with the valid ones
    if run.export.adapter_dir and not run.lora.enabled:
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
    optim.check(run.optim)
    trackers.check_trackers(t.trackers)  # an unknown name, or its package not installed


def _check_expert_axis(model_cfg: GPTConfig, expert: int) -> None:
    if expert == 1:
        return
    if not model_cfg.n_experts:
        raise ValueError(
            f"config: mesh.expert={expert} splits a mixture of experts' experts, and this model "
            "has none; use mesh.data or mesh.fsdp for more data parallelism"
        )
    if model_cfg.n_experts % expert:
        raise ValueError(
            f"config: mesh.expert={expert} must divide the model's {model_cfg.n_experts} experts"
        )


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
            f"must divide over mesh.data × mesh.fsdp × mesh.expert = {batch_shards} devices; use a "
            f"train.batch_size that is a multiple of {batch_shards * k}"
        )
    eval_b = t.eval_batch_size or b
    if eval_b % batch_shards:
        raise ValueError(
            f"config: train.eval_batch_size={eval_b} must be a multiple of "
            f"mesh.data × mesh.fsdp × mesh.expert = {batch_shards}"
        )


def total_steps(t: TrainConfig, batches_per_epoch: int) -> int:
    """train.steps if set, else train.epochs passes over the packed training rows."""
    if t.steps > 0:
        return int(t.steps)
    return max(1, math.ceil(t.epochs * batches_per_epoch))


def to_json(c: ml_collections.ConfigDict) -> dict:
    return json.loads(c.to_json())
