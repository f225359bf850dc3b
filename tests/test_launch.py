"""The launch commands users copy: every `python -m sft_jax.main` in launch/ (the GKE
JobSet, the SkyPilot task, the xpk and sbatch usage lines) and in the README's launch section
names a config file and variant that exist, flags `sft_jax.main` defines, and config keys
that configs/default.py has. (launch/slurm.sbatch also runs for real in tests/test_slurm.py;
the cloud launchers cannot run here.)"""

import glob
import importlib.util
import os
import re
import shlex

import pytest
import yaml

from tests.processes import ROOT

LAUNCH = os.path.join(ROOT, "launch")


def _commands_in_text(text: str) -> list[list[str]]:
    """Each `python -m sft_jax.main …` in shell text, continuation lines joined, as argv
    (`sbatch launch/slurm.sbatch CONFIG WORKDIR` as the main command it runs)."""
    text = re.sub(r"\\\n\s*#?\s*", " ", text)
    commands = []
    for line in text.splitlines():
        if sbatch := re.search(r"sbatch launch/slurm.sbatch (\S+) (\S+)", line):
            commands.append(["sft_jax.main", "--config", sbatch[1], "--workdir", sbatch[2]])
        if "sft_jax.main" not in line:
            continue
        rest = line.split("python -m", 1)[-1].strip()
        if rest.count('"') % 2:  # the end of a quoted --command "… python -m sft_jax.main …"
            rest = rest.rstrip('"')
        words = shlex.split(rest)
        commands.append(words[: next((i for i, w in enumerate(words) if w in (";", "&&")), None)])
    return commands


def _launch_commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in sorted(glob.glob(os.path.join(LAUNCH, "*"))):
        text = open(path).read()
        name = os.path.relpath(path, ROOT)
        if path.endswith(".yaml"):
            doc = yaml.safe_load(text)
            if doc.get("kind") == "JobSet":
                job = doc["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
                found.append((name, job["containers"][0]["command"][2:]))
            else:
                found += [(name, argv) for argv in _commands_in_text(doc["run"])]
        # Comments hold the xpk and usage lines.
        comments = "\n".join(x.lstrip("# ") for x in text.splitlines() if x.startswith("#"))
        found += [(f"{name} (comment)", argv) for argv in _commands_in_text(comments)]
    readme = open(os.path.join(ROOT, "README.md")).read()
    launching = readme.split("### Launching", 1)[1].split("\n## ", 1)[0]
    blocks = "\n".join(re.findall(r"```(?:bash|yaml)?\n(.*?)```", launching, re.S))
    found += [("README.md, Launching", argv) for argv in _commands_in_text(blocks)]
    return found


COMMANDS = _launch_commands()


def test_the_launchers_are_all_found():
    names = {name.split(" ")[0] for name, _ in COMMANDS}
    assert {
        "launch/gke_tpu_jobset.yaml",
        "launch/skypilot_h100.yaml",
        "launch/slurm.sbatch",
        "README.md,",
    } <= names, names
    assert len(COMMANDS) >= 6


def _config(spec: str):
    path, _, variant = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("launch_config", os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()


def _main_flags() -> set[str]:
    """The flags sft_jax/main.py defines, read from its source: importing it here would
    define absl's global flags in this worker, which tools.benchmark (another test) defines
    too."""
    source = open(os.path.join(ROOT, "sft_jax", "main.py")).read()
    return set(re.findall(r'DEFINE_\w+\(\s*"(\w+)"', source))


MAIN_FLAGS = _main_flags()


@pytest.mark.parametrize(("where", "argv"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_launch_command_names_a_real_config_and_real_flags(where, argv):
    assert {"config", "workdir", "multihost", "coordinator_address"} <= MAIN_FLAGS
    assert argv[:1] == ["sft_jax.main"], (where, argv)
    args = iter(argv[1:])
    seen, config_spec = set(), "configs/default.py"
    for arg in args:
        name, has_value, value = arg.partition("=")
        assert name.startswith("--"), (where, arg)
        key = name[2:]
        if key.startswith("config."):
            c = _config(config_spec)
            for part in key.split(".")[1:]:
                assert part in c, f"{where}: {name} is not a config key (configs/default.py)"
                c = c[part]
            continue
        assert key in MAIN_FLAGS, f"{where}: {name} is not a flag of sft_jax.main"
        if not has_value and key not in ("multihost",):
            value = next(args)
        seen.add(key)
        if key == "config":
            config_spec = value
            if "$" not in value:
                assert _config(value).model, where  # the file and its variant exist
    assert {"config", "workdir"} <= seen, where
