"""What a run saves beside every checkpoint (`RunMeta`, JSON), and whether a run may continue
a checkpoint: the same architecture (numerics may change), the same LoRA settings and, with
LoRA, the same base. Written by `train`; read by `runs` (export, generation) and by `train`
on resume. `checkpoint` stores it as it stores any JSON; other parts add their own keys at
save time ("best": `checkpoint.Checkpointer`, "early_stopping": `early_stopping`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from sft_jax import lora
from sft_jax.model.config import GPTConfig


def _tuples(fields: dict) -> dict:
    """JSON turned tuples into lists; the frozen dataclasses want them back."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}


@dataclasses.dataclass(frozen=True)
class RunMeta:
    """A run's identity, as every checkpoint of it records it."""

    config: dict  # the run's whole config, as JSON (`config.to_json`)
    model: GPTConfig
    tokenizer: str  # what model.tokenizer named (the workdir keeps a copy of the files)
    template: str  # data.template: how prompts are rendered for generation
    # What the params start from: a LoRA checkpoint holds only the adapters, and resume
    # and export rebuild the base from here ("" = the random init of `seed`).
    init_from: str = ""
    seed: int = 0
    lora: lora.LoraSpec | None = None

    def to_json(self) -> dict:
        meta = {
            "config": self.config,
            "model": dataclasses.asdict(self.model),
            "tokenizer": self.tokenizer,
            "template": self.template,
            "base": {"init_from": self.init_from, "seed": self.seed},
        }
        if self.lora is not None:
            meta["lora"] = dataclasses.asdict(self.lora)
        return meta

    @classmethod
    def from_json(cls, meta: dict) -> RunMeta:
        """A checkpoint's meta, runs older than the `family` field and the later model
        fields included."""
        base = meta.get("base", {})
        saved_lora = meta.get("lora")
        return cls(
            config=meta.get("config", {}),
            model=GPTConfig(**_tuples(saved_model_fields(meta["model"]))),
            tokenizer=meta.get("tokenizer", ""),
            template=meta.get("template", ""),
            init_from=base.get("init_from") or "",
            seed=base.get("seed", 0),
            lora=lora.LoraSpec(**_tuples(saved_lora)) if saved_lora else None,
        )

    def check_resumable(self, saved: dict, directory: str) -> None:
        """Fail, naming the config key, when this run cannot continue the checkpoint whose
        meta is `saved` (`check_resumable`)."""
        check_resumable(saved, self.to_json(), directory)


def check_compatible(saved_model: dict, current_model: dict, directory: str) -> None:
    """Fail, naming the fields, when the checkpoint's architecture differs from the config's
    in a way that changes parameter shapes or meaning (numerics such as dtype or remat may
    change between runs)."""
    free = {"dtype", "remat", "dropout", "attention", "neftune_alpha"}
    detail = _differences(saved_model_fields(saved_model), current_model, free)
    if detail:
        raise ValueError(
            f"the checkpoints in {directory} were written by a different model ({detail}); "
            "use the same model.* settings to resume, or a new --workdir"
        )


def check_resumable(saved_meta: dict, meta: dict, directory: str) -> None:
    """Fail, naming the config key, when this run cannot continue the checkpoint whose meta
    is `saved_meta`: another architecture (`check_compatible`), LoRA on a checkpoint
    trained without it or the reverse, other LoRA settings, or (with LoRA, whose
    checkpoints hold only the adapters) another base model."""
    check_compatible(saved_meta["model"], meta["model"], directory)
    saved, current = saved_meta.get("lora"), meta.get("lora")
    if not saved and not current:
        return
    if not saved or not current:
        rank = (current or saved)["rank"]
        written_by = "a LoRA run" if saved else "a full fine-tuning run (no LoRA)"
        fix = "lora.rank=0 (full fine-tuning)" if saved is None else f"lora.rank={rank}"
        raise ValueError(
            f"lora.rank: the checkpoints in {directory} were written by {written_by}; set "
            f"{fix} as they were to resume them, or use a new --workdir (to train LoRA on a "
            "fine-tuned model, export it with sft-jax-export and set model.init_from to it)"
        )
    # Dropout may change between runs; rank, scale, targets, init and the base may not.
    detail = _differences(saved, current, {"dropout"}, prefix="lora.")
    if detail:
        raise ValueError(
            f"the LoRA checkpoints in {directory} differ from the config ({detail}); "
            "use the same lora.* settings to resume, or a new --workdir"
        )
    saved_base, base = saved_meta.get("base", {}), meta.get("base", {})
    key = "init_from" if saved_base.get("init_from") or base.get("init_from") else "seed"
    if saved_base.get(key) != base.get(key):
        name = "model.init_from" if key == "init_from" else "seed (of the random base)"
        raise ValueError(
            f"{name}: the LoRA checkpoints in {directory} adapt the base "
            f"{saved_base.get(key)!r}, not {base.get(key)!r}; they hold only the adapters, "
            "so the base must be the same to resume"
        )


def _differences(saved: dict, current: dict, free: set[str], prefix: str = "") -> str:
    """Each key but `free` whose values differ, as "key: checkpoint X vs config Y", joined
    by commas ("" when none differ)."""
    keys = sorted((set(saved) | set(current)) - free)
    return ", ".join(
        f"{prefix}{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}"
        for k in keys
        if _plain(saved.get(k)) != _plain(current.get(k))
    )


def saved_model_fields(saved_model: dict) -> dict:
    """The model config a checkpoint's meta recorded, as `GPTConfig` fields. Runs written
    before `GPTConfig` had a `family` field recorded none: their family followed from the
    architecture (learned positions were GPT-2, q/k/v biases Qwen2, anything else Llama),
    inferred here, once, so that old workdirs still resume and export."""
    # Fields added to GPTConfig later (Gemma's soft caps …) were at their defaults then.
    defaults = {f.name: f.default for f in dataclasses.fields(GPTConfig) if f.name != "family"}
    saved_model = defaults | saved_model
    if "family" in saved_model:
        return saved_model
    if saved_model.get("positions", "learned") == "learned":
        family = "gpt2"
    else:
        family = "qwen2" if saved_model.get("qkv_bias") else "llama"
    return {"family": family, **saved_model}


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, (tuple, list)) else v
