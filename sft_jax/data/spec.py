"""`DataSpec`: the data part of a config as plain values, and its checks (config.py builds it
from `c.data`; configs/default.py documents every key)."""

from __future__ import annotations

import dataclasses

from sft_jax.data import examples, formats, templates

ON_BAD_ROW = ("error", "skip")


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """The data part of a config (see configs/default.py for every field)."""

    train: str  # A source string: path, glob, folder, hf:..., synthetic:...
    validation: str = ""  # A source, a fraction such as "0.05" held out from train, "" or "0".
    format: str = "auto"  # alpaca | prompt_completion | messages | sharegpt | auto
    fields: str = ""  # Field renames: "instruction=question,output=answer,role.assistant=bot".
    template: str = (
        "alpaca"  # alpaca | human_assistant | chatml | raw | tokenizer | format | x.jinja
    )
    template_format: templates.FormatTemplate = templates.FormatTemplate()  # template=format
    train_on: str = "response"  # Or "all".
    assistant_turns: str = "all"  # Or "last": only the last assistant turn carries loss.
    max_seq_len: int = 512
    too_long: str = "truncate"  # Responses over max_seq_len: truncate | drop | error.
    long_prompt: str = "drop"  # A prompt that fills max_seq_len alone: drop | truncate_left.
    packing: bool = True
    max_segments: int = 64  # Examples per packed row at most; 0 = no cap.
    pad_multiple: int = 64  # packing=False: batch widths rounded up to a multiple of this.
    on_bad_row: str = "error"  # Or "skip": count and report bad rows by reason.
    max_drop_fraction: float = 0.1  # Error if a split drops more of its rows than this.
    streaming: bool = False  # Stream hub data sets instead of reading their Arrow copy.
    cache: bool = True  # Keep tokenized, packed data on disk, keyed by everything it depends on.
    cache_dir: str = ""  # "" = $SFT_JAX_CACHE/data or ~/.cache/sft_jax/data.
    num_workers: int = -1  # Tokenizing processes; -1 = one per core for large data, 0 = none.
    seed: int = 0


_CHOICES = {
    "format": formats.FORMATS,
    "train_on": templates.TRAIN_ON,
    "assistant_turns": templates.ASSISTANT_TURNS,
    "too_long": examples.TOO_LONG,
    "long_prompt": examples.LONG_PROMPT,
    "on_bad_row": ON_BAD_ROW,
}


def check(spec: DataSpec) -> None:
    """Raises ValueError naming the config key for any value that cannot work."""
    for key, valid in _CHOICES.items():
        if getattr(spec, key) not in valid:
            raise ValueError(
                f"unknown data.{key} {getattr(spec, key)!r}; valid: {', '.join(valid)}"
            )
    if spec.max_seq_len < 1:
        raise ValueError(f"data.max_seq_len must be positive, got {spec.max_seq_len}")
    if spec.max_segments < 0:
        raise ValueError(f"data.max_segments must be >= 0 (0 = no cap), got {spec.max_segments}")
    if spec.pad_multiple < 1:
        raise ValueError(f"data.pad_multiple must be >= 1, got {spec.pad_multiple}")
    if not 0.0 <= spec.max_drop_fraction <= 1.0:
        raise ValueError(f"data.max_drop_fraction must be in [0, 1], got {spec.max_drop_fraction}")
    if not spec.train:
        raise ValueError("data.train is empty; give a file, glob, folder, hf:<name> or synthetic:…")
    formats.Fields.parse(spec.fields)
    if spec.template == "format":
        spec.template_format.check()
    validation_fraction(spec.validation)


def validation_fraction(validation: str) -> float | None:
    """The held-out fraction if `validation` is a number (0 = none), else None (a source)."""
    try:
        f = float(validation)
    except ValueError:
        return None
    if not 0.0 <= f < 1.0:
        raise ValueError(f"data.validation={validation!r}: a held-out fraction must be in [0, 1)")
    return f
