"""sft_jax/cli: the user commands are console scripts of the installed package, each
with --help listing the flags of its command line."""

import subprocess

import pytest

FLAGS = {
    "sft-jax-export": "--workdir --step --out --dtype --max-shard-gb",
    "sft-jax-generate": "--workdir --hf --step --prompt --input --output --template "
    "--max-new-tokens --temperature --top-k --top-p --seed --stop --batch-size",
    "sft-jax-inspect": "--config --dump_batches --out --html --show --html_rows --[no]color",
    "sft-jax-plan": "--config --devices --[no]compile --topology",
    "sft-jax-stage": "source dest --revision",
}


@pytest.mark.parametrize("name", sorted(FLAGS))
def test_console_script_is_installed_and_helps(name, console_script):
    done = subprocess.run(
        [console_script(name), "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert name in done.stdout  # argparse's usage line, or the absl command's docstring
    for flag in FLAGS[name].split():
        assert flag in done.stdout, (flag, done.stdout)
