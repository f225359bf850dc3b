"""Command line: `python -m sft_jax.main --config configs/X.py --workdir DIR [--config.a.b=v]`.

Flags, distributed JAX (`cluster.start`: the launcher is detected, no flags needed), then
one call to `train.train_and_evaluate`.
"""

from sft_jax import hostenv

if __name__ == "__main__":
    # First, before jax and datasets load: a re-exec would pay for importing them twice.
    hostenv.setup()

import logging as std_logging
import re

import datasets
from absl import app, flags, logging
from ml_collections import config_flags

from sft_jax import checkpoint, cluster, paths, train
from sft_jax import config as config_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).")
flags.DEFINE_string(
    "workdir",
    None,
    "Where metrics, events and checkpoints go (a local path or a gs:// / s3:// URL); "
    "resumed if present.",
)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process GPU/CPU).")
flags.DEFINE_integer("num_processes", None, "Processes in the run (multi-process GPU/CPU).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process GPU/CPU).")
flags.DEFINE_bool(
    "multihost",
    False,
    "Fail unless a cluster is found. Not needed to start one: a TPU VM slice, GKE, SLURM "
    "or Open MPI launch is detected and joined without flags.",
)
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(std_logging.Filter):
    """Orbax logs every file it writes at INFO; keep its warnings and errors only."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


class _ConsoleFormat(std_logging.Formatter):
    """What a person watching reads: the time and the message ("warning:" and "error:" in
    front of those), without absl's level letter, thread id and source line; those come
    back with --verbosity=1, for debugging."""

    def __init__(self):
        super().__init__("%(asctime)s %(message)s", datefmt="%H:%M:%S")

    def format(self, record: std_logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= std_logging.WARNING:
            stamp, _, message = text.partition(" ")
            text = f"{stamp} {record.levelname.lower()}: {message}"
        return text


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if FLAGS.verbosity <= 0:  # absl's default: INFO and up, for people
        logging.get_absl_handler().setFormatter(_ConsoleFormat())
    datasets.disable_progress_bars()
    cluster.start(
        FLAGS.coordinator_address,
        FLAGS.num_processes,
        FLAGS.process_id,
        require_cluster=FLAGS.multihost,
    )
    try:
        # A bucket URL stays a URL: every host must write to the same place. One Orbax
        # cannot checkpoint to (s3://) is refused now, not after the data is tokenized.
        workdir = paths.resolve(FLAGS.workdir)
        run = config_lib.RunConfig.parse(FLAGS.config)  # the edge: sections from here on
        checkpoint.check_workdir(workdir)
        train.train_and_evaluate(run, workdir)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        # Bad config or data: our messages name the key and the fix; the traceback would
        # only bury them. It stays available for debugging.
        logging.debug("traceback", exc_info=True)
        raise SystemExit(f"error: {e}\n(--verbosity=1 shows the traceback)") from None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, with a one-line message instead of a traceback for a mistyped
    `--config.a.b=v` key (ml_collections raises AttributeError/KeyError for those)."""
    try:
        return FLAGS(argv)
    except (AttributeError, KeyError) as e:
        suggestion = re.search(r'Did you mean "([^"]+)"', str(e))
        keys = " ".join(a.split("=")[0] for a in argv[1:] if a.startswith("--config."))
        raise SystemExit(
            f"config: unknown key among {keys}"
            + (f' (did you mean "{suggestion.group(1)}"?)' if suggestion else "")
            + ". Every key is listed, with a comment, in configs/default.py."
        ) from None


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
