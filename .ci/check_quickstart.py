"""Checks everything the README's quickstart promises, in the workdir its command wrote:
the report (validation loss and exact match, before and after), the loss curve, the
before/after generations, metrics up to the last step, the final checkpoint, the tokenizer
copy and the Hugging Face export. Standard library only: it runs in the runtime-only venv.

    python .ci/check_quickstart.py /tmp/sft_quickstart
"""

import json
import pathlib
import re
import sys


def fail(message: str) -> None:
    sys.exit(f"quickstart check failed: {message}")


def check(workdir: pathlib.Path) -> None:
    for name in ("report.md", "loss_curve.png", "metrics.jsonl", "generations_before.jsonl",
                 "generations_after.jsonl", "checkpoints", "tokenizer", "hf"):  # fmt: skip
        if not (workdir / name).exists():
            fail(f"{workdir / name} is missing")
    if not (workdir / "loss_curve.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n"):
        fail("loss_curve.png is not a PNG")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        if not (workdir / "hf" / name).is_file():
            fail(f"the HF export lacks {name}")
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    steps = max(r.get("step", 0) for r in records)
    if not any((workdir / "checkpoints").glob(f"{steps}*")):
        fail(f"no checkpoint of the last step {steps} in {workdir / 'checkpoints'}")
    before = [json.loads(line) for line in open(workdir / "generations_before.jsonl")]
    after = [json.loads(line) for line in open(workdir / "generations_after.jsonl")]
    if not before or len(before) != len(after):
        fail(f"{len(before)} generations before, {len(after)} after")
    report = (workdir / "report.md").read_text(encoding="utf-8")
    loss = re.search(r"\| validation loss \| ([\d.]+) \| ([\d.]+) \|", report)
    if loss is None or "| exact match" not in report:
        fail("report.md lacks the validation loss or exact-match rows")
    if not float(loss.group(2)) < float(loss.group(1)):
        fail(f"validation loss did not fall: {loss.group(1)} -> {loss.group(2)}")
    print(
        f"quickstart: {steps} steps, validation loss {loss.group(1)} -> {loss.group(2)}, "
        f"{len(after)} generations before and after, checkpoint and HF export present"
    )


if __name__ == "__main__":
    check(pathlib.Path(sys.argv[1]))
