"""Prints one of the README's commands, exactly as a newcomer copies it: the `bash` code
blocks of its "## Quick start" section, in order (1: install and run the main job, 2: install
and run the tests). CI runs what this prints, so the README cannot drift from what CI checks.

    python3 .ci/readme_command.py 1
"""

import pathlib
import re
import sys

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def quickstart_commands(text: str) -> list[str]:
    section = re.search(r"^## Quick start\n(.*?)(?=^## )", text, re.S | re.M)
    if section is None:
        sys.exit(f"{README}: no '## Quick start' section")
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section.group(1), re.S)]


def main() -> None:
    index = int(sys.argv[1])
    commands = quickstart_commands(README.read_text(encoding="utf-8"))
    if not 1 <= index <= len(commands):
        sys.exit(f"{README}: the Quick start section has {len(commands)} bash blocks, not {index}")
    print(commands[index - 1])


if __name__ == "__main__":
    main()
