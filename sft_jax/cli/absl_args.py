"""Command lines on absl flags with an `ml_collections` `--config` file, parsed into a
`FlagValues` of their own: importing a command defines no global flags (it can sit next to
`sft_jax.main` in one process) and its `main(argv)` can run more than once."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from absl import flags

HELP = ("-h", "--help", "--helpshort", "--helpfull")


def parse(
    prog: str,
    doc: str,
    define: Callable[[flags.FlagValues, list[str]], None],
    argv: Sequence[str] | None,
) -> tuple[flags.FlagValues, list[str]]:
    """(parsed flags, the positional arguments left). `define(flag_values, full_argv)` defines
    the flags; `full_argv` is what `DEFINE_config_file(sys_argv=...)` reads the
    `--config.key=value` overrides from. `--help` prints `doc` and the flags and exits 0; a
    bad flag prints one line and exits 1 (as `absl.app.run` did)."""
    full = [prog, *(sys.argv[1:] if argv is None else argv)]
    values = flags.FlagValues()
    define(values, full)
    if any(a in HELP for a in full[1:]):
        print(f"{doc.strip()}\n\nflags:{values.get_help(include_special_flags=False)}")
        raise SystemExit(0)
    try:
        rest = values(full)
    except flags.Error as e:
        print(f"FATAL Flags parsing error: {e}", file=sys.stderr)
        print(f"Pass --help to see help on flags of {prog}.", file=sys.stderr)
        raise SystemExit(1) from None
    return values, rest[1:]
